"""``EtcdRendezvousBackend`` against a real etcd: the backend contract, and what is etcd's own."""

from __future__ import annotations

import re
import threading
import time

import pytest
from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousParameters

from etcd_rdzv.backend import EtcdRendezvousBackend
from etcd_rdzv.runtime.client import MAX_TXN_OPS
from etcd_rdzv.factory import create_backend
from integration_tests.etcd_fixture import free_port
from integration_tests.tools import wait_until
from unit_tests.backend_contract import BackendContract

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def make_backend(etcd_run):
    backends: list[EtcdRendezvousBackend] = []

    def make(run_id: str = etcd_run.run_id) -> EtcdRendezvousBackend:
        backend, _ = create_backend(etcd_run.params(run_id=run_id), name="etcd_rdzv")
        backends.append(backend)
        return backend

    yield make
    for backend in backends:
        backend.close()


class TestEtcdBackendContract(BackendContract):
    # etcd grants no lease shorter than about two seconds.
    liveness_ttl = 2.0
    fences_withdrawn = True
    fences_member = True


def _lease_exists(admin, lease_id: int) -> bool:
    return admin.get_lease_info(lease_id).TTL > 0


def _count_requests(backend: EtcdRendezvousBackend) -> list:
    """The requests this thread makes from now on (the process's backends share one client)."""
    requests = []
    etcd = backend.run.etcd
    original = etcd.request
    caller = threading.current_thread()

    def counting(op, budget=None):
        if threading.current_thread() is caller:
            requests.append(op)
        return original(op, budget)

    etcd.request = counting
    return requests


def test_one_write_folds_more_records_than_a_transaction_may_hold_operations(make_backend):
    """The fence is one compare however many records a write folds (it was one per record, so a
    write folded at most 127 and a join of 1,024 nodes took 9 writes or more); a withdrawal of
    any of them still fences the write that read it."""
    folder, poster = make_backend(), make_backend()
    _, token, _ = folder.set_state(b"v1")
    posted = [poster.mailbox.post(b"join %d" % i) for i in range(MAX_TXN_OPS + 72)]
    wait_until(lambda: len(folder.mailbox.read(0)) == len(posted), 10, 0.1, "the view to show every record")
    seen = folder.mailbox.read(0)
    poster.mailbox.withdraw(posted[150].handle)
    assert folder.set_state(b"v2", token, seen) == (b"v1", token, False)
    wait_until(lambda: len(folder.mailbox.read(0)) == len(posted) - 1, 10, 0.1, "the view to lose the record")
    again = folder.mailbox.read(0)
    state, _, has_set = folder.set_state(b"v3", token, again)
    assert (state, has_set) == (b"v3", True)


def test_waiters_wake_by_watch_not_by_polling(make_backend):
    waiter, writer = make_backend(), make_backend()
    _, token, _ = writer.set_state(b"v1")
    requests = _count_requests(waiter)
    threading.Timer(0.5, lambda: writer.set_state(b"v2", token)).start()
    started = time.monotonic()
    waiter.wait_for_change(token, timeout=20)
    woke_after = time.monotonic() - started
    assert 0.4 < woke_after < 2
    assert requests == []  # the process's shared watch of the state key woke it: no request


def test_wait_for_absent_state_wakes_on_creation(make_backend):
    waiter, writer = make_backend(), make_backend()
    assert waiter.get_state() is None
    threading.Timer(0.3, lambda: writer.set_state(b"first")).start()
    started = time.monotonic()
    waiter.wait_for_change(None, timeout=20)
    assert time.monotonic() - started < 5
    assert waiter.get_state()[0] == b"first"


