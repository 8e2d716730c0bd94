"""A process's session with one etcd cluster: a lease kept alive in the background, like the Go
client's ``concurrency.Session``. Keys attached to it vanish ``ttl`` seconds after the process
dies, or at once when the session closes."""

from __future__ import annotations

import logging
import threading

from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from .client import EtcdClient
from .lease import refresh, revoke

logger = logging.getLogger(__name__)

# Long enough to ride out a leader election, short enough that a dead node's keys go soon.
SESSION_TTL = 10


class Session:
    """The session lease of one process on one cluster (``Cluster`` owns it, ``close`` ends it).

    The lease is granted on first use and renewed every ``ttl / 3`` seconds by a thread of its own.
    If it is lost anyway (the process stalled past its TTL, or etcd was away that long), the next
    use grants a new one. Renewal failures are logged when the session's health changes (lost, then
    back), not at every attempt, so a long etcd outage does not flood the log.
    """

    def __init__(self, etcd: EtcdClient, ttl: int = SESSION_TTL) -> None:
        self._etcd = etcd
        self._ttl = ttl
        self._lock = threading.Lock()
        self._lease_id: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def lease_id(self, client: object) -> int:
        """The session's lease, granted through ``client`` if needed; call it within a request."""
        with self._lock:
            if self._stop.is_set():
                raise RuntimeError("The etcd session is closed.")
            if self._lease_id is None:
                self._lease_id = client.lease(self._ttl).id
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._keep_alive, name="etcd-rdzv-session", daemon=True
                    )
                    self._thread.start()
            return self._lease_id

    def lost(self, lease_id: int) -> None:
        """Forget ``lease_id`` after etcd said it is gone; the next ``lease_id`` grants anew."""
        with self._lock:
            if self._lease_id == lease_id:
                self._lease_id = None

    def _keep_alive(self) -> None:
        while not self._stop.wait(self._ttl / 3):
            lease_id = self._lease_id
            if lease_id is None:
                continue
            try:
                # One attempt: a renewal whose connection went silent has the client dial a new
                # one (``silence.py``), on which the next tick renews, with the TTL to spare.
                alive = self._etcd.request(lambda c: refresh(c, lease_id, self._ttl), budget=0)
            except RendezvousConnectionError as exc:
                if self._stop.is_set():
                    return  # closed (with its client) while renewing
                # The next tick tries again; the TTL leaves room for two more.
                self._report(True, f"Could not renew etcd session lease {lease_id:x}: {exc}")
                continue
            self._report(False, f"Renewed etcd session lease {lease_id:x} again.")
            if not alive:
                self.lost(lease_id)

    def _report(self, failing: bool, message: str) -> None:
        # Not a warning: a renewal fails only with etcd out of reach, which the client warns of.
        if failing != self._failing:
            self._failing = failing
            logger.info(message)

    def close(self) -> None:
        """Stop renewing and revoke the lease. Idempotent."""
        with self._lock:
            self._stop.set()
            lease_id, self._lease_id = self._lease_id, None
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self._etcd.config.read_timeout)
        if lease_id is not None:
            revoke(self._etcd, lease_id)
