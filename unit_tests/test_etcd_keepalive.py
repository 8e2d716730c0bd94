"""The shared lease keep-alive streams (``etcd_rdzv/keepalive.py``), over a stand-in gRPC call."""

from __future__ import annotations

import queue
import threading
from types import SimpleNamespace

import pytest

from etcd_rdzv.runtime.lessor import KeepAliveFailed, KeepAliveStreams as KeepAliveStream
from etcd_rdzv.runtime.client import Hearing


class _Call:
    """A ``LeaseKeepAlive`` call that answers its requests in order, as etcd does, and stops
    answering at the first request for a lease in ``stalled`` (an etcd leader waiting to apply)."""

    def __init__(self, requests, stalled: set[int]) -> None:
        self._replies: queue.SimpleQueue = queue.SimpleQueue()

        def serve() -> None:
            for request in requests:
                if request.ID in stalled:
                    return
                self._replies.put(SimpleNamespace(ID=request.ID, TTL=7))

        threading.Thread(target=serve, daemon=True).start()

    def __iter__(self):
        while (reply := self._replies.get()) is not None:
            yield reply

    def cancel(self) -> None:
        self._replies.put(None)


def _client(stalled: set[int], opened: list[_Call]) -> SimpleNamespace:
    def open_call(requests, credentials=None, metadata=None):
        opened.append(_Call(requests, stalled))
        return opened[-1]

    # A channel as etcd3's ``LeaseStub`` uses it: only its keep-alive stream is ever opened here.
    channel = SimpleNamespace(stream_stream=lambda *a, **k: open_call, unary_unary=lambda *a, **k: None)
    return SimpleNamespace(
        channel=channel,
        _current_endpoint_label="127.0.0.1:2379",
        call_credentials=None,
        metadata=None,
        hearing=Hearing(),
    )


def test_a_renewal_does_not_wait_behind_another_leases_renewal_on_its_stream():
    """etcd answers a stream's renewals one at a time, each once its leader has applied what was
    committed before it: on one shared stream, a re-rendezvous of 255 nodes of a process waited
    1.2 s for the median renewal. Leases on different streams do not wait for each other."""
    opened: list[_Call] = []
    stream = KeepAliveStream(_client({10}, opened), streams=2)
    try:
        stalled = threading.Thread(target=lambda: pytest.raises(KeepAliveFailed, stream.renew, 10, 3.0), daemon=True)
        stalled.start()
        assert stream.renew(11, 2.0) == 7  # the other stream
        with pytest.raises(KeepAliveFailed, match="no lease keep-alive reply within 0.2s"):
            stream.renew(12, 0.2)  # queued behind lease 10 on its stream
        assert len(opened) == 2
        assert stream.renew(13, 2.0) == 7 and len(opened) == 2  # stays open
        stalled.join(5)
    finally:
        stream.stop()


def test_a_stopped_client_renews_nothing():
    stream = KeepAliveStream(_client(set(), []), streams=2)
    assert stream.renew(5, 2.0) == 7
    stream.stop()
    with pytest.raises(KeepAliveFailed, match="closed"):
        stream.renew(5, 2.0)
