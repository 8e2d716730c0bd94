"""``FailoverClient``: a failed call benches the endpoint it used, not whichever is current."""

from __future__ import annotations

import etcd3
import etcd3.exceptions
import grpc
import pytest
from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from etcd_rdzv.client import EtcdClient, FailoverClient, fail_over, pinned_endpoint
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
    from etcd_rdzv.client import is_transient

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
                raw.refresh_lease(0x123)
            time.sleep(0.2)
        deadline = time.monotonic() + 5
        while {t.ident for t in threading.enumerate()} - before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [t.name for t in threading.enumerate() if t.ident not in before] == []
    finally:
        raw.close()
