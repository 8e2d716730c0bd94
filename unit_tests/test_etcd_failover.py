"""``FailoverClient``: a failed call benches the endpoint it used, not whichever is current."""

from __future__ import annotations

import time

import etcd3
import etcd3.etcdrpc
import etcd3.exceptions
import grpc
import pytest
from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from etcd_rdzv.runtime.client import EtcdClient, FailoverClient, fail_over, pinned_endpoint
from etcd_rdzv.runtime.lessor import refresh
from etcd_rdzv.config import EtcdConfig


class Failure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._code.name


@pytest.fixture
def client():
    # Nothing listens on these ports; no call is made, channels connect lazily.
    endpoints = [etcd3.Endpoint("127.0.0.1", port, secure=False, time_retry=1.0) for port in (1, 2)]
    raw = FailoverClient(endpoints, timeout=1, failover=True)
    raw._current_endpoint_label = "127.0.0.1:1"
    yield raw
    raw.close()


def fail(client, code=grpc.StatusCode.DEADLINE_EXCEEDED):
    try:
        raise Failure(code)
    except Failure as exc:
        client._manage_grpc_errors(exc)


def test_a_late_failure_on_the_endpoint_left_benches_that_one_only(client):
    with pinned_endpoint(client) as label:
        assert label == "127.0.0.1:1"
        # Meanwhile another thread's call failed there and the client moved on.
        client.endpoints["127.0.0.1:1"].fail()
        client.channel  # noqa: B018 - moves to the healthy endpoint
        assert client._current_endpoint_label == "127.0.0.1:2"
        with pytest.raises(etcd3.exceptions.ConnectionTimeoutError):
            fail(client)
    assert not client.endpoints["127.0.0.1:2"].is_failed()
    assert client._current_endpoint_label == "127.0.0.1:2"


def test_a_failure_on_the_current_endpoint_benches_it_as_etcd3_does(client):
    with pinned_endpoint(client):
        with pytest.raises(etcd3.exceptions.ConnectionFailedError):
            fail(client, grpc.StatusCode.UNAVAILABLE)
    assert client.endpoints["127.0.0.1:1"].is_failed()


def test_a_watch_failure_benches_the_watch_endpoint(client):
    client.channel  # noqa: B018
    client._current_endpoint_label = "127.0.0.1:2"
    with pytest.raises(etcd3.exceptions.ConnectionFailedError):
        try:
            raise Failure(grpc.StatusCode.UNAVAILABLE)
        except Failure as exc:
            fail_over(client, exc, "127.0.0.1:1")
    assert client.endpoints["127.0.0.1:1"].is_failed()
    assert not client.endpoints["127.0.0.1:2"].is_failed()


def test_statuses_that_do_not_bench_pass_through(client):
    with pinned_endpoint(client):
        client._current_endpoint_label = "127.0.0.1:2"
        with pytest.raises(etcd3.exceptions.PreconditionFailedError):
            fail(client, grpc.StatusCode.FAILED_PRECONDITION)
        with pytest.raises(Failure):
            fail(client, grpc.StatusCode.PERMISSION_DENIED)
    assert not any(e.is_failed() for e in client.endpoints.values())


def test_a_request_that_finds_every_endpoint_resting_names_the_failure_that_benched_them():
    """A request of one thread fails and benches the only endpoint; a request of another thread
    then finds it resting for its whole budget. Its error names the first failure, not etcd3's
    "no endpoint available", which says nothing of what went wrong."""
    etcd = EtcdClient(EtcdConfig(endpoints=(("127.0.0.1", 9),), read_timeout=1.0))
    try:
        with pytest.raises(RendezvousConnectionError, match="DEADLINE_EXCEEDED"):
            etcd.request(fail, budget=0)
        with pytest.raises(RendezvousConnectionError, match="DEADLINE_EXCEEDED") as failed:
            etcd.request(lambda client: client.get("/unit/key"), budget=0.3)
        assert failed.value.__cause__.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        etcd.close()


