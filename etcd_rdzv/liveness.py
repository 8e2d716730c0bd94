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

from rdzv_common.backend import Liveness

from .keys import prefix_range
from .lease import refresh, revoke
from .run import EtcdRun, Floor, Seen


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
                present = {self._run.keys.node_of(kv.key) for kv in response.kvs}
                return Seen(present, max((kv.mod_revision for kv in response.kvs), default=0))

            return self._run.read(get, self._floor, shared="alive").intersection(node_keys)

        if current:
            return from_etcd()
        return self._run.viewed(lambda view, floor: view.alive(node_keys, floor), from_etcd, self._floor)

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
