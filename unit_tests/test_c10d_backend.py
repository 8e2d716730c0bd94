"""The backend contract and the c10d specifics over a TCPStore and a FileStore."""

from __future__ import annotations

import itertools
import threading
import time
from datetime import timedelta

import pytest
from torch.distributed import FileStore, TCPStore
from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError, RendezvousStateError

from c10d_rdzv.backend import C10dRendezvousBackend
from c10d_rdzv.keys import RunKeys
from c10d_rdzv.mailbox import frame
from unit_tests.backend_contract import BackendContract

# Generous: in some sandboxes a TCPStore connection now and then takes seconds to open.
TIMEOUT = timedelta(seconds=30)


@pytest.fixture
def tcp_server():
    return TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=TIMEOUT)


@pytest.fixture
def tcp_client(tcp_server):
    """Each call opens one more client connection to the same server."""
    return lambda: TCPStore("127.0.0.1", tcp_server.port, is_master=False, timeout=TIMEOUT)


@pytest.fixture
def file_client(tmp_path):
    path = str(tmp_path / "store")
    return lambda: FileStore(path, -1)


@pytest.fixture(params=["tcp", "file"])
def client(request):
    return request.getfixturevalue(f"{request.param}_client")


class TestC10dTcpBackend(BackendContract):
    liveness_ttl = 0.3

    @pytest.fixture
    def make_backend(self, tcp_client):
        return lambda run_id: C10dRendezvousBackend(tcp_client(), run_id)


class TestC10dFileBackend(BackendContract):
    liveness_ttl = 0.3

    @pytest.fixture
    def make_backend(self, file_client):
        return lambda run_id: C10dRendezvousBackend(file_client(), run_id)


def test_keys_follow_the_documented_layout(client):
    store = client()
    backend = C10dRendezvousBackend(store, "a/run")
    _, token, _ = backend.set_state(b"state")
    backend.mailbox.post(b"join")
    backend.liveness.beat("node-1", 10)
    root = "torch.rendezvous.c10d_rdzv/a%2Frun/"
    assert store.get(root + "state") == token
    assert token.endswith(b"state") and len(token) == 16 + len(b"state")
    assert store.get(root + "log") == b"4:join,"
    assert store.add(root + "generation", 0) == 1
    assert store.check([root + "changed/1", root + "hb/node-1"])


def test_name_defaults_and_is_reported(client):
    assert C10dRendezvousBackend(client(), "run").name == "c10d_rdzv"
    assert C10dRendezvousBackend(client(), "run", name="alias").name == "alias"


def test_empty_run_id_is_refused(client):
    with pytest.raises(ValueError, match="run id"):
        C10dRendezvousBackend(client(), "")


def test_equal_states_written_twice_get_distinct_tokens(client):
    backend = C10dRendezvousBackend(client(), "run")
    _, t1, _ = backend.set_state(b"same")
    _, t2, has_set = backend.set_state(b"same", t1)
    assert has_set and t2 != t1
    # The first token stays stale although the state bytes are back to what it carried.
    assert backend.set_state(b"other", t1) == (b"same", t2, False)


def test_token_for_a_vanished_state_reads_none(client):
    store = client()
    backend = C10dRendezvousBackend(store, "run")
    _, token, _ = backend.set_state(b"v1")
    store.delete_key(RunKeys.for_run("run").state)
    assert backend.set_state(b"v2", token) is None


def test_foreign_token_is_refused_with_the_current_state(client):
    backend = C10dRendezvousBackend(client(), "run")
    _, token, _ = backend.set_state(b"v1")
    assert backend.set_state(b"v2", 7) == (b"v1", token, False)


def test_write_between_reading_generation_and_state_is_not_missed(client):
    a, b = C10dRendezvousBackend(client(), "run"), C10dRendezvousBackend(client(), "run")
    _, token, _ = a.set_state(b"v1")
    peek = a._calls.peek

    def peek_then_write(key):
        value = peek(key)
        b.set_state(b"v2", token)
        return value

    a._calls.peek = peek_then_write
    started = time.monotonic()
    a.wait_for_change(token, timeout=20)
    assert time.monotonic() - started < 5


