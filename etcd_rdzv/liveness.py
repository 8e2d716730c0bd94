"""Node liveness as keys on per-node leases: a node is alive while its key exists."""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from collections.abc import Collection

import etcd3.utils

from rdzv_common.backend import Liveness

from .client import EtcdClient
from .lease import RunLease, refresh, revoke
from .runview import ViewBehind, ViewReader


class EtcdLiveness(Liveness):
    """``<prefix><node_key>`` exists while ``node_key`` beats.

    The first ``beat`` grants a lease of ``ceil(ttl)`` seconds and puts the key on it; later beats
    only renew the lease, so a beat costs one keep-alive and no write. Once beats stop, etcd deletes
    the key when the lease expires (etcd rounds very short TTLs up to about two seconds).
    Beats also count as the run's activity for ``run_lease``, so a run that trains for days between
    rendezvous rounds keeps its keys.
    """

    def __init__(self, etcd: EtcdClient, prefix: str, run_lease: RunLease, reader: ViewReader) -> None:
        self._etcd = etcd
        self._prefix = prefix
        self._run_lease = run_lease
        self._reader = reader
        self._lock = threading.Lock()
        self._leases: dict[str, int] = {}
        self._beat_revision = 0  # revision of this backend's latest liveness put

    def beat(self, node_key: str, ttl: float) -> None:
        lease_id = self._leases.get(node_key)

        def renew(client: etcd3.MultiEndpointEtcd3Client) -> bool:
            self._run_lease.current(client)
            return lease_id is not None and refresh(client, lease_id)

        if self._etcd.request(renew):
            return
        value = json.dumps(
            {"node": node_key, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        )

        def grant_and_put(client: etcd3.MultiEndpointEtcd3Client) -> tuple[int, int]:
            # A retry after a failed put grants afresh; the orphaned lease lapses on its own.
            lease_id = client.lease(max(1, math.ceil(ttl))).id
            return lease_id, client.put(self._prefix + node_key, value, lease=lease_id).header.revision

        new_id, revision = self._etcd.request(grant_and_put)
        with self._lock:
            self._leases[node_key] = new_id
            self._beat_revision = max(self._beat_revision, revision)

    def alive(self, node_keys: Collection[str], ttl: float) -> set[str]:
        """Which nodes have a liveness key, from the process's run view when it is current.

        The view must have caught up with this backend's own beats, but the rest of the process
        need not wait for them: a node never asks about its own liveness, and another node's key
        is in any view that holds that node's join (it beats before it posts).
        """
        try:
            return self._reader.view().alive(node_keys, self._beat_revision)
        except ViewBehind:
            pass
        prefix = self._prefix.encode()
        response = self._etcd.request(
            lambda c: c.get_range_response(prefix, etcd3.utils.prefix_range_end(prefix), keys_only=True)
        )
        present = {kv.key[len(prefix) :].decode() for kv in response.kvs}
        return present.intersection(node_keys)

    def forget(self, node_key: str) -> None:
        """Delete the node's key, so the whole process sees it gone at once, and revoke its lease."""
        with self._lock:
            lease_id = self._leases.pop(node_key, None)
        response = self._etcd.request(lambda c: c.delete(self._prefix + node_key, return_response=True))
        if response.deleted:
            self._reader.saw(response.header.revision)
        if lease_id is not None:
            revoke(self._etcd, lease_id)

    def close(self) -> None:
        """Revoke the lease of every node this process beats for."""
        with self._lock:
            leases, self._leases = list(self._leases.values()), {}
        for lease_id in leases:
            revoke(self._etcd, lease_id)
