"""Node liveness as keys on per-node leases: a node is alive while its key exists."""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from collections.abc import Collection

import etcd3
import etcd3.etcdrpc
import etcd3.transactions

from rdzv_common.backend import Liveness, LivenessLapsed, Token

from .keys import prefix_range
from .lease import refresh, revoke
from .run import EtcdRun, Floor, Seen


class _LeaseIs(etcd3.transactions.BaseCompare):
    """A transaction's compare on the lease a key is attached to (etcd3 offers none); a key that
    does not exist is attached to lease 0."""

    def build_compare(self, compare: etcd3.etcdrpc.Compare) -> None:
        compare.target = etcd3.etcdrpc.Compare.LEASE
        compare.lease = int(self.value)


class EtcdLiveness(Liveness):
    """``<run>/alive/<node_key>`` exists while ``node_key`` beats.

    The first ``beat`` grants a lease of ``ceil(ttl)`` seconds and puts the key on it; later beats
    only renew the lease, so a beat costs one keep-alive and no write. Once beats stop, etcd deletes
    the key when the lease expires (etcd rounds very short TTLs up to about two seconds).
    Beats also count as the run's activity for the run's lease, so a run that trains for days
    between rendezvous rounds keeps its keys.
    """

    def __init__(self, run: EtcdRun, floor: Floor) -> None:
        self._run = run
        self._floor = floor
        self._lock = threading.Lock()
        self._leases: dict[str, int] = {}

    def beat(self, node_key: str, ttl: float, timeout: float | None = None) -> None:
        lease_id = self._leases.get(node_key)

        def renew(client: etcd3.MultiEndpointEtcd3Client, _: int) -> Seen[bool]:
            return Seen(lease_id is not None and refresh(client, lease_id, ttl))

        if self._run.write(renew, self._floor, timeout):
            return
        key = self._run.keys.alive_key(node_key)
        value = json.dumps(
            {"node": node_key, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        )

        def grant_and_put(client: etcd3.MultiEndpointEtcd3Client, _: int) -> Seen[int]:
            # A retry after a failed put grants afresh; the orphaned lease lapses on its own.
            new_id = client.lease(max(1, math.ceil(ttl))).id
            revision = client.put(key, value, lease=new_id).header.revision
            return Seen(new_id, revision)

        new_id = self._run.write(grant_and_put, self._floor, timeout)
        with self._lock:
            self._leases[node_key] = new_id

    def alive(self, node_keys: Collection[str], ttl: float, current: bool = False) -> set[str]:
        """Which nodes have a liveness key, from the process's run view when it can vouch for it
        and ``current`` is not asked for, else from etcd.

        A node beats before it announces itself, so a view that holds a node's announcement (this
        node's floor covers every record it read) holds its liveness key too. A view may still
        trail the deletes of other nodes' keys (a lapse is no write of this node's); ``current``
        reads etcd itself."""
        start, end = prefix_range(self._run.keys.alive)

        def from_etcd() -> set[str]:
            def get(client: etcd3.MultiEndpointEtcd3Client) -> Seen[set[str]]:
                response = client.get_range_response(start, end, keys_only=True)
                present = {self._run.keys.node_of(kv.key) for kv in response.kvs} - {None}
                return Seen(present, max((kv.mod_revision for kv in response.kvs), default=0))

            return self._run.read(get, self._floor, shared="alive").intersection(node_keys)

        if current:
            return from_etcd()
        return self._run.viewed(lambda view, floor: view.alive(node_keys, floor), from_etcd, self._floor)

    def held_since(self, node_key: str, token: Token, since: float) -> bool:
        """From revisions: the node's liveness key, as the run's view at ``token`` or later (or
        etcd now) shows it, was created at or before the write of ``token`` and is still on the
        lease the node beats: it existed from that write until the revision looked at, to which
        this node's floor is raised (what it has seen)."""
        if not isinstance(token, int):
            return False
        key = self._run.keys.alive_key(node_key)

        def from_etcd() -> tuple[tuple[int, int] | None, int]:
            def get(client: etcd3.MultiEndpointEtcd3Client) -> Seen[tuple[tuple[int, int] | None, int]]:
                response = client.get_response(key)
                kv = response.kvs[0] if response.kvs else None
                found = (kv.create_revision, kv.lease) if kv is not None else None
                return Seen((found, kv.mod_revision if kv is not None else 0))

            return self._run.read(get, self._floor)

        found, at = self._run.viewed(
            lambda view, floor: view.liveness_of(node_key, max(floor, token)), from_etcd, self._floor
        )
        self._floor.raise_to(max(token, at))
        return found is not None and found[0] <= token and found[1] == self._leases.get(node_key)

    def member_compare(self, node_key: str) -> tuple[bytes, etcd3.transactions.BaseCompare]:
        """The node's liveness key and the compare that holds while it is on the lease the node
        beats: a write carrying it lands only while the node is alive.

        Raises:
            LivenessLapsed: the node has no liveness (it never beat, or it lapsed).
        """
        lease_id = self._leases.get(node_key)
        if lease_id is None:
            raise LivenessLapsed(f"the node '{node_key}' has no liveness in run '{self._run.run_id}'")
        key = self._run.keys.alive_key(node_key).encode()
        return key, _LeaseIs(key) == lease_id

    def lapsed(self, node_key: str, lease_id: int) -> None:
        """Forget ``lease_id``, found gone or no longer on the node's key: the next beat grants a
        new lease and puts the key again (renewing it would leave the node without a key)."""
        with self._lock:
            if self._leases.get(node_key) == lease_id:
                del self._leases[node_key]

    def forget(self, node_key: str) -> None:
        """Delete the node's key, so the whole process sees it gone at once, and revoke its lease."""
        with self._lock:
            lease_id = self._leases.pop(node_key, None)
        key = self._run.keys.alive_key(node_key)

        def delete(client: etcd3.MultiEndpointEtcd3Client, _: int) -> Seen[None]:
            response = client.delete(key, return_response=True)
            return Seen(None, response.header.revision if response.deleted else 0)

        self._run.write(delete, self._floor)
        if lease_id is not None:
            revoke(self._run.etcd, lease_id)

    def close(self) -> None:
        """Revoke the lease of every node this backend beats for."""
        with self._lock:
            leases, self._leases = list(self._leases.values()), {}
        for lease_id in leases:
            revoke(self._run.etcd, lease_id)