def test_waiting_does_not_hold_up_other_calls_on_the_same_store(tcp_client):
    backend = C10dRendezvousBackend(tcp_client(), "run")
    _, token, _ = backend.set_state(b"v1")
    waiter = threading.Thread(target=backend.wait_for_change, args=(token, 1.5))
    waiter.start()
    try:
        time.sleep(0.2)
        started = time.monotonic()
        backend.liveness.beat("node", 10)
        assert time.monotonic() - started < 1
    finally:
        waiter.join()


def test_waits_share_one_background_wait_per_key_and_one_connection(tcp_client):
    backend = C10dRendezvousBackend(tcp_client(), "run")
    clones = []
    original = backend._calls.clone
    backend._calls.clone = lambda: clones.append(1) or original()
    _, token, _ = backend.set_state(b"v1")
    started = time.monotonic()
    for _ in range(3):
        backend.wait_for_change(token, 0.2)
    # Each wait ended at its own timeout, locally, and all three shared one background wait.
    assert time.monotonic() - started < 2
    assert len(backend._key_waiter._waits) == 1
    assert clones == []  # the connection opened at construction serves it
    writer = C10dRendezvousBackend(tcp_client(), "run")
    writer.set_state(b"v2", token)
    deadline = time.monotonic() + 10
    while backend._key_waiter._waits and time.monotonic() < deadline:
        time.sleep(0.01)
    assert backend._key_waiter._waits == {}  # the write ended it, and its connection is idle again
    assert len(backend._key_waiter._idle) == 1


def test_timed_out_waits_of_many_nodes_do_not_stall(tcp_client):
    # TCPStore's own wait timeout stalls for seconds when many clients time out together.
    backends = [C10dRendezvousBackend(tcp_client(), "run") for _ in range(16)]
    _, token, _ = backends[0].set_state(b"v1")
    took = []

    def wait(backend):
        for _ in range(3):
            started = time.monotonic()
            backend.wait_for_change(token, 0.3)
            took.append(time.monotonic() - started)

    threads = [threading.Thread(target=wait, args=(b,)) for b in backends]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(took) < 2


def test_old_wake_keys_are_deleted(client, monkeypatch):
    monkeypatch.setattr("c10d_rdzv.backend.WAKE_KEYS_KEPT", 2)
    store = client()
    backend = C10dRendezvousBackend(store, "run")
    keys = RunKeys.for_run("run")
    _, token, _ = backend.set_state(b"v")
    for _ in range(3):
        _, token, _ = backend.set_state(b"v", token)
    assert not store.check([keys.changed(1)]) and not store.check([keys.changed(2)])
    assert store.check([keys.changed(3), keys.changed(4)])


def test_mailbox_keeps_records_with_any_bytes(client):
    backend = C10dRendezvousBackend(client(), "run")
    records = [b"", b"1:x,", b"\n\x00:,", b"{}" * 50]
    posted = [backend.mailbox.post(record) for record in records]
    assert [p.data for p in posted] == records
    read = backend.mailbox.read(0)
    assert [r.data for r in read] == records
    # Positions are the byte offsets just past each frame, so a cursor resumes between records.
    assert [r.position for r in read] == list(itertools.accumulate(len(frame(r)) for r in records))
    assert [r.data for r in backend.mailbox.read(read[1].position)] == records[2:]


def test_forgotten_node_stays_dead_and_keys_stay_on_the_fast_path(client):
    store = client()
    backend = C10dRendezvousBackend(store, "run")
    backend.liveness.beat("a", 10)
    backend.liveness.forget("a")
    assert store.check([RunKeys.for_run("run").heartbeat("a")])
    assert backend.liveness.alive(["a"], 10) == set()
    assert backend.liveness.alive([], 10) == set()