def test_state_carries_the_run_lease_with_the_configured_ttl(etcd_run, etcd_admin):
    backend, store = create_backend(etcd_run.params(ttl=120), name="etcd_rdzv")
    other, _ = create_backend(etcd_run.params(ttl=120), name="etcd_rdzv")
    try:
        _, token, _ = backend.set_state(b"v1")
        _, meta = etcd_admin.get(backend.key)
        assert meta.lease_id == backend.run.lease.id
        info = etcd_admin.get_lease_info(meta.lease_id)
        assert info.grantedTTL == 120
        # Every node of the run shares the one lease.
        other.set_state(b"v2", token)
        assert etcd_admin.get(backend.key)[1].lease_id == backend.run.lease.id == other.run.lease.id
        store.set("k", "v")
        assert etcd_admin.get(store.prefix + "k")[1].lease_id == backend.run.lease.id
    finally:
        other.close()
        backend.close()


def test_close_revokes_this_process_leases(make_backend, etcd_admin):
    backend = make_backend()
    backend.set_state(b"v1")
    backend.liveness.beat("node-a", 2)
    backend.mailbox.post(b"join", poster="node-a")
    announced = next(iter(etcd_admin.get_prefix(backend.run.keys.joins)))[1].lease_id
    liveness = etcd_admin.get(backend.run.keys.alive_key("node-a"))[1].lease_id
    assert announced == liveness  # a poster's announcement goes with its liveness
    assert all(_lease_exists(etcd_admin, lease) for lease in (liveness, backend.run.lease.id))
    backend.close()
    backend.close()  # idempotent
    assert not _lease_exists(etcd_admin, liveness)
    assert list(etcd_admin.get_prefix(backend.run.keys.joins)) == []
    # The run's shared lease stays for the nodes still using the state; it lapses after ttl.
    assert _lease_exists(etcd_admin, backend.run.lease.id)


def test_unreachable_etcd_fails_within_read_timeout(etcd_run):
    endpoint = f"127.0.0.1:{free_port()}"
    params = etcd_run.params(read_timeout=2)
    params.endpoint = endpoint
    backend, _ = create_backend(params)
    started = time.monotonic()
    try:
        with pytest.raises(RendezvousConnectionError, match=endpoint):
            backend.get_state()
    finally:
        backend.close()
    assert time.monotonic() - started < 3


def test_a_failure_states_the_time_its_request_waited(etcd_server):
    """A heartbeat (its own budget: heartbeat_timeout) that meets an etcd gone down says how long
    it tried, not "within read_timeout=60s" three seconds into the outage; and a refused connection
    gets no hint that the server might speak TLS."""
    server = etcd_server()
    params = RendezvousParameters("etcd_rdzv", server.endpoint, "waited-run", 1, 1, read_timeout=30)
    backend, _ = create_backend(params)
    try:
        backend.liveness.beat("node-a", 10)
        server.stop()
        started = time.monotonic()
        with pytest.raises(RendezvousConnectionError) as failure:
            backend.liveness.beat("node-a", 10, timeout=2)
        took = time.monotonic() - started
        message = str(failure.value)
        assert "read_timeout" not in message, message
        waited = float(re.search(r"could not be reached in ([0-9.]+)s of trying", message).group(1))
        assert 1 <= waited <= took + 0.05, (waited, took)  # printed to a tenth
        assert "Connection refused" in message and "protocol=https" not in message, message
    finally:
        backend.close()


def test_fails_over_from_a_dead_endpoint(etcd_run):
    params = etcd_run.params(read_timeout=5)
    params.endpoint = f"127.0.0.1:{free_port()},{etcd_run.endpoint}"
    backend, _ = create_backend(params)
    try:
        _, token, _ = backend.set_state(b"v1")
        for _ in range(5):
            assert backend.get_state() == (b"v1", token)
    finally:
        backend.close()


