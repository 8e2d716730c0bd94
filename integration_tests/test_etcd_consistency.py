"""The consistency bugs found in review of the etcd backend (issue 10), each reproduced against a
real etcd: what a node is told must never rest on a read older than its process's own writes."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import grpc
import pytest

from etcd_rdzv.factory import create_backend
from etcd_rdzv.keys import RunKeys
from etcd_rdzv.runtime import txn
from integration_tests.tools import wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def make(etcd_run):
    made = []

    def build(run_id: str = etcd_run.run_id, **conf):
        backend, store = create_backend(etcd_run.params(run_id=run_id, **conf), name="etcd_rdzv")
        made.append(backend)
        return backend, store

    yield build
    for backend in made:
        backend.close()


def _events_never_arrive(view, monkeypatch, progress_too: bool = False) -> None:
    """From now on the view's stream delivers no events (and, with ``progress_too``, nothing at
    all): as etcd did when it sent progress replies ahead of events still queued for the stream
    (etcd-io/etcd#15220), or as a stream on a member cut off from its cluster."""
    apply = view._apply

    def lagging(reply):
        if not reply.events and not progress_too:
            apply(reply)

    monkeypatch.setattr(view, "_apply", lagging)


def test_a_progress_reply_never_stands_for_the_events_behind_it(make, monkeypatch):
    """Bug 1: a progress reply raised the view's revision past events it had not applied, so a
    node that had just written the state (folding its own leave) read the state from before its
    write and was handed back the round it had left."""
    backend, _ = make()
    _, token, _ = backend.set_state(b"round R, node A a participant")
    wait_until(lambda: backend.get_state() == (b"round R, node A a participant", token), 5)
    _events_never_arrive(backend.run.cache, monkeypatch)
    written = backend.set_state(b"round R+1, node A left", token)
    assert written[2]
    time.sleep(1.5)  # progress replies (every second) now report revisions past the write
    assert backend.get_state() == (b"round R+1, node A left", written[1])


class _HeldEvents:
    """Holds back the view's event replies (progress replies still pass) until ``release``: a
    stream that lags behind etcd, as any stream does for a moment."""

    def __init__(self, view, monkeypatch) -> None:
        self._apply = view._apply
        self._held: list = []
        self._limit = 0
        monkeypatch.setattr(view, "_apply", self._receive)

    def _receive(self, reply) -> None:
        if reply.events and max(e.kv.mod_revision for e in reply.events) > self._limit:
            self._held.append(reply)
        else:
            self._apply(reply)

    def release(self, up_to: int) -> None:
        """Deliver the held replies whose events are all at or before ``up_to``, in order."""
        self._limit = up_to
        held, self._held = self._held, []
        for reply in held:
            self._receive(reply)


def test_a_mailbox_read_from_etcd_raises_what_liveness_must_vouch_for(make, etcd_admin, monkeypatch):
    """Bug 2: a mailbox read that fell back to etcd did not raise the process's floor, so the
    folding node checked liveness on a view that had caught up with its own write but not with the
    joiner's keys after it, and folded the joiner in and dropped it as dead in the same write."""
    backend, _ = make()
    backend.set_state(b"v1")
    wait_until(lambda: backend.get_state() is not None, 5)
    lag = _HeldEvents(backend.run.cache, monkeypatch)
    backend.liveness.beat("me", 5)  # our own write, not yet in the view
    own_write = backend.floor.revision
    keys = backend.run.keys
    # Then another process's joiner beats and announces itself.
    lease = etcd_admin.lease(30)
    etcd_admin.put(keys.alive_key("joiner"), b"{}", lease=lease.id)
    etcd_admin.put(keys.joins + "from-another-process", b'{"join": {}}', lease=lease.id)
    try:
        records = backend.mailbox.read(0)  # the view is behind our write: read from etcd
        assert [r.data for r in records] == [b'{"join": {}}']
        lag.release(own_write)  # the view catches up with our write, not with the joiner's keys
        wait_until(lambda: backend.run.cache.applied >= own_write, 5)
        assert backend.liveness.alive(["joiner"], 5) == {"joiner"}
    finally:
        lease.revoke()


def test_a_silent_watch_costs_a_store_reader_seconds_not_its_timeout(make, etcd_admin, monkeypatch):
    """Bug 3: a watch that stalled without an error kept the view 'healthy', and every blocked store
    read (rank 0's address, torch's barriers) waited its full timeout though the key was in etcd."""
    backend, store = make()
    store.set_timeout(timedelta(seconds=60))
    store.set("present", "1")
    _events_never_arrive(backend.run.cache, monkeypatch, progress_too=True)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(store.get("late")), daemon=True)
    started = time.monotonic()
    reader.start()
    time.sleep(0.5)
    etcd_admin.put(store.prefix + "late", b"here", lease=backend.run.lease.id)
    reader.join(20)
    assert got == [b"here"]
    assert time.monotonic() - started < 10


