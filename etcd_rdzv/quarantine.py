"""Quarantined hosts: a key per host on a lease of its cool-down, so that etcd ends the quarantine
itself; a key per liveness lapse on a lease of the counting window."""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

from rdzv_common.backend import Quarantine, QuarantineEntry
from rdzv_common.codec import decode_quarantine_entry, encode_quarantine_entry

from .keys import prefix_range
from .run import EtcdRun, Floor
from .runtime.lessor import grant, revoke
from .runtime.txn import Delete, Get, Put, Txn


def decode_entry(kv: Any) -> QuarantineEntry | None:
    """The entry of a quarantine key, ``None`` once ended (etcd rounds its lease's TTL up to whole
    seconds); ``RendezvousStateError`` naming the key if the value is not an entry."""
    entry = decode_quarantine_entry(kv.value, kv.key.decode(errors="replace"))
    return entry if entry.until > time.time() else None


class EtcdQuarantine(Quarantine):
    """``<run>/quarantine/<host>``; ``get`` answers from the cache, the rest ask etcd."""

    def __init__(self, run: EtcdRun, floor: Floor) -> None:
        self._run, self._floor = run, floor

    def _with_lease(self, ttl: float, then: list, key: bytes, value: bytes) -> Any:
        lease_id = grant(self._run.etcd, ttl)
        return self._run.txn(Txn(then=[Put(key, value, lease_id), *then]), self._floor)

    def put(self, entry: QuarantineEntry) -> None:
        key = self._run.keys.quarantine_key(entry.host).encode()
        self._with_lease(entry.until - time.time(), [], key, encode_quarantine_entry(entry))

    def get(self, host: str) -> QuarantineEntry | None:
        """From the cache when it can vouch for this node's floor (admission asks once per join)."""
        key = self._run.keys.quarantine_key(host).encode()
        kv = self._run.cache.answer(
            lambda cache: cache.get("quarantine", key),
            lambda: self._run.cache.fetch(Txn(then=[Get(key)]), self._floor, ("quarantine", key)).kv(0),
            self._floor,
        )
        return None if kv is None else decode_entry(kv)

    def remove(self, host: str) -> None:
        key = self._run.keys.quarantine_key(host).encode()
        gone = self._run.txn(Txn(then=[Delete(key, prev_kv=True)]), self._floor).prev_kvs(0)
        if gone and gone[0].lease:
            revoke(self._run.etcd, gone[0].lease)

    def entries(self) -> list[QuarantineEntry]:
        found = self._run.txn(Txn(then=[Get(*prefix_range(self._run.keys.quarantine))]), self._floor).kvs(0)
        return sorted(filter(None, map(decode_entry, found)), key=lambda e: e.host)

    def note_lapse(self, host: str, window: float) -> int:
        directory = self._run.keys.lapses_of(host)
        now = time.time()
        key = (directory + uuid.uuid4().hex).encode()
        lapses = self._with_lease(window, [Get(*prefix_range(directory))], key, repr(now).encode()).kvs(1)
        # A record's lease is the window of the call that wrote it; a shorter window counts by time.
        return sum(1 for kv in lapses if now - _float(kv.value) < window)


def _float(value: bytes) -> float:
    try:
        return float(value)
    except ValueError:
        return -math.inf