def test_mailbox_records_vanish_with_their_poster_s_liveness(make_backend, etcd_admin):
    poster, reader = make_backend(), make_backend()
    poster.liveness.beat("node-a", 5, announcing=True)
    poster.mailbox.post(b"join", poster="node-a")
    # Another node's write reaches this one through the run's watch (a node waits only for its own).
    wait_until(lambda: [r.data for r in reader.mailbox.read(0)] == [b"join"], 5)
    joins = reader.run.keys.joins
    poster.close()  # its node's liveness ends, and the announcement it never saw folded with it
    wait_until(lambda: [r.data for r in reader.mailbox.read(0)] == [], 5)
    assert list(etcd_admin.get_prefix(joins)) == []
    reader.close()


def test_mailbox_trim_deletes_folded_records(make_backend, etcd_admin):
    backend = make_backend()
    for i in range(3):
        backend.mailbox.post(b"join-%d" % i)
    records = backend.mailbox.read(0)
    assert len(records) == 3
    backend.mailbox.trim(records[-1].position)
    assert list(etcd_admin.get_prefix(backend.run.keys.joins)) == []


def test_delete_run_removes_every_key_of_the_run(etcd_run, etcd_admin):
    backend, store = create_backend(etcd_run.params())
    neighbour, neighbour_store = create_backend(etcd_run.params(run_id=etcd_run.run_id + "-x"))
    try:
        for b, s in ((backend, store), (neighbour, neighbour_store)):
            b.set_state(b"v1")
            b.mailbox.post(b"join")
            b.liveness.beat("node", 2)
            s.set("k", "v")
        backend.delete_run()
        assert backend.get_state() is None
        assert list(etcd_admin.get_prefix(backend.run.keys.root)) == []
        assert list(etcd_admin.get_prefix(store.prefix)) == []
        assert not _lease_exists(etcd_admin, backend.run.lease.id)
        # A run whose id merely starts with this one is untouched.
        assert neighbour.get_state()[0] == b"v1"
        assert neighbour_store.get("k") == b"v"
    finally:
        neighbour.close()
        backend.close()


def test_a_read_after_delete_run_is_not_answered_by_a_view_that_missed_the_delete(etcd_run, monkeypatch):
    """``delete_run`` raises the node's floor like every other write, so the view (here frozen
    before the delete, as a view on a busy machine trails it) cannot answer the next read with
    the deleted state (found by the etcd 3.4 leg of CI under load)."""
    backend, _ = create_backend(etcd_run.params())
    try:
        backend.set_state(b"v1")
        cache = backend.run.cache
        wait_until(lambda: cache.read(0, lambda c: c.get("state", b"")) is not None, 10, 0.05, "the cache to show the state")
        monkeypatch.setattr(cache, "_apply", lambda reply: None)  # it hears of nothing from now on
        assert backend.get_state()[0] == b"v1"
        backend.delete_run()
        assert backend.get_state() is None
    finally:
        backend.close()


def test_rides_out_an_etcd_restart(etcd_server):
    server = etcd_server()
    params = RendezvousParameters("etcd_rdzv", server.endpoint, "restart-run", 1, 1, read_timeout=15)
    backend, store = create_backend(params)
    try:
        _, token, _ = backend.set_state(b"v1")
        store.set("k", "v")
        server.stop()
        started = time.monotonic()
        backend.wait_for_change(token, timeout=1)  # an outage ends the wait, it does not fail it
        assert time.monotonic() - started < 3
        restart = threading.Timer(1.0, server.start)
        restart.start()
        try:
            assert backend.get_state() == (b"v1", token)  # retried until etcd is back
            assert store.get("k") == b"v"
        finally:
            restart.join()
    finally:
        backend.close()


def test_reads_come_from_the_process_run_view(make_backend):
    writer, reader = make_backend(), make_backend()
    writer.liveness.beat("node-w", 5)
    _, token, _ = writer.set_state(b"v1")
    writer.mailbox.post(b"join")
    # Another node's writes reach the reader through the run's watch.
    wait_until(lambda: len(reader.mailbox.read(0)) == 1 and reader.get_state() == (b"v1", token), 5)
    requests = _count_requests(reader)
    assert reader.get_state() == (b"v1", token)
    assert [r.data for r in reader.mailbox.read(0)] == [b"join"]
    assert reader.liveness.alive(["node-w", "node-x"], 5) == {"node-w"}
    assert requests == []  # the shared watch of the run answered all three