class _LostResponse(grpc.RpcError):
    """What a client sees when a committed request's response is lost on the way back."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection reset after the request was sent"


def test_a_store_add_whose_response_is_lost_applies_once(make, monkeypatch):
    """Bug 4: a committed ``add`` whose response was lost was retried and applied twice, which
    hangs or releases torch's barrier early."""
    backend, store = make()
    attempt = txn._attempt
    lost = []

    def commit_then_lose(client, request):
        result = attempt(client, request)
        if not lost and result.succeeded:
            lost.append(True)
            raise _LostResponse()
        return result

    assert store.add("arrivals", 1) == 1
    monkeypatch.setattr(txn, "_attempt", commit_then_lose)
    assert store.add("arrivals", 1) == 2
    assert lost
    monkeypatch.undo()
    assert store.get("arrivals") == b"2"
    # The receipt that made it exactly-once is gone again.
    assert list(backend.run.etcd.request(lambda c: c.get_prefix(backend.run.keys.ops))) == []


def test_runs_are_isolated_whatever_their_ids(make, etcd_run, etcd_admin):
    """Bug 5: run ids were not escaped: run 'job/alive/n1' wrote a key that run 'job' read as node
    n1's liveness, and resetting run 'job' deleted run 'job/x' too."""
    job, job_store = make("job")
    nested, _ = make("job/alive/n1")
    child, child_store = make("job/x")
    sibling, _ = make("job-2")
    nested.set_state(b"nested")
    child.set_state(b"child")
    child_store.set("k", "v")
    sibling.set_state(b"sibling")
    assert job.liveness.alive(["n1"], 5) == set()
    job.set_state(b"job")
    job.delete_run()
    assert job.get_state() is None
    assert child.get_state()[0] == b"child" and child_store.get("k") == b"v"
    assert nested.get_state()[0] == b"nested" and sibling.get_state()[0] == b"sibling"
    # Every key of run 'job/x' is below its own directory.
    root = RunKeys(etcd_run.key_prefix, "job/x").root
    mine = [kv.key.decode() for _, kv in etcd_admin.get_prefix(etcd_run.key_prefix + "/")]
    assert [k for k in mine if "x" in k.split("/")[3]] == [k for k in mine if k.startswith(root)]


def test_the_view_sees_no_event_of_another_run(make, monkeypatch):
    """Bug 5: the watch range [<prefix>/job, <prefix>/job0) streamed every event of runs 'job-2',
    'job.x', ... into run 'job''s processes."""
    job, _ = make("job")
    wait_until(lambda: job.get_state() is None, 5)
    seen = []
    apply = job.run.cache._apply
    monkeypatch.setattr(job.run.cache, "_apply", lambda reply: (seen.extend(reply.events), apply(reply)))
    for run_id in ("job-2", "job.x", "job0"):
        other, _ = make(run_id)
        other.set_state(b"other")
    job.set_state(b"mine")
    wait_until(lambda: seen, 5)
    time.sleep(0.3)
    assert {e.kv.key.decode() for e in seen} == {job.run.keys.state}


def test_the_mailbox_keeps_nothing_per_record_read(make):
    """Bug 7: the mailbox remembered every record it ever read, forever, on nodes that never won a
    write (their trim never ran)."""
    poster, _ = make()
    reader, _ = make()
    before = dict(vars(reader.mailbox))
    for i in range(20):
        poster.mailbox.post(b"join-%d" % i)
    wait_until(lambda: len(reader.mailbox.read(0)) == 20, 5)
    assert vars(reader.mailbox) == before


def test_reads_a_client_gives_up_on_leave_etcd_running(etcd_server):
    """etcd before 3.5.5 panics when the client of a read-only transaction gives up while etcd
    serves it (etcd-io/etcd#14110): the runtime's reads, which waited for a busy etcd no longer
    than an attempt, crashed the etcd 3.5.1 that a 4,096-node benchmark and the test suite ran on.
    Reads go as ``Range`` requests, which etcd abandons cleanly."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    from etcd_rdzv.config import config_from_params
    from etcd_rdzv.runtime.client import EtcdClient

    server = etcd_server()
    etcd = EtcdClient(config_from_params(RendezvousParameters("etcd_rdzv", server.endpoint, "reads", 1, 1)))
    try:
        value = b"x" * 1024
        for first in range(0, 20_000, 100):  # 20 MB: reading it all takes etcd longer than the client waits
            txn.run(etcd, txn.Txn(then=[txn.Put(b"/big/%06d" % i, value) for i in range(first, first + 100)]))
        read = txn.Txn(then=[txn.Get(b"/big/", txn.prefix_end(b"/big/"))])
        for attempt in range(30):
            with etcd.raw.attempt_limit(0.005 + (attempt % 10) * 0.003):
                try:
                    txn._attempt(etcd.raw, read)
                except Exception:  # noqa: BLE001 - the client gave up: what matters is the server
                    pass
        assert server.running, "etcd crashed serving a read its client gave up on"
        assert txn.run(etcd, txn.Txn(then=[txn.Get(b"/big/", txn.prefix_end(b"/big/"), count_only=True)])).count(0) == 20_000
    finally:
        etcd.close()
