"""Quarantined hosts in etcd: one key per host on a lease whose TTL is the cool-down, so that etcd
itself ends the quarantine; and one key per liveness lapse on a lease of the counting window."""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

import etcd3

from rdzv_common.backend import Quarantine, QuarantineEntry
from rdzv_common.codec import decode_quarantine_entry, encode_quarantine_entry

from .keys import prefix_range
from .lease import revoke
from .run import EtcdRun, Floor, Seen


def decode_entry(kv: Any) -> QuarantineEntry | None:
    """The entry a quarantine key holds, ``None`` if it has ended (its lease may outlive ``until``
    by etcd's rounding of TTLs up to whole seconds).

    Raises:
        RendezvousStateError: the value is not an entry; names the key.
    """
    entry = decode_quarantine_entry(kv.value, kv.key.decode(errors="replace"))
    return entry if entry.until > time.time() else None


class EtcdQuarantine(Quarantine):
    """``<run>/quarantine/<host>``; ``get`` answers from the run view, the rest ask etcd."""

    def __init__(self, run: EtcdRun, floor: Floor) -> None:
        self._run = run
        self._floor = floor

    def put(self, entry: QuarantineEntry) -> None:
        key = self._run.keys.quarantine_key(entry.host)
        ttl = max(1, math.ceil(entry.until - time.time()))

        def grant_and_put(client: etcd3.MultiEndpointEtcd3Client, _: int) -> Seen[None]:
            lease_id = client.lease(ttl).id
            return Seen(None, client.put(key, encode_quarantine_entry(entry), lease=lease_id).header.revision)

        self._run.write(grant_and_put, self._floor)

    def get(self, host: str) -> QuarantineEntry | None:
        """From the process's run view when it can vouch for this node's floor (admission asks
        once per join, so a large process would otherwise ask etcd once per node)."""
        key = self._run.keys.quarantine_key(host)

        def from_etcd() -> Any:
            def get(client: etcd3.MultiEndpointEtcd3Client) -> Seen[Any]:
                response = client.get_response(key)
                kv = response.kvs[0] if response.kvs else None
                return Seen(kv, kv.mod_revision if kv else 0)

            return self._run.read(get, self._floor, shared=("quarantine", key))

        kv = self._run.viewed(lambda view, floor: view.quarantine_entry(key.encode(), floor), from_etcd, self._floor)
        return None if kv is None else decode_entry(kv)

    def remove(self, host: str) -> None:
        key = self._run.keys.quarantine_key(host)

        def delete(client: etcd3.MultiEndpointEtcd3Client, _: int) -> Seen[int]:
            response = client.delete(key, return_response=True, prev_kv=True)
            lease = response.prev_kvs[0].lease if response.prev_kvs else 0
            return Seen(lease, response.header.revision if response.deleted else 0)

        lease_id = self._run.write(delete, self._floor)
        if lease_id:
            revoke(self._run.etcd, lease_id)

    def entries(self) -> list[QuarantineEntry]:
        start, end = prefix_range(self._run.keys.quarantine)

        def get(client: etcd3.MultiEndpointEtcd3Client) -> Seen[list]:
            response = client.get_range_response(start, end)
            return Seen(list(response.kvs), max((kv.mod_revision for kv in response.kvs), default=0))

        found = [decode_entry(kv) for kv in self._run.read(get, self._floor)]
        return sorted((e for e in found if e is not None), key=lambda e: e.host)

    def note_lapse(self, host: str, window: float) -> int:
        directory = self._run.keys.lapses_of(host)
        key = directory + uuid.uuid4().hex
        start, end = prefix_range(directory)
        ttl = max(1, math.ceil(window))

        def put_and_read(client: etcd3.MultiEndpointEtcd3Client, _: int) -> Seen[list[bytes]]:
            lease_id = client.lease(ttl).id
            revision = client.put(key, repr(now), lease=lease_id).header.revision
            return Seen([kv.value for kv in client.get_range_response(start, end).kvs], revision)

        now = time.time()
        # A record's lease is the window of the call that wrote it; a shorter window counts by time.
        return sum(1 for value in self._run.write(put_and_read, self._floor) if now - _float(value) < window)


def _float(value: bytes) -> float:
    try:
        return float(value)
    except ValueError:
        return -math.inf
