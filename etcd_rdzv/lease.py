"""Leases: a process's session lease, kept alive in the background, and a run's shared lease,
kept alive by activity."""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time

import etcd3
import etcd3.exceptions
from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from .client import EtcdClient, Retryable, rpc_error
from .config import EtcdConfig
from .shared import Shared

logger = logging.getLogger(__name__)

# Long enough to ride out a leader election, short enough that a dead node's keys go soon.
SESSION_TTL = 10


def refresh(client: etcd3.MultiEndpointEtcd3Client, lease_id: int) -> bool:
    """Renew the lease once; ``False`` if it no longer exists (expired or revoked)."""
    responses = list(client.refresh_lease(lease_id))
    return bool(responses) and responses[0].TTL > 0


def is_lease_missing(exc: BaseException) -> bool:
    """Whether etcd refused a write because the lease it names is gone."""
    rpc = rpc_error(exc)
    return rpc is not None and "requested lease not found" in (rpc.details() or "")


def revoke(etcd: EtcdClient, lease_id: int) -> None:
    """Revoke a lease with one attempt; a lease that is already gone, or an etcd that cannot be
    reached, is logged, since its TTL ends it anyway."""
    try:
        etcd.request(lambda c: c.revoke_lease(lease_id), budget=0)
    except RendezvousConnectionError as exc:
        logger.debug("Could not revoke etcd lease %x: %s", lease_id, exc)


class Session:
    """A lease that a background thread keeps alive until ``close``, like the Go client's
    ``concurrency.Session``: keys attached to it vanish ``ttl`` seconds after this process dies, or
    at once when it closes. The backends of a process share one per cluster (``sessions``).

    The lease is granted on first use. If it is lost anyway (the process stalled past its TTL),
    the next use grants a new one. The session owns ``etcd`` and closes it.
    """

    def __init__(self, etcd: EtcdClient, ttl: int = SESSION_TTL) -> None:
        self._etcd = etcd
        self._ttl = ttl
        self._lock = threading.Lock()
        self._lease_id: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def lease_id(self, client: etcd3.MultiEndpointEtcd3Client) -> int:
        """The session's lease, granted through ``client`` if needed; call it within a request."""
        with self._lock:
            if self._stop.is_set():
                raise RuntimeError("The etcd session is closed.")
            if self._lease_id is None:
                self._lease_id = client.lease(self._ttl).id
                if self._thread is None:
                    self._thread = threading.Thread(target=self._keep_alive, name="EtcdSessionKeepAlive", daemon=True)
                    self._thread.start()
            return self._lease_id

    def lost(self, lease_id: int) -> None:
        """Forget ``lease_id`` after etcd said it is gone; raises ``Retryable`` to redo the request."""
        with self._lock:
            if self._lease_id == lease_id:
                self._lease_id = None
        raise Retryable(f"session lease {lease_id:x} expired")

    def _keep_alive(self) -> None:
        while not self._stop.wait(self._ttl / 3):
            lease_id = self._lease_id
            if lease_id is None:
                continue
            try:
                if not refresh(self._etcd.raw, lease_id):
                    with self._lock:
                        if self._lease_id == lease_id:
                            self._lease_id = None
            except Exception as exc:
                # The next tick tries again; the TTL leaves room for two more.
                logger.warning("Could not renew etcd session lease %x: %s", lease_id, exc)

    def close(self) -> None:
        """Stop renewing, revoke the lease and close the client. Idempotent."""
        with self._lock:
            self._stop.set()
            lease_id, self._lease_id = self._lease_id, None
        try:
            if self._thread is not None:
                self._thread.join(timeout=self._etcd.config.read_timeout)
            if lease_id is not None:
                revoke(self._etcd, lease_id)
        finally:
            self._etcd.close()


# One session per cluster in the process.
sessions: Shared[EtcdConfig, Session] = Shared(lambda config: Session(EtcdClient(config)), Session.close)


def run_lease_id(run_key: str) -> int:
    """The lease id every node of the run at ``run_key`` uses: a positive 63-bit hash of the key."""
    digest = int.from_bytes(hashlib.sha256(run_key.encode()).digest()[:8], "big")
    return (digest & (2**63 - 1)) or 1


class RunLease:
    """The lease that every key of one run is attached to, so that the run leaves nothing behind.

    All nodes of the run share it without coordination: its id derives from the run's state key
    (``run_lease_id``). Each node's activity renews it, at most every ``ttl / 4`` seconds, and no
    node revokes it, so the run's keys vanish ``ttl`` seconds after the whole run went quiet.
    """

    # Renewal times are per process and lease id, so the handlers of one process renew once.
    _lock = threading.Lock()
    _renewed_at: dict[int, float] = {}

    def __init__(self, run_key: str, ttl: float) -> None:
        self.id = run_lease_id(run_key)
        self._ttl = max(1, math.ceil(ttl))

    def current(self, client: etcd3.MultiEndpointEtcd3Client) -> int:
        """The lease id, granted first if this process has not confirmed it yet and renewed when
        due; call within a request.

        Only the first use in a process waits for the server: a renewal that falls due later is
        claimed by one caller while the others go on, since the lease still has most of its TTL.
        """
        with RunLease._lock:
            renewed_at = RunLease._renewed_at.get(self.id)
            if renewed_at is not None:
                if time.monotonic() - renewed_at < self._ttl / 4:
                    return self.id
                RunLease._renewed_at[self.id] = time.monotonic()
        if renewed_at is not None:
            self._renew(client)
            return self.id
        with RunLease._lock:
            if self.id not in RunLease._renewed_at:
                self._renew(client)
                RunLease._renewed_at[self.id] = time.monotonic()
        return self.id

    def _renew(self, client: etcd3.MultiEndpointEtcd3Client) -> None:
        if not refresh(client, self.id):
            try:
                client.lease(self._ttl, lease_id=self.id)
            except etcd3.exceptions.PreconditionFailedError:
                pass  # another node granted it first

    def lost(self) -> None:
        """Have the next ``current`` grant the lease again; raises ``Retryable`` to redo the request."""
        with RunLease._lock:
            RunLease._renewed_at.pop(self.id, None)
        raise Retryable(f"run lease {self.id:x} expired")
