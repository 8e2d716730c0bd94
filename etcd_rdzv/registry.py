"""The process's one registry of shared etcd objects, and what it does around ``fork()``.

A process holds one ``Cluster`` (a client, so one gRPC channel per endpoint, and a session lease)
per cluster configuration, and one ``EtcdRun`` per (cluster, run id), however many handlers it
runs: ``acquire`` hands out the shared run (making it, and its cluster, on first use) and
``release`` closes each object when its last user lets go. This module-level ``registry`` is the
etcd backend's only process-wide mutable state (the core's is ``rdzv_common.hosting``, the
TCPStore servers a process hosts).

Fork safety. gRPC cannot be carried across ``fork()`` while a thread is inside it ("Other threads
are currently calling into gRPC, skipping fork() handlers"; the child can then abort). So before a
fork the registry takes every run's watch stream and every client's lease keep-alive stream down
and waits, briefly, for requests in flight to end (new ones wait at a gate), collects the garbage
the closed streams left (in the parent, where their finalizers' locks are free), and afterwards the
parent opens the gate and the watch streams again (a keep-alive stream reopens on its next use).
The child starts with an empty registry: it shares nothing with its parent (it gets channels,
sessions and views of its own on first use), and it never touches, closes or revokes what it
inherited, which still belongs to the parent.
"""

from __future__ import annotations

import gc
import logging
import os
import threading

from .client import EtcdClient, ForkGate
from .config import EtcdConfig
from .run import EtcdRun
from .session import Session

logger = logging.getLogger(__name__)

# How long a fork waits for the streams to stop and the requests in flight to end.
FORK_QUIESCE_SECONDS = 5.0
# How long a finalizer waits for the release it hands to a thread of its own (``release_soon``):
# one round of closing on a healthy etcd, so that a store collected at exit still revokes.
RELEASE_WAIT_SECONDS = 0.5


class Cluster:
    """The process's connection to one etcd cluster: its client and its session lease."""

    def __init__(self, config: EtcdConfig, gate: ForkGate) -> None:
        self.etcd = EtcdClient(config, gate)
        self.session = Session(self.etcd)

    def pause(self, timeout: float) -> None:
        """Take the client's lease keep-alive stream down (before a ``fork()``); it reopens on use."""
        self.etcd.raw.keep_alive.pause(timeout)

    def close(self) -> None:
        try:
            self.session.close()
        finally:
            self.etcd.close()


class Registry:
    """Shared ``Cluster`` and ``EtcdRun`` objects, counted by their users."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.gate = ForkGate()
        self._clusters: dict[EtcdConfig, tuple[Cluster, int]] = {}
        self._runs: dict[tuple[EtcdConfig, str], tuple[EtcdRun, int]] = {}
        # What a forked child inherited; kept referenced so that it is never closed (or collected,
        # which closes channels) in the child.
        self._inherited: list[object] = []

    def acquire(self, config: EtcdConfig, run_id: str) -> EtcdRun:
        """The process's run ``run_id`` on the cluster of ``config``; ``release`` it when done.

        Raises:
            RendezvousConnectionError: etcd could not be reached or refused the credentials.
        """
        with self._lock:
            key = (config, run_id)
            if key in self._runs:
                run, users = self._runs[key]
                self._runs[key] = (run, users + 1)
                return run
            cluster, users = self._clusters.get(config) or (Cluster(config, self.gate), 0)
            self._clusters[config] = (cluster, users + 1)
            try:
                run = EtcdRun(cluster.etcd, cluster.session, run_id)
            except BaseException:
                self._release_cluster(config)
                raise
            self._runs[key] = (run, 1)
            return run

    def release(self, run: EtcdRun) -> None:
        """Let go of ``run``; the last user's release closes it, and its cluster if unused."""
        config = run.etcd.config
        with self._lock:
            key = (config, run.run_id)
            held, users = self._runs.get(key, (None, 0))
            if held is not run:
                return  # inherited across a fork, or released already
            if users > 1:
                self._runs[key] = (run, users - 1)
                return
            del self._runs[key]
            run.close()
            self._release_cluster(config)

    def release_soon(self, run: EtcdRun) -> None:
        """``release``, safe to call from a finalizer. Garbage collection runs finalizers on
        whatever thread happens to allocate, and that thread may hold a lock that releasing needs:
        the registry's own (inside ``acquire``), or a client's keep-alive stream's (inside a lease
        renewal; closing the client waited for it on the same thread, for ever). So the release
        runs on a thread of its own; the caller waits for it a moment, and not at all while the
        registry's lock is taken, and goes on either way."""
        wait = self._lock.acquire(blocking=False)
        if wait:
            self._lock.release()
        thread = threading.Thread(target=self.release, args=(run,), name="etcd-rdzv-release", daemon=True)
        thread.start()
        if wait:
            thread.join(RELEASE_WAIT_SECONDS)

    def _release_cluster(self, config: EtcdConfig) -> None:
        cluster, users = self._clusters.pop(config)
        if users > 1:
            self._clusters[config] = (cluster, users - 1)
        else:
            cluster.close()

    # Around fork().

    def _before_fork(self) -> None:
        self._lock.acquire()
        for run, _ in self._runs.values():
            run.view.pause(FORK_QUIESCE_SECONDS)
        for cluster, _ in self._clusters.values():
            cluster.pause(FORK_QUIESCE_SECONDS)
        if self._clusters or self._runs:
            # The streams just closed leave gRPC call objects in reference cycles. Collected in the
            # child, a call's finalizer takes a lock that one of the parent's gRPC threads may have
            # held at fork, and waits for ever (a forked agent of torch's tests hung so in its first
            # lease grant). Collected here, their locks are released in time.
            gc.collect()
        if not self.gate.close(FORK_QUIESCE_SECONDS):
            logger.warning("etcd requests were still in flight at fork(); the child may not use gRPC safely.")

    def _after_fork_in_parent(self) -> None:
        self.gate.open()
        for run, _ in self._runs.values():
            run.view.resume()
        self._lock.release()

    def _after_fork_in_child(self) -> None:
        self.gate.orphan()
        self._inherited.append((self._clusters, self._runs, self.gate))
        self._clusters, self._runs = {}, {}
        self._lock = threading.Lock()
        self.gate = ForkGate()


registry = Registry()
os.register_at_fork(
    before=registry._before_fork,
    after_in_parent=registry._after_fork_in_parent,
    after_in_child=registry._after_fork_in_child,
)