def test_reads_fall_back_to_etcd_while_the_view_cannot_vouch(make_backend, monkeypatch):
    from etcd_rdzv.runtime import cache

    writer, reader = make_backend(), make_backend()
    _, token, _ = writer.set_state(b"v1")
    monkeypatch.setattr(cache, "CATCH_UP_SECONDS", 0.0)
    reader.run.cache._healthy = False  # as while the watch reconnects
    requests = _count_requests(reader)
    assert reader.get_state() == (b"v1", token)
    assert len(requests) == 1


def test_the_nodes_of_a_process_share_their_reads_of_etcd_while_the_view_cannot_vouch(make_backend, monkeypatch):
    """At N = 4,096 over 16 processes each node that found its view behind read the whole mailbox
    from etcd itself: hundreds of such reads per process slowed etcd, and the views with it, until
    the run never formed. The nodes of a process now share one read in the air at a time."""
    from etcd_rdzv.runtime import cache

    writer = make_backend()
    readers = [make_backend() for _ in range(16)]
    _, token, _ = writer.set_state(b"v1")
    for i in range(3):
        writer.mailbox.post(b"join %d" % i)
    writer.liveness.beat("node-w", 5)
    monkeypatch.setattr(cache, "CATCH_UP_SECONDS", 0.0)
    writer.run.cache._healthy = False  # as while the watch reconnects: every read goes to etcd
    etcd = writer.run.etcd
    original = etcd.request
    lock = threading.Lock()
    in_air, most_in_air, sent = [0], [0], [0]

    def slow_request(op, budget=None):
        with lock:
            in_air[0] += 1
            sent[0] += 1
            most_in_air[0] = max(most_in_air[0], in_air[0])
        try:
            time.sleep(0.3)  # a loaded etcd: the readers of the process come while it is in the air
            return original(op, budget)
        finally:
            with lock:
                in_air[0] -= 1

    monkeypatch.setattr(etcd, "request", slow_request)
    answers: list = []
    start = threading.Barrier(len(readers))

    def read(backend) -> None:
        start.wait()
        answers.append(
            (backend.get_state(), [r.data for r in backend.mailbox.read(0)], backend.liveness.alive(["node-w"], 5))
        )

    threads = [threading.Thread(target=read, args=(r,)) for r in readers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    expected = ((b"v1", token), [b"join 0", b"join 1", b"join 2"], {"node-w"})
    assert answers == [expected] * len(readers)
    assert most_in_air[0] <= 3  # one read of each kind (state, mailbox, liveness), not one per node
    assert sent[0] < len(readers)


def test_the_nodes_of_a_process_are_handed_the_same_record_objects(make_backend):
    """Each of the hundreds of nodes of a large process reads the mailbox after every change; a
    read made a record object per record per read (28% of the process's CPU at N = 256)."""
    poster, reader = make_backend(), make_backend()
    for i in range(5):
        poster.mailbox.post(b"join %d" % i)
    wait_until(lambda: len(reader.mailbox.read(0)) == 5, 10, 0.1, "the view to show every record")
    first, second = reader.mailbox.read(0), poster.mailbox.read(0)
    assert [r.data for r in first] == [b"join %d" % i for i in range(5)]
    assert all(a is b for a, b in zip(first, second))
    assert [r.data for r in reader.mailbox.read(first[2].position)] == [b"join 3", b"join 4"]


def test_beats_of_many_nodes_share_a_few_lease_keep_alive_streams(etcd_run, monkeypatch):
    """etcd renews a lease only over a stream; etcd3 opened one (and gRPC a thread) per renewal,
    which at N = 1024 over 4 processes was most of their CPU: beats fell behind and leases lapsed.
    Streams stay open: later beats open none."""
    from etcd_rdzv.runtime.lessor import STREAMS

    import etcd3.etcdrpc

    opened = []
    stub_init = etcd3.etcdrpc.LeaseStub.__init__

    def counting_init(stub, channel):
        stub_init(stub, channel)
        keep_alive = stub.LeaseKeepAlive

        def open_stream(*args, **kwargs):
            opened.append(1)
            return keep_alive(*args, **kwargs)

        stub.LeaseKeepAlive = open_stream

    monkeypatch.setattr(etcd3.etcdrpc.LeaseStub, "__init__", counting_init)
    # A configuration of its own: a client (and stubs) of its own, not one another test made.
    backend, _ = create_backend(etcd_run.params(read_timeout=9.5), name="etcd_rdzv")
    try:
        nodes = [f"node-{i}" for i in range(2 * STREAMS)]
        for _ in range(2):  # a node's first beat grants its lease; the second renews it
            for node in nodes:
                backend.liveness.beat(node, 10)
        first = len(opened)
        for node in nodes:
            backend.liveness.beat(node, 10)
        assert backend.liveness.alive(nodes, 10) == set(nodes)
        assert 1 <= first <= STREAMS and len(opened) == first
    finally:
        backend.close()


def test_renewing_a_lease_that_is_gone_says_so(make_backend):
    from etcd_rdzv.runtime.lessor import refresh

    backend = make_backend()
    raw = backend.run.etcd.raw
    lease = raw.lease(5)
    assert backend.run.etcd.request(lambda c: refresh(c, lease.id)) is True
    raw.revoke_lease(lease.id)
    assert backend.run.etcd.request(lambda c: refresh(c, lease.id)) is False


def test_a_reader_waits_for_a_view_that_is_busy_catching_up(make_backend, monkeypatch):
    """A view that is applying a burst (it trailed a join of N = 1024 over 4 processes by hundreds
    of revisions) is waited for while it makes progress: every node falling back to etcd after a
    second only slowed it further. One that applies nothing is still left after a second."""
    from etcd3.etcdrpc import kv_pb2, rpc_pb2

    from etcd_rdzv.runtime import cache as cache_module

    monkeypatch.setattr(cache_module, "CATCH_UP_SECONDS", 0.3)
    backend = make_backend()
    view = backend.run.cache
    wait_until(lambda: view._trusted(), 10, 0.05, "the cache to load")
    base = view.applied
    busy = (backend.run.keys.root + "busy").encode()

    def apply_burst() -> None:
        # What the stream delivers while it catches up: a reply every 0.2 s, each one revision on.
        for revision in range(base + 1, base + 6):
            time.sleep(0.2)
            event = kv_pb2.Event(type=kv_pb2.Event.PUT, kv=kv_pb2.KeyValue(key=busy, mod_revision=revision))
            view._apply(rpc_pb2.WatchResponse(header=rpc_pb2.ResponseHeader(revision=revision), events=[event]))

    feeder = threading.Thread(target=apply_burst)
    feeder.start()
    try:
        backend.floor.raise_to(base + 5)  # this node saw that revision elsewhere
        requests = _count_requests(backend)
        assert backend.get_state() is None
        assert requests == []  # answered by the view once it got there, after a second
        assert view.applied >= base + 5
    finally:
        feeder.join()
    backend.floor.raise_to(base + 50)  # a revision the view will not reach: it applies nothing
    started = time.monotonic()
    backend.get_state()
    assert len(requests) == 1 and time.monotonic() - started < 2


def test_a_retried_post_whose_response_was_lost_creates_its_record_once(etcd_run, etcd_admin):
    """A retry re-put the record's key: its mod revision moved, the view listed the record twice
    (the second time out of order), a cursor stored past it could move backwards and the record
    was folded again. A post only creates its key; the retry finds it and changes nothing."""
    from integration_tests.nemesis import Proxy

    with Proxy.to(etcd_run.endpoints[0]) as proxy:
        params = RendezvousParameters(
            "etcd_rdzv", proxy.endpoint, etcd_run.run_id, 1, 1, key_prefix=etcd_run.key_prefix, read_timeout=20
        )
        poster, _ = create_backend(params, name="etcd_rdzv")
        try:
            poster.mailbox.post(b"warm")  # the session lease is granted, the connection is up
            proxy.drop_next_response()
            record = poster.mailbox.post(b"retried")
            assert proxy.faults["drop_response"] == 1
            (kv,) = [kv for kv in etcd_admin.get_prefix(poster.run.keys.joins) if kv[0] == b"retried"]
            assert kv[1].version == 1, "the retry wrote the record again"
            assert record.position == kv[1].create_revision
            wait_until(lambda: b"retried" in [r.data for r in poster.mailbox.read(0)], 10, 0.1, "the view")
            datas = [r.data for r in poster.mailbox.read(0)]
            assert datas.count(b"retried") == 1, datas
            positions = [r.position for r in poster.mailbox.read(0)]
            assert positions == sorted(positions)
        finally:
            poster.close()


def test_a_record_put_again_by_another_client_keeps_its_place_in_the_log(make_backend, etcd_admin):
    backend = make_backend()
    first = backend.mailbox.post(b"first")
    second = backend.mailbox.post(b"second")
    put = etcd_admin.put(first.handle, b"first")  # moves its mod revision past the second's
    wait_until(lambda: backend.run.cache.peek(lambda c: c.applied) >= put.header.revision, 10, 0.1, "the cache to see the put")
    records = backend.mailbox.read(0)
    assert [r.data for r in records] == [b"first", b"second"]
    assert [r.data for r in backend.mailbox.read(first.position)] == [b"second"]


def test_a_joining_node_s_liveness_key_is_written_in_its_announcement_s_own_transaction(make_backend, etcd_admin):
    """A join used to cost etcd three entries before any state write: the lease grant, the
    liveness key, the announcement. A first beat that announces leaves the key to the post."""
    backend = make_backend()
    backend.liveness.beat("node-a", 5, announcing=True)
    assert etcd_admin.get(backend.run.keys.alive_key("node-a"))[0] is None  # nothing written yet
    record = backend.mailbox.post(b"join", poster="node-a")
    _, meta = etcd_admin.get(backend.run.keys.alive_key("node-a"))
    assert meta.create_revision == record.position  # one transaction, one raft entry
    assert _lease_exists(etcd_admin, meta.lease_id)
    later = backend.mailbox.post(b"again", poster="node-a")  # put once only
    assert etcd_admin.get(backend.run.keys.alive_key("node-a"))[1].mod_revision < later.position


def test_a_beat_whose_new_lease_lapses_before_its_key_is_put_grants_another(make_backend, etcd_admin, monkeypatch):
    """Under a busy etcd a grant and the put that follows it can lie a TTL apart (the 4,096-node
    benchmark saw requests take longer than 15 s): the put then found its lease gone, and the beat
    failed with NOT_FOUND "requested lease not found" instead of granting another."""
    from etcd_rdzv import liveness

    backend = make_backend()
    granted = liveness.grant
    lapsed: list[int] = []

    def lapsing(etcd, ttl, timeout=None):
        lease_id = granted(etcd, ttl, timeout)
        if not lapsed:
            lapsed.append(lease_id)
            etcd_admin.revoke_lease(lease_id)
        return lease_id

    monkeypatch.setattr(liveness, "grant", lapsing)
    backend.liveness.beat("node-a", 5)
    _, meta = etcd_admin.get(backend.run.keys.alive_key("node-a"))
    assert lapsed and meta is not None and meta.lease_id != lapsed[0]
    assert _lease_exists(etcd_admin, meta.lease_id)
    assert backend.liveness.alive(["node-a"], 5, current=True) == {"node-a"}