def test_a_request_on_a_closed_client_says_it_is_closed():
    """A session's keep-alive can be on its way when its cluster closes: gRPC would say only
    "Cannot invoke RPC: Channel closed!" (a ValueError, which killed the thread)."""
    etcd = EtcdClient(EtcdConfig(endpoints=(("127.0.0.1", 9),), read_timeout=1.0))
    etcd.close()
    with pytest.raises(RendezvousConnectionError, match="http://127.0.0.1:9 is closed"):
        etcd.request(lambda client: client.get("/unit/key"))


def test_the_failure_a_client_remembers_does_not_keep_the_failed_requests_objects_alive():
    """The client remembers its last failure (for the message above). Kept with its traceback,
    it held the frames of the request that failed, and with them the handler and store that made
    it: their run was never released, and its view and session threads ran on after the test."""
    import gc
    import weakref

    class Store:
        pass

    etcd = EtcdClient(EtcdConfig(endpoints=(("127.0.0.1", 9),), read_timeout=1.0))
    try:
        store = Store()
        gone = weakref.ref(store)

        def op(client, store=store):
            fail(client)

        with pytest.raises(RendezvousConnectionError, match="DEADLINE_EXCEEDED"):
            etcd.request(op, budget=0)
        del store, op
        gc.collect()
        assert gone() is None
        # Still the remembered failure, while the endpoint rests; on a loaded machine its rest may
        # be over by now, and the request's own attempt fails on the closed port instead.
        with pytest.raises(RendezvousConnectionError, match="DEADLINE_EXCEEDED|UNAVAILABLE: failed to connect"):
            etcd.request(lambda client: client.get("/unit/key"), budget=0.3)
    finally:
        etcd.close()


class Detailed(Failure):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code)
        self._details = details

    def details(self) -> str:
        return self._details


