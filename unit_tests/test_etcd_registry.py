"""The process's registry of shared etcd objects: sharing, release, finalizers and fork()."""

from __future__ import annotations

import os
import threading
import time

import pytest

from etcd_rdzv.config import EtcdConfig
from etcd_rdzv.run import EtcdRun
from etcd_rdzv.runtime.fork import ForkGate, Registry
from etcd_rdzv.runtime.lessor import KeepAliveStreams

# Nothing listens there: the objects are built, and their streams retry in the background.
CONFIG = EtcdConfig(endpoints=(("127.0.0.1", 9),), read_timeout=1.0, key_prefix="/unit")


class RunRegistry(Registry):
    """A registry of runs, as ``etcd_rdzv.run.acquire`` uses the process's one."""

    def acquire(self, config, run_id):
        return super().acquire(config, run_id, lambda cluster: EtcdRun(cluster, run_id))


@pytest.fixture
def registry():
    return RunRegistry()


def _threads(prefix: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix) and t.is_alive()]


def test_a_process_shares_one_run_and_one_cluster(registry):
    a, b = registry.acquire(CONFIG, "job"), registry.acquire(CONFIG, "job")
    other = registry.acquire(CONFIG, "job-2")
    try:
        assert a is b
        assert other is not a
        assert other.etcd is a.etcd  # one connection per cluster
    finally:
        for run in (a, b, other):
            registry.release(run)


def test_the_last_release_stops_the_run_view(registry):
    run = registry.acquire(CONFIG, "stops")
    second = registry.acquire(CONFIG, "stops")
    view = f"etcd-rdzv-view {run.keys.root}"
    registry.release(run)
    assert view in _threads(view)
    registry.release(second)
    deadline = time.monotonic() + 5
    while _threads(view) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _threads(view) == []
    registry.release(run)  # a release too many is ignored


def test_a_finalizer_inside_acquire_does_not_deadlock(registry):
    """Garbage collection can run a store's finalizer on the very thread that holds the registry's
    lock inside ``acquire``: its release must not wait for that lock (it did, for 90 s)."""
    run = registry.acquire(CONFIG, "finalized")
    with registry._lock:
        started = time.monotonic()
        registry.release_soon(run)
        assert time.monotonic() - started < 0.5
    deadline = time.monotonic() + 5
    while registry._shared and time.monotonic() < deadline:
        time.sleep(0.05)
    assert registry._shared == {}


def test_a_finalizer_on_a_thread_holding_a_lock_the_release_needs_does_not_deadlock(registry):
    """Garbage collection ran a store's finalizer inside ``KeepAliveStream.renew``, on the thread
    that held the keep-alive stream's lock, which closing the cluster waits for: that thread hung
    for ever and, as it held the registry's lock too, so did every later ``acquire`` (seen in CI)."""
    run = registry.acquire(CONFIG, "finalized-in-renew")
    keep_alive = KeepAliveStreams.of(run.etcd.raw)
    returned = threading.Event()

    def finalizer_inside_renew() -> None:
        with keep_alive._lock:
            registry.release_soon(run)
            returned.set()

    threading.Thread(target=finalizer_inside_renew, daemon=True).start()
    assert returned.wait(5), "release_soon waited for a lock held by its own thread"
    deadline = time.monotonic() + 5
    while (registry._shared or registry._clusters) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert registry._shared == {} and registry._clusters == {}


def test_the_fork_gate_waits_for_requests_in_flight_and_holds_new_ones():
    gate = ForkGate()
    inside, leave = threading.Event(), threading.Event()

    def request() -> None:
        with gate.passage():
            inside.set()
            leave.wait(5)

    worker = threading.Thread(target=request)
    worker.start()
    inside.wait(5)
    assert not gate.close(0.1)  # one request is still in flight
    leave.set()
    worker.join(5)
    assert gate.close(0.1)
    entered = threading.Event()
    late = threading.Thread(target=lambda: gate.passage().__enter__() and None or entered.set())
    late.start()
    assert not entered.wait(0.2)  # held while the gate is closed
    gate.open()
    assert entered.wait(5)
    late.join(5)


def test_an_orphaned_gate_refuses_at_once():
    gate = ForkGate()
    gate.orphan()
    with pytest.raises(RuntimeError, match="parent of this forked process"):
        with gate.passage():
            pass


def test_a_forked_child_starts_with_an_empty_registry():
    """The child must not reuse its parent's channel, session or view (no thread runs them there)."""
    from etcd_rdzv import run as runs
    from etcd_rdzv.runtime.fork import registry as shared

    run = runs.acquire(CONFIG, "forked")
    try:
        pid = os.fork()
        if pid == 0:  # the child: report through the exit status only
            ok = not shared._shared and not shared._clusters
            try:
                run.etcd.request(lambda c: None, budget=0)
                ok = False  # the parent's client must refuse
            except RuntimeError:
                pass
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert shared._shared  # the parent keeps its own
    finally:
        shared.release(run)


def test_garbage_is_collected_in_the_parent_before_fork():
    """Bug (torch's agent tests, once): a forked agent hung for ever in its first lease grant. The
    garbage collector, run inside that gRPC call in the child, finalized a call object left by the
    streams the parent closed before fork, and the finalizer waited on a lock that a thread of the
    parent held at fork. Garbage is now collected in the parent before fork, where such locks are
    released."""
    import gc

    from etcd_rdzv import run as runs

    finalized: list[int] = []

    class Cycle:
        def __del__(self) -> None:
            finalized.append(os.getpid())

    run = runs.acquire(CONFIG, "forked-garbage")
    gc.disable()
    try:
        cycle = Cycle()
        cycle.me = cycle
        del cycle
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        assert finalized == [os.getpid()]
    finally:
        gc.enable()
        runs.release(run)
