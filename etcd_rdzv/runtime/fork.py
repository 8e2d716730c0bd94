"""``registry``, the etcd side's only process-wide state: one ``Cluster`` (a client) per
configuration and one shared object per (configuration, name), counted by their users.
Around ``fork()`` it pauses every stream and holds requests at the ``ForkGate`` (gRPC cannot be
carried across a fork with a thread inside it); the child starts empty (docs/design.md)."""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from ..config import EtcdConfig
from .client import EtcdClient
from .lessor import KeepAliveStreams

logger = logging.getLogger(__name__)

T = TypeVar("T")

FORK_QUIESCE_SECONDS = 5.0  # how long a fork waits for streams and requests in flight
RELEASE_WAIT_SECONDS = 0.5  # how long a finalizer waits for the release it hands to a thread


class ForkGate:
    """Requests pass while it is open; ``close`` waits for those in flight and holds new ones. In a
    forked child it is ``orphan``ed: its clients are the parent's, and a request fails at once."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._inside = 0
        self._open, self._orphaned = True, False

    @contextmanager
    def passage(self) -> Iterator[None]:
        with self._cond:
            if self._orphaned:
                raise RuntimeError("This etcd client was made by the parent of this forked process; "
                                   "build a new rendezvous handler in the child.")
            self._cond.wait_for(lambda: self._open)
            self._inside += 1
        try:
            yield
        finally:
            with self._cond:
                self._inside -= 1
                self._cond.notify_all()

    def close(self, timeout: float) -> bool:
        """Stop new passages; whether those in flight ended within ``timeout``."""
        with self._cond:
            self._open = False
            return self._cond.wait_for(lambda: self._inside == 0, timeout)

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def orphan(self) -> None:
        with self._cond:
            self._orphaned = self._open = True
            self._cond.notify_all()


class Cluster:
    """The process's connection to one etcd cluster."""

    def __init__(self, config: EtcdConfig, gate: ForkGate) -> None:
        self.etcd = EtcdClient(config, gate.passage)

    def pause(self, timeout: float) -> None:
        KeepAliveStreams.of(self.etcd.raw).pause(timeout)

    def close(self) -> None:
        self.etcd.close()


class Registry:
    """Shared ``Cluster``s and objects, counted by their users."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.gate = ForkGate()
        self._clusters: dict[EtcdConfig, list] = {}  # config -> [cluster, users]
        self._shared: dict[tuple[EtcdConfig, Hashable], list] = {}  # -> [object, users]
        self._inherited: list[object] = []  # a forked child's, kept so that it never closes them

    def acquire(self, config: EtcdConfig, name: Hashable, make: Callable[[Cluster], T]) -> T:
        """The process's object ``name`` on the cluster of ``config``, made by ``make(cluster)`` on
        first use (it has ``pause``, ``resume`` and ``close``); ``release`` it when done. Raises
        ``RendezvousConnectionError`` if etcd could not be reached or refused the credentials."""
        with self._lock:
            held = self._shared.get((config, name))
            if held is not None:
                held[1] += 1
                return held[0]
            if config not in self._clusters:
                self._clusters[config] = [Cluster(config, self.gate), 0]
            cluster = self._clusters[config]
            cluster[1] += 1
            try:
                made = make(cluster[0])
            except BaseException:
                self._release_cluster(config)
                raise
            self._shared[(config, name)] = [made, 1]
            return made

    def release(self, shared: Any) -> None:
        """Let go of ``shared``; the last user's release closes it, and its cluster if unused."""
        with self._lock:
            for key, held in self._shared.items():
                if held[0] is shared:
                    break
            else:
                return  # inherited across a fork, or released already
            held[1] -= 1
            if held[1]:
                return
            del self._shared[key]
            shared.close()
            self._release_cluster(key[0])

    def release_soon(self, shared: Any) -> None:
        """``release`` on a thread of its own, waited for a moment unless the registry is locked:
        a finalizer runs on whatever thread allocates, which may hold a lock releasing needs."""
        free = self._lock.acquire(blocking=False)
        if free:
            self._lock.release()
        thread = threading.Thread(target=self.release, args=(shared,), name="etcd-rdzv-release", daemon=True)
        thread.start()
        if free:
            thread.join(RELEASE_WAIT_SECONDS)

    def _release_cluster(self, config: EtcdConfig) -> None:
        held = self._clusters[config]
        held[1] -= 1
        if not held[1]:
            del self._clusters[config]
            held[0].close()

    def _before_fork(self) -> None:
        self._lock.acquire()
        for shared, _ in self._shared.values():
            shared.pause(FORK_QUIESCE_SECONDS)
        for cluster, _ in self._clusters.values():
            cluster.pause(FORK_QUIESCE_SECONDS)
        if self._clusters or self._shared:
            gc.collect()  # the closed streams' call objects, whose finalizers take gRPC's locks
        if not self.gate.close(FORK_QUIESCE_SECONDS):
            logger.warning("etcd requests were still in flight at fork(); the child may not use gRPC safely.")

    def _after_fork_in_parent(self) -> None:
        self.gate.open()
        for shared, _ in self._shared.values():
            shared.resume()
        self._lock.release()

    def _after_fork_in_child(self) -> None:
        self.gate.orphan()
        self._inherited.append((self._clusters, self._shared, self.gate))
        self._clusters, self._shared = {}, {}
        self._lock, self.gate = threading.Lock(), ForkGate()


registry = Registry()
os.register_at_fork(
    before=registry._before_fork,
    after_in_parent=registry._after_fork_in_parent,
    after_in_child=registry._after_fork_in_child,
)