def test_etcd_back_pressure_is_retried_whatever_its_status_code():
    """etcd says "too many requests" while it applies entries far behind what it committed; a
    join of 4,096 nodes over 16 processes got it as UNKNOWN, and the node failed at once."""
    from etcd_rdzv.runtime.client import is_transient

    assert is_transient(Detailed(grpc.StatusCode.UNKNOWN, "etcdserver: too many requests"))
    assert is_transient(Detailed(grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: too many requests"))
    assert not is_transient(Detailed(grpc.StatusCode.UNKNOWN, "etcdserver: some other failure"))
    assert not is_transient(Detailed(grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: key is not provided"))


def test_a_failed_keep_alive_stream_leaves_no_thread_behind():
    """gRPC feeds a stream's requests from a thread of its own. A stream that failed (here: nothing
    listens) must end that thread: each renewal against a dead endpoint left one waiting for ever."""
    import threading
    import time

    raw = FailoverClient([etcd3.Endpoint("127.0.0.1", 9, secure=False, time_retry=0.1)], timeout=1, failover=True)
    before = {t.ident for t in threading.enumerate()}
    try:
        for _ in range(2):
            with pytest.raises(etcd3.exceptions.Etcd3Exception):
                refresh(raw, 0x123)
            time.sleep(0.2)
        deadline = time.monotonic() + 5
        while {t.ident for t in threading.enumerate()} - before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [t.name for t in threading.enumerate() if t.ident not in before] == []
    finally:
        raw.close()


def test_a_connection_error_states_the_time_its_request_waited():
    """A heartbeat gives up after its own budget (heartbeat_timeout), a session renewal after one
    tick: their messages said "could not be reached within read_timeout=60s" 3 s into an outage."""
    from etcd_rdzv.runtime.client import connection_error

    config = EtcdConfig(endpoints=(("127.0.0.1", 9),), read_timeout=60.0)
    refused = Detailed(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; Connection refused")
    short = str(connection_error(config, refused, waited=4.96, budget=5.0))
    assert "in 5.0s of trying" in short and "read_timeout" not in short
    full = str(connection_error(config, refused, waited=59.7, budget=60.0))
    assert "within read_timeout=60s (tried for 59.7s;" in full


def test_the_tls_hint_comes_only_with_a_failure_that_looks_like_a_tls_server():
    """A refused connection is no TLS server: the hint to set protocol=https misled. A TLS port
    that closes the connection on a plain-text client is one."""
    from etcd_rdzv.runtime.client import connection_error

    config = EtcdConfig(endpoints=(("127.0.0.1", 9),))
    refused = Detailed(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:9: Failed to connect to remote host: Connection refused")
    closed = Detailed(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:9: Socket closed")
    assert "protocol=https" not in str(connection_error(config, refused, 60.0))
    assert "protocol=https" in str(connection_error(config, closed, 60.0))
    secure = EtcdConfig(endpoints=(("127.0.0.1", 9),), protocol="https")
    assert "protocol=https" not in str(connection_error(secure, closed, 60.0))


def test_a_call_cut_off_by_a_redial_is_retried():
    """A connection that went silent is closed and dialled anew (``FailoverClient.redial``): the
    calls on it end with gRPC's CANCELLED "Channel closed!", or a ValueError for one that starts on
    it just then; either is retried on the new connection, not a failure of the request."""
    etcd = EtcdClient(EtcdConfig(endpoints=(("127.0.0.1", 9),), read_timeout=2.0))
    calls = []

    def op(client):
        calls.append(1)
        if len(calls) == 1:
            raise Detailed(grpc.StatusCode.CANCELLED, "Channel closed!")
        if len(calls) == 2:
            raise ValueError("Cannot invoke RPC on closed channel!")
        if len(calls) == 3:  # a stream on it (a lease's keep-alives) says so in its own words
            raise Detailed(grpc.StatusCode.CANCELLED, "Stream removed (Channel closed!)")
        return "answered"

    try:
        assert etcd.request(op) == "answered" and len(calls) == 4
    finally:
        etcd.close()


def test_a_redial_opens_a_connection_of_its_own_and_ends_the_calls_on_the_old_one():
    """gRPC shares a connection between channels to one address (another client of the process to
    the same endpoint, say) unless told not to: a channel dialled to leave a silent connection
    would have been handed that same connection, kept open by the other channel."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)  # held open, never answered: a silent server

    threading.Thread(target=accept, daemon=True).start()
    port = listener.getsockname()[1]
    config = EtcdConfig(endpoints=(("127.0.0.1", port),), read_timeout=2.0)
    etcd, other = EtcdClient(config), EtcdClient(config)

    def call(raw, outcome: dict) -> None:
        try:
            raw.kvstub.Range(etcd3.etcdrpc.RangeRequest(key=b"k"), timeout=30)
        except grpc.RpcError as exc:
            outcome["code"] = exc.code()

    def connections(count: int) -> int:
        deadline = time.monotonic() + 10
        while len(accepted) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # and no more than that
        return len(accepted)

    try:
        old, cut = etcd.raw.channel, {}
        waiter = threading.Thread(target=call, args=(etcd.raw, cut))
        waiter.start()
        threading.Thread(target=call, args=(other.raw, {}), daemon=True).start()
        assert connections(2) == 2  # each client on a connection of its own
        etcd.raw.redial(f"127.0.0.1:{port}", old, "a test")
        waiter.join(10)
        assert cut.get("code") == grpc.StatusCode.CANCELLED, cut
        assert etcd.raw.channel is not old
        threading.Thread(target=call, args=(etcd.raw, {}), daemon=True).start()
        assert connections(3) == 3, "the new channel got the old connection back"
        etcd.raw.redial(f"127.0.0.1:{port}", old, "again")  # left already: nothing happens
        assert etcd.raw.channel is not old and connections(3) == 3
    finally:
        etcd.close()
        other.close()
        listener.close()
        for conn in accepted:
            conn.close()