def test_corrupt_state_raises_state_error(client):
    store = client()
    key = RunKeys.for_run("run").state
    store.set(key, b"not ours")
    with pytest.raises(RendezvousStateError, match=key):
        C10dRendezvousBackend(store, "run").get_state()


@pytest.mark.parametrize("log", [b"x", b"4:join", b"9:join,", b"4:join,3"])
def test_corrupt_mailbox_raises_state_error(client, log):
    store = client()
    key = RunKeys.for_run("run").log
    store.set(key, log)
    with pytest.raises(RendezvousStateError, match=key):
        C10dRendezvousBackend(store, "run").mailbox.read(0)


@pytest.mark.parametrize("value", [b"soon", b"nan", b"\xff"])
def test_corrupt_heartbeat_raises_state_error(client, value):
    store = client()
    key = RunKeys.for_run("run").heartbeat("node")
    store.set(key, value)
    liveness = C10dRendezvousBackend(store, "run").liveness
    with pytest.raises(RendezvousStateError, match=key):
        liveness.alive(["node"], 10)
    with pytest.raises(RendezvousStateError, match=key):
        liveness.alive(["node", "never-beat"], 10)


def test_store_failures_raise_connection_errors_naming_store_and_operation():
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
    port = server.port
    client = TCPStore("127.0.0.1", port, is_master=False, timeout=TIMEOUT)
    backend = C10dRendezvousBackend(client, "run")
    del server
    with pytest.raises(RendezvousConnectionError, match=rf"TCPStore 127\.0\.0\.1:{port}.*compare_set"):
        backend.get_state()
    with pytest.raises(RendezvousConnectionError, match="append"):
        backend.mailbox.post(b"x")


# The mailbox's trim: a header frame ``@<base>,`` records the absolute offset of the first kept
# byte, so cursors stay absolute while the folded prefix is cut away.

RECORD = b"r" * 200  # 204 bytes framed: 21 records pass TRIM_MIN_BYTES (4 KiB)


def _post(backend, count, tag=b""):
    return [backend.mailbox.post(RECORD + tag + b"%d" % i) for i in range(count)]


def test_trim_drops_the_folded_prefix(client):
    store = client()
    key = RunKeys.for_run("run").log
    backend = C10dRendezvousBackend(store, "run")
    _post(backend, 40)
    full = len(store.get(key))
    records = backend.mailbox.read(0)
    cursor = records[-1].position
    assert cursor == full
    # What a winning write does: fold everything read, store the cursor, trim to it.
    assert backend.set_state(b"folded", None, records)[2]
    backend.mailbox.trim(cursor)
    assert len(store.get(key)) < 32
    assert backend.mailbox.read(cursor) == []
    (late,) = _post(backend, 1, b"late")
    (read,) = backend.mailbox.read(cursor)
    assert read.data == late.data and read.position == cursor + len(frame(late.data))
    # A read now fetches only the unfolded tail.
    assert len(store.get(key)) < 32 + len(frame(late.data))


def test_positions_stay_absolute_across_trims(client):
    backend = C10dRendezvousBackend(client(), "run")
    other = C10dRendezvousBackend(client(), "run")
    cursor = 0
    for batch in range(4):
        posted = _post(backend, 25, b"-%d-" % batch)
        backend.mailbox.read(cursor)  # a TCPStore append is unacknowledged: this waits it out
        records = other.mailbox.read(cursor)
        assert [r.data for r in records] == [p.data for p in posted]
        expected = list(itertools.accumulate((len(frame(p.data)) for p in posted), initial=cursor))[1:]
        assert [r.position for r in records] == expected
        cursor = records[-1].position
        other.mailbox.trim(cursor)
        assert backend.mailbox.read(cursor) == []
    store = other._calls.store
    assert store.get(RunKeys.for_run("run").log) == b"@%d," % cursor


