"""``EtcdStore``: torch's key-value ``Store`` on etcd v3, for the agents of one run."""

from __future__ import annotations

import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from datetime import timedelta

import etcd3
import torch.distributed as dist

from .cas import compare_and_swap
from .client import MAX_TXN_OPS
from .keys import prefix_range
from .run import EtcdRun, Floor, Seen


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class EtcdStore(dist.Store):
    """A ``torch.distributed.Store`` whose key ``k`` is the etcd key ``<run>/store/k``.

    Blocking reads (``get``, ``wait``, ``multi_get``) wait on the process's view of the run rather
    than poll, and fail with ``DistStoreError`` once the store's timeout passes. ``add``, ``append``
    and ``compare_set`` are atomic (etcd transactions), and ``add`` and ``append`` apply exactly
    once even when a request whose response was lost is retried (torch's barriers count arrivals
    with ``add``). Keys live on the run's lease, so they vanish with the run.

    Args:
        run: the process's run object.
        timeout: how long blocking reads wait; torch's default (300 s) if ``None``.
        release: called with ``run`` once the store is collected (``registry.release``), when
            the store holds a use of the run of its own.
    """

    def __init__(
        self, run: EtcdRun, timeout: timedelta | None = None, release: Callable[[EtcdRun], None] | None = None
    ) -> None:
        super().__init__()
        self._run = run
        self._floor = Floor()
        if release is not None:
            weakref.finalize(self, release, run)
        self._prefix = run.keys.store
        if timeout is not None:
            self.set_timeout(timeout)

    @property
    def prefix(self) -> str:
        return self._prefix

    def _key(self, key: str) -> bytes:
        return (self._prefix + key).encode()

    def set(self, key: str, value: str | bytes) -> None:
        self.multi_set([key], [value])

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

            def put(client: etcd3.MultiEndpointEtcd3Client, lease: int, chunk=chunk) -> Seen[None]:
                tx = client.transactions
                _, responses = client.transaction(
                    compare=[], success=[tx.put(self._key(k), _as_bytes(v), lease=lease) for k, v in chunk], failure=[]
                )
                return Seen(None, responses[0].response_put.header.revision)

            self._run.write(put, self._floor)

    def wait(self, keys: Sequence[str], timeout: timedelta | None = None) -> None:
        self._await(list(keys), self.timeout if timeout is None else timeout, read=False)

    def check(self, keys: Sequence[str]) -> bool:
        return len(self._read(list(keys))) == len(set(keys))

    def delete_key(self, key: str) -> bool:
        def delete(client: etcd3.MultiEndpointEtcd3Client, _: int) -> Seen[bool]:
            response = client.delete(self._key(key), return_response=True)
            return Seen(bool(response.deleted), response.header.revision if response.deleted else 0)

        return self._run.write(delete, self._floor)

    def num_keys(self) -> int:
        start, end = prefix_range(self._prefix)
        return self._run.etcd.request(lambda c: c.get_range_response(start, end, count_only=True)).count

    # torch's C++ trampoline looks these two up by their C++ names when a wrapper such as
    # ``PrefixStore`` forwards to this store.
    deleteKey = delete_key
    getNumKeys = num_keys

    def has_extended_api(self) -> bool:
        return True

    def _receipt(self) -> bytes:
        return (self._run.keys.ops + uuid.uuid4().hex).encode()

    def add(self, key: str, amount: int) -> int:
        """Add ``amount`` to the decimal integer at ``key`` (0 if absent); return the sum."""
        new = compare_and_swap(
            self._run,
            self._key(key),
            lambda old: str(int(old or b"0") + amount).encode(),
            self.timeout.total_seconds(),
            receipt=self._receipt(),
            floor=self._floor,
        )
        return int(new)

    def append(self, key: str, value: str | bytes) -> None:
        suffix = _as_bytes(value)
        compare_and_swap(
            self._run,
            self._key(key),
            lambda old: (old or b"") + suffix,
            self.timeout.total_seconds(),
            receipt=self._receipt(),
            floor=self._floor,
        )

    def compare_set(self, key: str, expected_value: str | bytes, desired_value: str | bytes) -> bytes:
        """TCPStore's semantics: set ``desired_value`` if the key holds ``expected_value``, or is
        absent and ``expected_value`` is empty; return the value the key holds afterwards, except
        that an absent key with a non-empty ``expected_value`` returns ``expected_value``."""
        expected, desired = _as_bytes(expected_value), _as_bytes(desired_value)

        def swap(old: bytes | None) -> bytes | None:
            matches = old == expected if old is not None else not expected
            return desired if matches else None

        current = compare_and_swap(self._run, self._key(key), swap, self.timeout.total_seconds(), floor=self._floor)
        return expected if current is None else current

    def _read(self, keys: list[str]) -> dict[str, bytes]:
        """The values of those ``keys`` that exist, read from etcd."""
        values: dict[str, bytes] = {}
        for start in range(0, len(keys), MAX_TXN_OPS):
            chunk = keys[start : start + MAX_TXN_OPS]

            def get(client: etcd3.MultiEndpointEtcd3Client, chunk=chunk) -> Seen[dict[str, bytes]]:
                tx = client.transactions
                _, responses = client.transaction(compare=[], success=[tx.get(self._key(k)) for k in chunk], failure=[])
                found = {key: kvs[0][0] for key, kvs in zip(chunk, responses) if kvs}
                newest = max((kvs[0][1].mod_revision for kvs in responses if kvs), default=0)
                return Seen(found, newest)

            values.update(self._run.read(get, self._floor))
        return values

    def _await(self, keys: list[str], timeout: timedelta, read: bool = True) -> list[bytes]:
        """Block until every key exists and return their values: wait on the run's view until it
        shows them, then read them from etcd (a value is never taken from the view). Without a
        current view, read etcd at once, and again whenever the view may have news. With
        ``read=False`` (a wait, which needs no values) a view that shows every key is enough, and
        nothing is returned."""
        deadline = time.monotonic() + timeout.total_seconds()
        values: dict[str, bytes] = {}
        while True:
            missing = [key for key in keys if key not in values]
            if not missing:
                return [values[key] for key in keys]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise dist.DistStoreError(
                    f"Timed out after {timeout.total_seconds():g}s waiting for the keys {missing} "
                    f"in the etcd store at '{self._prefix}'."
                )
            full = [self._key(key) for key in missing]
            shown = self._run.view.wait_store_keys(full, self._floor.revision, remaining)
            if shown and not read:
                return []
            if shown is not False:
                values.update(self._read(missing))
