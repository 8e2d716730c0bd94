"""``EtcdStore``: torch's key-value ``Store`` on etcd v3, for the agents of one run."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import timedelta

import etcd3
import etcd3.etcdrpc as rpc
import etcd3.utils
import grpc
import tenacity
import torch.distributed as dist

from .client import MAX_TXN_OPS, EtcdClient, fail_over
from .lease import RunLease, is_lease_missing
from .runview import ViewBehind, ViewReader
from .watch import wait_for_events



class _Conflict(Exception):
    """Another writer changed the key between this writer's read and its compare-and-set."""


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class EtcdStore(dist.Store):
    """A ``torch.distributed.Store`` whose key ``k`` is the etcd key ``<prefix>/k``.

    Blocking reads (``get``, ``wait``, ``multi_get``) watch for the missing keys rather than poll,
    and fail with ``DistStoreError`` once the store's timeout passes. ``add``, ``append`` and
    ``compare_set`` are atomic (etcd transactions). Keys live on ``run_lease`` when one is given,
    so they vanish with the run.

    Args:
        etcd: the client, shared with the rendezvous backend (which closes it).
        prefix: the key directory, e.g. ``/torch/elastic/rendezvous/<run_id>/store``.
        timeout: how long blocking reads wait; torch's default (300 s) if ``None``.
        run_lease: the lease to put keys on.
        view: the run's view, when ``prefix`` is the run's store directory: blocked reads then wait
            on the process's one watch of the run instead of opening a watch each.
    """

    def __init__(
        self,
        etcd: EtcdClient,
        prefix: str,
        timeout: timedelta | None = None,
        run_lease: RunLease | None = None,
        view: ViewReader | None = None,
    ) -> None:
        super().__init__()
        self._etcd = etcd
        self._prefix = prefix.rstrip("/") + "/"
        self._run_lease = run_lease
        self._view = view
        if timeout is not None:
            self.set_timeout(timeout)

    @property
    def prefix(self) -> str:
        return self._prefix

    def _key(self, key: str) -> bytes:
        return (self._prefix + key).encode()

    def _write(self, op: Callable[[etcd3.MultiEndpointEtcd3Client, int], object]) -> object:
        """Run ``op(client, lease_id)`` as a request, re-granting the run lease if it lapsed."""

        def run(client: etcd3.MultiEndpointEtcd3Client) -> object:
            lease_id = self._run_lease.current(client) if self._run_lease else 0
            try:
                return op(client, lease_id)
            except Exception as exc:
                if self._run_lease and is_lease_missing(exc):
                    self._run_lease.lost()
                raise

        return self._etcd.request(run)

    def set(self, key: str, value: str | bytes) -> None:
        self._write(lambda c, lease: c.put(self._key(key), _as_bytes(value), lease=lease))

    def get(self, key: str) -> bytes:
        return self._await([key], self.timeout)[0]

    def multi_get(self, keys: Sequence[str]) -> list[bytes]:
        return self._await(list(keys), self.timeout)

    def multi_set(self, keys: Sequence[str], values: Sequence[str | bytes]) -> None:
        if len(keys) != len(values):
            raise ValueError(f"multi_set got {len(keys)} keys but {len(values)} values.")
        pairs = list(zip(keys, values))
        for start in range(0, len(pairs), MAX_TXN_OPS):
            chunk = pairs[start : start + MAX_TXN_OPS]
            self._write(
                lambda c, lease, chunk=chunk: c.transaction(
                    compare=[],
                    success=[c.transactions.put(self._key(k), _as_bytes(v), lease=lease) for k, v in chunk],
                    failure=[],
                )
            )

    def wait(self, keys: Sequence[str], timeout: timedelta | None = None) -> None:
        self._await(list(keys), self.timeout if timeout is None else timeout)

    def check(self, keys: Sequence[str]) -> bool:
        values, _ = self._read(list(keys))
        return len(values) == len(set(keys))

    def delete_key(self, key: str) -> bool:
        return self._etcd.request(lambda c: c.delete(self._key(key)))

    def num_keys(self) -> int:
        start = self._prefix.encode()
        return self._etcd.request(
            lambda c: c.get_range_response(start, etcd3.utils.prefix_range_end(start), count_only=True)
        ).count

    # torch's C++ trampoline looks these two up by their C++ names when a wrapper such as
    # ``PrefixStore`` forwards to this store.
    deleteKey = delete_key
    getNumKeys = num_keys

    def has_extended_api(self) -> bool:
        return True

    def add(self, key: str, amount: int) -> int:
        """Add ``amount`` to the decimal integer at ``key`` (0 if absent); return the sum."""
        return int(self._update(key, lambda old: str(int(old or b"0") + amount).encode()))

    def append(self, key: str, value: str | bytes) -> None:
        self._update(key, lambda old: (old or b"") + _as_bytes(value))

    def compare_set(self, key: str, expected_value: str | bytes, desired_value: str | bytes) -> bytes:
        """TCPStore's semantics: set ``desired_value`` if the key holds ``expected_value``, or is
        absent and ``expected_value`` is empty; return the value the key holds afterwards, except
        that an absent key with a non-empty ``expected_value`` returns ``expected_value``."""
        expected, desired = _as_bytes(expected_value), _as_bytes(desired_value)
        k = self._key(key)

        def swap(client: etcd3.MultiEndpointEtcd3Client, lease: int, compare: object) -> bytes | None:
            """``desired`` if ``compare`` held and the key was set, else the key's value (``None``
            if absent)."""
            tx = client.transactions
            succeeded, responses = client.transaction(
                compare=[compare], success=[tx.put(k, desired, lease=lease)], failure=[tx.get(k)]
            )
            if succeeded:
                return desired
            return responses[0][0][0] if responses[0] else None

        current = self._write(lambda c, lease: swap(c, lease, c.transactions.value(k) == expected))
        if current is not None:
            return current
        if expected:
            return expected
        # etcd fails any value comparison on an absent key: absence is a zero create revision.
        current = self._write(lambda c, lease: swap(c, lease, c.transactions.create(k) == 0))
        return current if current is not None else expected

    def _update(self, key: str, change: Callable[[bytes | None], bytes]) -> bytes:
        """Replace the key's value ``v`` with ``change(v)`` (``v`` is ``None`` if absent) by
        compare-and-set, retrying on conflicts until the store's timeout; return the new value."""
        k = self._key(key)
        # (value, mod_revision) as last seen; each failed attempt reads the winner's in the same request.
        seen: list[tuple[bytes, int] | None] = [None]

        def attempt() -> bytes:
            def cas(client: etcd3.MultiEndpointEtcd3Client, lease: int) -> tuple[bool, bytes | None, int]:
                tx = client.transactions
                current = seen[0]
                new = change(None if current is None else current[0])
                compare = tx.create(k) == 0 if current is None else tx.mod(k) == current[1]
                succeeded, responses = client.transaction(
                    compare=[compare], success=[tx.put(k, new, lease=lease)], failure=[tx.get(k)]
                )
                if succeeded:
                    return True, new, 0
                if responses[0]:
                    value, meta = responses[0][0]
                    return False, value, meta.mod_revision
                return False, None, 0

            succeeded, value, revision = self._write(cas)
            if succeeded:
                return value
            seen[0] = None if value is None else (value, revision)
            raise _Conflict(key)

        return tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Conflict),
            wait=tenacity.wait_random(0, 0.02),
            stop=tenacity.stop_after_delay(self.timeout.total_seconds()),
            reraise=True,
        )(attempt)

    def _read(self, keys: list[str]) -> tuple[dict[str, bytes], int]:
        """The values of those ``keys`` that exist, and the lowest revision they were read at."""
        values: dict[str, bytes] = {}
        revision = None
        for start in range(0, len(keys), MAX_TXN_OPS):
            chunk = keys[start : start + MAX_TXN_OPS]
            request = rpc.TxnRequest(
                success=[rpc.RequestOp(request_range=rpc.RangeRequest(key=self._key(key))) for key in chunk]
            )

            def txn(client: etcd3.MultiEndpointEtcd3Client, request=request) -> rpc.TxnResponse:
                try:
                    return client.kvstub.Txn(request, client.timeout, metadata=client.metadata)
                except grpc.RpcError as exc:
                    fail_over(client, exc)

            response = self._etcd.request(txn)
            revision = response.header.revision if revision is None else min(revision, response.header.revision)
            for key, op in zip(chunk, response.responses):
                if op.response_range.kvs:
                    values[key] = op.response_range.kvs[0].value
        return values, revision or 0

    def _await(self, keys: list[str], timeout: timedelta) -> list[bytes]:
        """Block until every key exists and return their values; watch for whichever is missing."""
        deadline = time.monotonic() + timeout.total_seconds()
        while True:
            values, revision = self._read(keys)
            missing = [key for key in keys if key not in values]
            if not missing:
                return [values[key] for key in keys]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise dist.DistStoreError(
                    f"Timed out after {timeout.total_seconds():g}s waiting for the keys {missing} "
                    f"in the etcd store at '{self._prefix}'."
                )
            self._wait_for_keys(missing, revision, remaining)

    def _wait_for_keys(self, keys: list[str], revision: int, timeout: float) -> None:
        """Wait until ``keys`` may all exist (the caller reads again), or ``timeout``."""
        try:
            if self._view is not None:
                self._view.view().wait_store_keys([self._key(key) for key in keys], timeout)
                return
        except ViewBehind:
            pass  # the backend closed its view: watch here instead
        # Events since ``revision`` come back at once, so a key set after the read is not missed.
        self._etcd.request(lambda c: wait_for_events(c, self._key(keys[0]), revision + 1, timeout))