def test_record_appended_between_read_and_trim_survives(client):
    backend = C10dRendezvousBackend(client(), "run")
    poster = C10dRendezvousBackend(client(), "run")
    _post(backend, 30)
    records = backend.mailbox.read(0)
    cursor = records[-1].position
    poster.mailbox.post(b"late")
    # On the poster's connection, the append is applied before this read: it lands between
    # ``backend``'s read and its trim.
    assert poster.mailbox.read(cursor)[-1].data == b"late"
    backend.mailbox.trim(cursor)
    assert [r.data for r in backend.mailbox.read(cursor)] == [b"late"]
    assert [r.data for r in poster.mailbox.read(cursor)] == [b"late"]
    # The trim lost its first compare-and-set to the append, and cut on its second.
    assert backend._calls.store.get(RunKeys.for_run("run").log).startswith(b"@%d," % cursor)


def test_trim_that_always_loses_a_race_keeps_every_record(client):
    """An append lands before each of trim's compare-and-sets: trim gives up, dropping nothing."""
    store = client()
    backend = C10dRendezvousBackend(store, "run")
    key = RunKeys.for_run("run").log
    _post(backend, 30)
    records = backend.mailbox.read(0)
    calls = backend._calls
    original = type(calls).__call__

    def racing(self, op, key_, *args):
        if op == "compare_set" and key_ == key and args[0] != b"\x00absent":
            original(self, "append", key, frame(b"raced"))
        return original(self, op, key_, *args)

    type(calls).__call__ = racing
    try:
        backend.mailbox.trim(records[-1].position)
    finally:
        type(calls).__call__ = original
    assert [r.data for r in backend.mailbox.read(0)] == [r.data for r in records] + [b"raced"] * 2
    assert not store.get(key).startswith(b"@")


def test_header_less_log_reads_as_base_zero_and_trims(client):
    store = client()
    key = RunKeys.for_run("run").log
    old = [RECORD + b"%d" % i for i in range(30)]
    store.set(key, b"".join(frame(r) for r in old))
    backend = C10dRendezvousBackend(store, "run")
    records = backend.mailbox.read(0)
    assert [r.data for r in records] == old
    assert [r.position for r in records] == list(itertools.accumulate(len(frame(r)) for r in old))
    backend.mailbox.trim(records[24].position)
    assert store.get(key).startswith(b"@%d," % records[24].position)
    assert backend.mailbox.read(records[24].position) == records[25:]


def _trimmed_after_25(client):
    """A backend whose log of 30 records was trimmed after its 25th, and those 30 records."""
    backend = C10dRendezvousBackend(client(), "run")
    _post(backend, 30)
    records = backend.mailbox.read(0)
    backend.mailbox.trim(records[24].position)
    return backend, records


def test_cursor_below_the_base_reads_from_the_base(client):
    backend, records = _trimmed_after_25(client)
    # A node whose state predates the trimming write reads the kept records, with their positions.
    assert backend.mailbox.read(0) == records[25:]
    assert backend.mailbox.read(records[3].position) == records[25:]


def test_trim_below_the_threshold_or_the_base_costs_nothing(client):
    backend, records = _trimmed_after_25(client)
    requests = []
    original = type(backend._calls).__call__
    type(backend._calls).__call__ = lambda self, *a: requests.append(a) or original(self, *a)
    try:
        backend.mailbox.trim(records[2].position)   # below the base
        backend.mailbox.trim(records[26].position)  # 2 records past it
        backend.mailbox.trim(records[24].position)  # at it
    finally:
        type(backend._calls).__call__ = original
    assert requests == []
    assert backend.mailbox.read(0) == records[25:]


@pytest.mark.parametrize("log", [b"@", b"@,4:join,", b"@x,4:join,", b"@-5,", b"@12", b"@" + b"9" * 30 + b","])
def test_corrupt_mailbox_header_raises_state_error(client, log):
    store = client()
    key = RunKeys.for_run("run").log
    store.set(key, log)
    with pytest.raises(RendezvousStateError, match=f"{key}.*header"):
        C10dRendezvousBackend(store, "run").mailbox.read(0)
