"""Lease helpers, and a run's shared lease, kept alive by the run's activity (a process's session
lease is in ``session.py``)."""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time

import etcd3
import etcd3.exceptions
import grpc
from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from .client import EtcdClient, Retryable, rpc_error

logger = logging.getLogger(__name__)


def refresh(client: etcd3.MultiEndpointEtcd3Client, lease_id: int, ttl: float | None = None) -> bool:
    """Renew the lease once; ``False`` if it no longer exists (expired or revoked). ``ttl``: the
    lease's TTL, when the caller knows it: a renewal on a connection that went silent is then sent
    again on a new one well before the lease would lapse (``silence.py``)."""
    responses = list(client.refresh_lease(lease_id, ttl) if ttl is not None else client.refresh_lease(lease_id))
    return bool(responses) and responses[0].TTL > 0


def is_lease_missing(exc: BaseException) -> bool:
    """Whether etcd refused a write because the lease it names is gone (etcd's only NOT_FOUND)."""
    rpc = rpc_error(exc)
    return rpc is not None and rpc.code() == grpc.StatusCode.NOT_FOUND


def revoke(etcd: EtcdClient, lease_id: int) -> None:
    """Revoke a lease with one attempt; a lease that is already gone, or an etcd that cannot be
    reached, is logged, since its TTL ends it anyway."""
    try:
        etcd.request(lambda c: c.revoke_lease(lease_id), budget=0)
    except RendezvousConnectionError as exc:
        logger.debug("Could not revoke etcd lease %x: %s", lease_id, exc)


def run_lease_id(run_key: str) -> int:
    """The lease id every node of the run at ``run_key`` uses: a positive 63-bit hash of the key."""
    digest = int.from_bytes(hashlib.sha256(run_key.encode()).digest()[:8], "big")
    return (digest & (2**63 - 1)) or 1


class RunLease:
    """The lease that every key of one run is attached to, so that the run leaves nothing behind.

    All nodes of the run share it without coordination: its id derives from the run's state key
    (``run_lease_id``). Each node's activity renews it, at most every ``ttl / 4`` seconds, and no
    node revokes it, so the run's keys vanish ``ttl`` seconds after the whole run went quiet. The
    process's one ``EtcdRun`` of the run holds it, so the handlers of one process renew it once.
    """

    def __init__(self, run_key: str, ttl: float) -> None:
        self.id = run_lease_id(run_key)
        self._ttl = max(1, math.ceil(ttl))
        self._lock = threading.Lock()
        self._renewed_at: float | None = None

    def current(self, client: etcd3.MultiEndpointEtcd3Client) -> int:
        """The lease id, granted first if this process has not confirmed it yet and renewed when
        due; call within a request.

        Only the first use in a process waits for the server: a renewal that falls due later is
        claimed by one caller while the others go on, since the lease still has most of its TTL.
        """
        with self._lock:
            renewed_at = self._renewed_at
            if renewed_at is not None:
                if time.monotonic() - renewed_at < self._ttl / 4:
                    return self.id
                self._renewed_at = time.monotonic()
        if renewed_at is not None:
            self._renew(client)
            return self.id
        with self._lock:
            if self._renewed_at is None:
                self._renew(client)
                self._renewed_at = time.monotonic()
        return self.id

    def _renew(self, client: etcd3.MultiEndpointEtcd3Client) -> None:
        if not refresh(client, self.id):
            try:
                client.lease(self._ttl, lease_id=self.id)
            except etcd3.exceptions.PreconditionFailedError:
                pass  # another node granted it first

    def lost(self) -> None:
        """Have the next ``current`` grant the lease again; raises ``Retryable`` to redo the request."""
        with self._lock:
            self._renewed_at = None
        raise Retryable(f"run lease {self.id:x} expired")
