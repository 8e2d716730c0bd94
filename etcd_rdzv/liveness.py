"""Node liveness as keys on per-node leases: a node is alive while its key exists."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Collection

from rdzv_common.backend import Liveness, LivenessLapsed, Token

from .keys import node_of, prefix_range
from .run import EtcdRun, Floor
from .runtime.lessor import grant, refresh, revoke
from .runtime.txn import Delete, Get, Put, Txn


class EtcdLiveness(Liveness):
    """``<run>/alive/<node_key>`` exists while the node beats: the first beat puts it on a new lease
    of ``ceil(ttl)`` seconds, later beats renew that lease (and the run's); etcd deletes the key
    with the lease once beats stop (it rounds very short TTLs up to about two seconds)."""

    def __init__(self, run: EtcdRun, floor: Floor) -> None:
        self._run, self._floor = run, floor
        self._lock = threading.Lock()
        self._leases: dict[str, int] = {}

    def beat(self, node_key: str, ttl: float, timeout: float | None = None) -> None:
        run, lease_id = self._run, self._leases.get(node_key)
        if lease_id is not None and run.etcd.request(lambda c: run.lease.current(c) and refresh(c, lease_id, ttl), timeout):
            return
        new_id = grant(run.etcd, ttl, timeout)
        value = json.dumps({"node": node_key, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})
        run.txn(Txn(then=[Put(run.keys.alive_key(node_key).encode(), value.encode(), new_id)]), self._floor, timeout)
        with self._lock:
            self._leases[node_key] = new_id

    def alive(self, node_keys: Collection[str], ttl: float, current: bool = False) -> set[str]:
        """Which nodes have a liveness key: from the cache when it can vouch for this node's floor
        (a node beats before it announces), from etcd when ``current`` (the cache may trail a lapse)."""
        request = Txn(then=[Get(*prefix_range(self._run.keys.alive), keys_only=True)])
        prefix = len(self._run.keys.alive)

        def from_etcd() -> set[str]:
            found = self._run.cache.fetch(request, self._floor, "alive").kvs(0)
            return {node_of(kv.key[prefix:]) for kv in found} - {None}

        wanted = set(node_keys)
        if current:
            return from_etcd() & wanted
        return self._run.cache.answer(lambda cache: cache.ids("alive") & wanted, lambda: from_etcd() & wanted, self._floor)

    def held_since(self, node_key: str, token: Token, since: float) -> bool:
        """From revisions: the node's key (cache at ``token`` or later, or etcd) was created by the
        write of ``token`` and is on the lease the node beats, so it existed from then on."""
        if not isinstance(token, int):
            return False
        key = self._run.keys.alive_key(node_key).encode()
        kv = self._run.cache.answer(lambda cache: cache.get("alive", node_key),
                                    lambda: self._run.txn(Txn(then=[Get(key)]), self._floor).kv(0), self._floor, token)
        return kv is not None and kv.create_revision <= token and kv.lease == self._leases.get(node_key)

    def member_lease(self, node_key: str) -> tuple[bytes, int]:
        """The node's liveness key and the lease it beats, for a write that lands only while the
        node is alive; ``LivenessLapsed`` if it has none (it never beat, or it lapsed)."""
        lease_id = self._leases.get(node_key)
        if lease_id is None:
            raise LivenessLapsed(f"the node '{node_key}' has no liveness in run '{self._run.run_id}'")
        return self._run.keys.alive_key(node_key).encode(), lease_id

    def lapsed(self, node_key: str, lease_id: int) -> None:
        """Forget ``lease_id``, gone or off the node's key: the next beat puts the key on a new one."""
        with self._lock:
            if self._leases.get(node_key) == lease_id:
                del self._leases[node_key]

    def forget(self, node_key: str) -> None:
        """Delete the node's key, so the whole process sees it gone at once, and revoke its lease."""
        with self._lock:
            lease_id = self._leases.pop(node_key, None)
        self._run.txn(Txn(then=[Delete(self._run.keys.alive_key(node_key).encode())]), self._floor)
        if lease_id is not None:
            revoke(self._run.etcd, lease_id)

    def close(self) -> None:
        """Revoke the lease of every node this backend beats for."""
        with self._lock:
            leases, self._leases = list(self._leases.values()), {}
        for lease_id in leases:
            revoke(self._run.etcd, lease_id)
