"""``EtcdRun``: everything a process knows and holds of one run on one etcd cluster.

One object per (cluster, run) per process (``registry.py``), passed explicitly to the backend,
mailbox, liveness and store of every handler of the process that takes part in the run. It owns the
run's key layout (``keys``), its shared lease, the one watch-fed view of its keys, and the
read-your-writes rule:

    No decision may rest on a read older than what the deciding node has already written or
    read of the run.

Every request of the run goes through ``write`` or ``read``, whose operations hand back, with their
result, the newest revision of the run's keys they wrote or saw; the run raises the caller's
``Floor`` to it, and ``viewed`` answers from the view only what the view can vouch for at that
floor (``RunView``). No caller has to remember to report what it saw. Floors are per node, not per
process: a node waits for the view to show its own writes, never for the hundreds of other nodes of
a large process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

import etcd3

from .client import EtcdClient
from .keys import RunKeys
from .lease import RunLease, is_lease_missing
from .session import Session
from .shared_reads import SharedReads
from .view import RunView, ViewBehind

T = TypeVar("T")


class Floor:
    """The newest revision of the run's keys that one user of the run (a node's backend, a store)
    has written or read; ``EtcdRun`` raises it, and reads from the view must be at least as new."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._revision = 0

    @property
    def revision(self) -> int:
        with self._lock:
            return self._revision

    def raise_to(self, revision: int) -> None:
        with self._lock:
            self._revision = max(self._revision, revision)


@dataclass(frozen=True)
class Seen(Generic[T]):
    """What one request of the run returns: its ``value``, and the newest ``revision`` of the run's
    keys it wrote or read (0 when it touched none, e.g. a delete of a key that was gone)."""

    value: T
    revision: int = 0


class EtcdRun:
    """One run of one cluster, shared by the process's handlers. Build it with ``Registry.acquire``.

    Args:
        etcd: the process's client of the cluster.
        session: the process's session lease on the cluster (announcements live on it).
        run_id: the run.
    """

    def __init__(self, etcd: EtcdClient, session: Session, run_id: str) -> None:
        self.etcd = etcd
        self.session = session
        self.keys = RunKeys(etcd.config.key_prefix, run_id)
        self.lease = RunLease(self.keys.state, etcd.config.ttl)
        # Opened now, so that it has loaded by the first rendezvous.
        self.view = RunView(etcd, self.keys)
        self._shared = SharedReads()

    @property
    def run_id(self) -> str:
        return self.keys.run_id

    def describe(self, key: str | None = None) -> str:
        """Where ``key`` (default: the state key) is, for messages."""
        return f"etcd key '{key or self.keys.state}' at {self.etcd.config.describe_endpoints()}"

    def write(
        self, op: Callable[[etcd3.MultiEndpointEtcd3Client, int], Seen[T]], floor: Floor, budget: float | None = None
    ) -> T:
        """Run ``op(client, run_lease_id)`` as a request and raise ``floor`` to what it wrote; the
        run's lease is renewed when due and granted again if it lapsed. Keys the run writes should
        carry the lease."""

        def attempt(client: etcd3.MultiEndpointEtcd3Client) -> Seen[T]:
            lease_id = self.lease.current(client)
            try:
                return op(client, lease_id)
            except Exception as exc:
                if is_lease_missing(exc):
                    self.lease.lost()
                raise

        seen = self.etcd.request(attempt, budget)
        floor.raise_to(seen.revision)
        return seen.value

    def read(
        self,
        op: Callable[[etcd3.MultiEndpointEtcd3Client], Seen[T]],
        floor: Floor,
        shared: Hashable | None = None,
        budget: float | None = None,
    ) -> T:
        """Run ``op(client)`` as a request that reads the run's keys from etcd, for up to ``budget``
        seconds (``read_timeout`` by default); raise ``floor`` to what it saw. With ``shared`` (a
        name for all that ``op`` reads, whoever calls it, and within what budget), the request is
        shared with the process's other readers of it (``SharedReads``)."""
        if shared is None:
            seen = self.etcd.request(op, budget)
        else:
            seen = self._shared.read(shared, lambda: self.etcd.request(op, budget))
        floor.raise_to(seen.revision)
        return seen.value

    def viewed(self, from_view: Callable[[RunView, int], T], from_etcd: Callable[[], T], floor: Floor) -> T:
        """``from_view(view, floor)`` when the view can vouch for ``floor``, else ``from_etcd()``."""
        try:
            return from_view(self.view, floor.revision)
        except ViewBehind:
            pass
        # Outside the handler: a failure of the request must not carry ``ViewBehind`` as its cause.
        return from_etcd()

    def close(self) -> None:
        """Stop the view's stream. The run's lease is left to lapse: other nodes still use it."""
        self.view.close()
