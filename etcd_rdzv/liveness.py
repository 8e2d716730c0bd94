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
from .runtime.client import FailoverClient
from .runtime.lessor import grant, grant_within, refresh, revoke
from .runtime.txn import Delete, Get, Put, Txn


class NodeLease:
    """A node's liveness lease as the lease of a write (a ``txn.Put``'s): the lease it beats, or,
    when etcd lost that one, a new one, whose key the node's next beat puts."""

    def __init__(self, liveness: EtcdLiveness, node_key: str) -> None:
        self._liveness, self._node = liveness, node_key

    def current(self, client: FailoverClient) -> int:
        return self._liveness.lease_for_write(self._node, client)

    def lost(self, lease_id: int) -> None:
        self._liveness.lapsed(self._node, lease_id)


class EtcdLiveness(Liveness):
    """``<run>/alive/<node_key>`` exists while the node beats: its first beat grants a lease of
    ``ceil(ttl)`` seconds and puts the key on it, or, ``announcing`` a post, leaves the put to that
    post's transaction (``first_put``: one lease grant and one transaction a join); later beats
    renew the lease (and the run's), putting a key still not put. etcd deletes the key with the
    lease once beats stop (it rounds very short TTLs up to about two seconds)."""

    def __init__(self, run: EtcdRun, floor: Floor) -> None:
        self._run, self._floor = run, floor
        self._lock = threading.Lock()
        self._leases: dict[str, int] = {}
        self._ttls: dict[str, float] = {}
        self._unput: set[str] = set()  # nodes whose lease is granted and key not put yet

    def beat(self, node_key: str, ttl: float, timeout: float | None = None, announcing: bool = False) -> None:
        run, lease_id = self._run, self._leases.get(node_key)
        self._ttls[node_key] = ttl
        renewed = lease_id is not None and run.etcd.request(
            lambda c: run.lease.current(c) and refresh(c, lease_id, ttl), timeout)
        if renewed and node_key not in self._unput:
            return
        if not renewed:
            lease_id = grant(run.etcd, ttl, timeout)
            with self._lock:
                self._leases[node_key] = lease_id
                if announcing:
                    self._unput.add(node_key)
                    return
        # On the node's lease as an object: one that lapsed before the put (a busy etcd can take a
        # TTL to answer) is granted anew, not a failure.
        run.txn(Txn(then=[self._put(node_key, NodeLease(self, node_key))]), self._floor, timeout)
        self.put_done(node_key)

    def lease_of(self, node_key: str) -> NodeLease | None:
        """The node's lease, for a write of its own to go on; ``None`` if it never beat here."""
        return NodeLease(self, node_key) if node_key in self._ttls else None

    def lease_for_write(self, node_key: str, client: FailoverClient) -> int:
        """The lease the node beats; one granted now if etcd lost it (call within a request)."""
        with self._lock:
            lease_id = self._leases.get(node_key)
        if lease_id is None:
            lease_id = grant_within(client, self._ttls[node_key])
            with self._lock:
                self._leases[node_key] = lease_id
                self._unput.add(node_key)
        return lease_id

    def first_put(self, node_key: str, lease: NodeLease) -> list[Put]:
        """The put of the node's key on ``lease``, for its post to carry, while that key is not put."""
        with self._lock:
            return [self._put(node_key, lease)] if node_key in self._unput else []

    def put_done(self, node_key: str) -> None:
        """The node's key is put (by ``first_put``'s transaction, or a beat)."""
        with self._lock:
            self._unput.discard(node_key)

    def _put(self, node_key: str, lease: int | NodeLease) -> Put:
        value = json.dumps({"node": node_key, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})
        return Put(self._run.keys.alive_key(node_key).encode(), value.encode(), lease)

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
