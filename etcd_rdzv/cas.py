"""Read-modify-write of one etcd key by compare-and-set on its revision: the one retry loop for
conflicts between writers (the agents' store, the CLI's ``close``)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import etcd3
import tenacity

from .run import EtcdRun, Floor, Seen

logger = logging.getLogger(__name__)


class Conflict(Exception):
    """Another writer changed the key between this writer's read and its compare-and-set."""


def compare_and_swap(
    run: EtcdRun,
    key: bytes,
    change: Callable[[bytes | None], bytes | None],
    timeout: float,
    receipt: bytes | None = None,
    floor: Floor | None = None,
) -> bytes | None:
    """Replace the key's value ``v`` with ``change(v)`` (``v`` is ``None`` if absent) and return the
    value written; if ``change`` returns ``None`` nothing is written and ``v`` comes back.

    ``change`` may be called more than once, the first time with ``None`` before the key is read
    (a guess that costs nothing when the key is absent): only its last call's decision stands.

    Conflicts are retried with jittered backoff for ``timeout`` seconds (then ``Conflict`` is
    raised); each lost attempt reads the winner's value in the same request. The key is put on the
    run's lease.

    Args:
        receipt: a key unique to this call. The write puts it too, and a retried request that
            finds it knows its write already committed (its response was lost): the change
            applies exactly once. It lives on the run's lease, which outlives any retry (the
            process's session lease lapsed in an outage longer than its 10 s, and a retry after
            it applied the change twice); it is deleted afterwards.
        floor: the caller's floor, raised to what the swap wrote or read.
    """
    floor = floor or Floor()
    # (value, mod_revision) as last seen; None: absent (or not read yet).
    seen: list[tuple[bytes, int] | None] = [None]

    def cas(client: etcd3.MultiEndpointEtcd3Client, lease_id: int) -> Seen[tuple[bool, bytes | None]]:
        tx = client.transactions
        current = seen[0]
        new = change(None if current is None else current[0])
        compare = tx.create(key) == 0 if current is None else tx.mod(key) == current[1]
        # Writing nothing still compares: the decision holds only for the value it was made on.
        success = [] if new is None else [tx.put(key, new, lease=lease_id)]
        failure = [tx.get(key)]
        if receipt is not None and new is not None:
            success.append(tx.put(receipt, new, lease=lease_id))
            failure.append(tx.get(receipt))
        succeeded, responses = client.transaction(compare=[compare], success=success, failure=failure)
        if succeeded and new is None:
            return Seen((True, None if current is None else current[0]), 0 if current is None else current[1])
        if succeeded:
            revision = responses[0].response_put.header.revision
            return Seen((True, new), revision)
        if len(responses) > 1 and responses[1]:
            # Our write committed in an attempt whose response never arrived.
            value, meta = responses[1][0]
            return Seen((True, value), meta.mod_revision)
        if responses[0]:
            value, meta = responses[0][0]
            seen[0] = (value, meta.mod_revision)
            return Seen((False, value), meta.mod_revision)
        seen[0] = None
        return Seen((False, None))

    def attempt() -> bytes | None:
        done, value = run.write(cas, floor)
        if not done:
            raise Conflict(key.decode(errors="replace"))
        return value

    try:
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(Conflict),
            wait=tenacity.wait_random(0, 0.02),
            stop=tenacity.stop_after_delay(timeout),
            reraise=True,
        )(attempt)
    finally:
        if receipt is not None:
            _forget_receipt(run, receipt)


def _forget_receipt(run: EtcdRun, receipt: bytes) -> None:
    try:
        run.etcd.request(lambda c: c.delete(receipt), budget=0)
    except Exception as exc:  # it lapses with the run's lease anyway
        logger.debug("Could not delete the receipt %s: %s", receipt, exc)
