"""``EtcdStore``, torch's ``Store`` for the agents of one run, and ``compare_and_swap``, the one
read-modify-write loop of a key (the store's atomic operations, the CLI's ``close``)."""

from __future__ import annotations

import contextlib
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from datetime import timedelta

import tenacity
import torch.distributed as dist

from .keys import prefix_range
from .run import EtcdRun, Floor
from .runtime.txn import Delete, Get, Put, Txn, absent, mod_is


class Conflict(Exception):
    """Another writer changed the key between this writer's read and its compare-and-set."""


def compare_and_swap(run: EtcdRun, key: bytes, change: Callable[[bytes | None], bytes | None], timeout: float,
                     receipt: bytes | None = None, floor: Floor | None = None) -> bytes | None:
    """Replace the key's value ``v`` by ``change(v)`` (``None``: absent; ``change`` may be called more
    than once) on the run's lease and return what was written, or ``v`` if ``change`` returns
    ``None``; conflicts are retried for ``timeout`` seconds. ``receipt``, a key unique to the call
    put with the write, makes a retry after a lost response apply the change once."""
    floor = floor or Floor()
    seen: list = [None]  # the key's KeyValue as last read

    def attempt() -> bytes | None:
        current = seen[0]
        new = change(None if current is None else current.value)
        then = [] if new is None else [Put(key, new, run.lease)]  # writing nothing still compares
        orelse = [Get(key)]
        if receipt is not None and new is not None:
            then.append(Put(receipt, new, run.lease))
            orelse.append(Get(receipt))
        result = run.txn(Txn([absent(key) if current is None else mod_is(key, current.mod_revision)], then, orelse), floor)
        if result.succeeded:
            return new if new is not None else (None if current is None else current.value)
        if receipt is not None and new is not None and result.kv(1) is not None:
            return result.kv(1).value  # an earlier attempt's write committed
        seen[0] = result.kv(0)
        raise Conflict(key.decode(errors="replace"))

    try:
        return tenacity.Retrying(retry=tenacity.retry_if_exception_type(Conflict), wait=tenacity.wait_random(0, 0.02),
                                 stop=tenacity.stop_after_delay(timeout), reraise=True)(attempt)
    finally:
        if receipt is not None:
            with contextlib.suppress(Exception):  # it lapses with the run's lease anyway
                run.etcd.request(lambda c: c.delete(receipt), budget=0)


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class EtcdStore(dist.Store):
    """A ``torch.distributed.Store`` whose key ``k`` is ``<run>/store/k``, on the run's lease.
    Blocking reads wait on the process's cache and fail with ``DistStoreError`` after the store's
    timeout; ``add`` and ``append`` apply once even when retried after a lost response.
    ``release(run)`` is called once the store is collected, if it holds a use of the run."""

    def __init__(self, run: EtcdRun, timeout: timedelta | None = None, release: Callable[[EtcdRun], None] | None = None) -> None:
        super().__init__()
        self._run, self._floor, self.prefix = run, Floor(), run.keys.store
        if release is not None:
            weakref.finalize(self, release, run)
        if timeout is not None:
            self.set_timeout(timeout)

    def _key(self, key: str) -> bytes:
        return (self.prefix + key).encode()

    def set(self, key: str, value: str | bytes) -> None:
        self.multi_set([key], [value])

    def multi_set(self, keys: Sequence[str], values: Sequence[str | bytes]) -> None:
        if len(keys) != len(values):
            raise ValueError(f"multi_set got {len(keys)} keys but {len(values)} values.")
        self._run.txns([Put(self._key(k), _as_bytes(v), self._run.lease) for k, v in zip(keys, values)], self._floor)

    def get(self, key: str) -> bytes:
        return self._await([key], self.timeout)[0]

    def multi_get(self, keys: Sequence[str]) -> list[bytes]:
        return self._await(list(keys), self.timeout)

    def wait(self, keys: Sequence[str], timeout: timedelta | None = None) -> None:
        self._await(list(keys), self.timeout if timeout is None else timeout, read=False)

    def check(self, keys: Sequence[str]) -> bool:
        return len(self._read(list(keys))) == len(set(keys))

    def delete_key(self, key: str) -> bool:
        return bool(self._run.txn(Txn(then=[Delete(self._key(key))]), self._floor).deleted(0))

    def num_keys(self) -> int:
        return self._run.txn(Txn(then=[Get(*prefix_range(self.prefix), count_only=True)]), self._floor).count(0)

    # torch's C++ trampoline looks these up by their C++ names when a wrapper forwards to this store.
    deleteKey = delete_key
    getNumKeys = num_keys

    def has_extended_api(self) -> bool:
        return True

    def _swap(self, key: str, change: Callable[[bytes | None], bytes | None], once: bool = True) -> bytes | None:
        receipt = (self._run.keys.ops + uuid.uuid4().hex).encode() if once else None
        return compare_and_swap(self._run, self._key(key), change, self.timeout.total_seconds(), receipt, self._floor)

    def add(self, key: str, amount: int) -> int:
        """Add ``amount`` to the decimal integer at ``key`` (0 if absent); return the sum."""
        return int(self._swap(key, lambda old: str(int(old or b"0") + amount).encode()))

    def append(self, key: str, value: str | bytes) -> None:
        suffix = _as_bytes(value)
        self._swap(key, lambda old: (old or b"") + suffix)

    def compare_set(self, key: str, expected_value: str | bytes, desired_value: str | bytes) -> bytes:
        """TCPStore's: set ``desired_value`` if the key holds ``expected_value`` (or is absent and it
        is empty); the value held afterwards (``expected_value`` for a key absent still)."""
        expected, desired = _as_bytes(expected_value), _as_bytes(desired_value)
        current = self._swap(key, lambda old: desired if (old == expected if old is not None else not expected) else None, once=False)
        return expected if current is None else current

    def _read(self, keys: list[str]) -> dict[str, bytes]:
        """The values of those ``keys`` that exist, from etcd."""
        results = self._run.txns([Get(self._key(k)) for k in keys], self._floor)
        kvs = [result.kv(i) for result in results for i in range(len(result.responses))]
        return {key: kv.value for key, kv in zip(keys, kvs) if kv is not None}

    def _await(self, keys: list[str], timeout: timedelta, read: bool = True) -> list[bytes]:
        """Wait until every key exists: on the cache until it shows them, then read their values
        from etcd (``read``); without a current cache, read etcd whenever the cache may have news."""
        deadline = time.monotonic() + timeout.total_seconds()
        values: dict[str, bytes] = {}
        while missing := [key for key in keys if key not in values]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise dist.DistStoreError(
                    f"Timed out after {timeout.total_seconds():g}s waiting for the keys {missing} "
                    f"in the etcd store at '{self.prefix}'."
                )
            full = [self._key(key) for key in missing]
            shown = self._run.cache.wait_for("store", lambda c: all(c.get("store", k) for k in full), self._floor.revision, remaining)
            if shown and not read:
                return []
            if shown is not False:
                values.update(self._read(missing))
        return [values[key] for key in keys]
