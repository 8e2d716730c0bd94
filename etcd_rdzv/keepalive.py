"""A few lease keep-alive streams per client, shared by every lease the process renews.

etcd renews a lease only over the bidirectional ``LeaseKeepAlive`` stream. etcd3's
``refresh_lease`` opens a stream per renewal, and gRPC starts a thread to feed each one: a process
of a few hundred nodes that beat every few seconds spent most of its CPU opening streams (at
N = 1024 over 4 processes, a hundred at a time), so beats fell behind and leases lapsed. Here a
renewal is one message on a stream that stays open: a request goes out, and the reply with the
lease's id comes back to the renewal that sent it (etcd answers a stream's requests in order).

etcd also handles a stream's requests one at a time, and its leader holds each renewal until it
has applied every entry committed before it: while the run is being written to, a renewal waits
for the next apply. On one stream, 255 nodes of a process that renewed at once (a re-rendezvous)
waited 1.2 s for the median reply. So a lease is renewed on one of ``STREAMS`` streams (chosen by
its id, so that one lease's renewals stay in order), which wait for the apply side by side.

A renewal that gets no reply while its channel hears nothing else either finds the connection
silent (``silence.py``): it has the client dial a new one, and fails so as to be sent again there.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Iterator

import etcd3
import grpc
from etcd3.etcdrpc import LeaseKeepAliveRequest, LeaseStub

from .status import RpcStatus

# Streams per client (each has a reader thread, and a gRPC thread that feeds it), opened as used.
STREAMS = 8


class KeepAliveFailed(Exception):
    """A renewal failed: ``error`` is the stream's gRPC error, ``endpoint`` the label of the
    endpoint the stream was on (the one to bench). ``abandoned``: the connection went silent and
    the client dialled a new one, so the renewal is to be sent again at once, there."""

    def __init__(self, error: RpcStatus, endpoint: str | None, abandoned: bool = False) -> None:
        super().__init__(str(error))
        self.error = error
        self.endpoint = endpoint
        self.abandoned = abandoned


class _Renewal:
    """One renewal waiting for its reply."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.ttl = 0
        self.error: RpcStatus | None = None

    def finish(self, ttl: int = 0, error: RpcStatus | None = None) -> None:
        self.ttl, self.error = ttl, error
        self._done.set()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)


class _Stream:
    """An open ``LeaseKeepAlive`` call, the thread that reads its replies, and the renewals waiting."""

    def __init__(self, client: etcd3.MultiEndpointEtcd3Client) -> None:
        self._lock = threading.Lock()
        self._requests: queue.SimpleQueue[LeaseKeepAliveRequest | None] = queue.SimpleQueue()
        self._waiting: dict[int, collections.deque[_Renewal]] = collections.defaultdict(collections.deque)
        self.failure: RpcStatus | None = None  # never raised itself: each renewal gets a copy
        # The channel itself, not the client's cached stub: a stub made before a redial would open
        # the stream on the connection just abandoned.
        self.channel = client.channel  # moves off a benched endpoint first
        self.endpoint = client._current_endpoint_label
        self._hearing = client.hearing
        self._call = LeaseStub(self.channel).LeaseKeepAlive(
            self._feed(), credentials=client.call_credentials, metadata=client.metadata
        )
        self._reader = threading.Thread(target=self._read, name="etcd-rdzv-keepalive", daemon=True)
        self._reader.start()

    def _feed(self) -> Iterator[LeaseKeepAliveRequest]:
        while (request := self._requests.get()) is not None:
            yield request

    def send(self, lease_id: int) -> _Renewal:
        renewal = _Renewal()
        with self._lock:
            if self.failure is not None:
                renewal.finish(error=RpcStatus.of(self.failure))
                return renewal
            self._waiting[lease_id].append(renewal)
        self._requests.put(LeaseKeepAliveRequest(ID=lease_id))
        return renewal

    def _read(self) -> None:
        try:
            for reply in self._call:
                self._hearing.heard(self.endpoint)
                with self._lock:
                    waiting = self._waiting.get(reply.ID)
                    renewal = waiting.popleft() if waiting else None
                if renewal is not None:
                    renewal.finish(ttl=reply.TTL)
            failure = RpcStatus(grpc.StatusCode.UNAVAILABLE, "the lease keep-alive stream ended")
        except grpc.RpcError as exc:
            failure = RpcStatus.of(exc)
        self._fail(failure)

    def _fail(self, failure: RpcStatus) -> None:
        with self._lock:
            if self.failure is None:
                self.failure = failure
            waiting, self._waiting = self._waiting, collections.defaultdict(collections.deque)
        self._requests.put(None)  # ends the feed, whose thread would otherwise wait on for ever
        for renewals in waiting.values():
            for renewal in renewals:
                renewal.finish(error=RpcStatus.of(self.failure))

    def cancel(self, why: RpcStatus, join: float | None = None) -> None:
        """End the stream; the renewals waiting fail with ``why``."""
        self._fail(why)
        self._call.cancel()
        if join is not None and self._reader is not threading.current_thread():
            self._reader.join(join)


class KeepAliveStream:
    """The shared streams of one client: each opened on first use, and again on the client's
    current endpoint after it failed or went silent.

    Args:
        client: the etcd3 client whose channel (and endpoint) the streams use.
        streams: how many streams the renewals are spread over (``STREAMS``).
    """

    def __init__(self, client: etcd3.MultiEndpointEtcd3Client, streams: int = STREAMS) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._streams: list[_Stream | None] = [None] * streams
        self._stopped = False

    def renew(self, lease_id: int, timeout: float, silent_after: float | None = None) -> int:
        """Renew ``lease_id`` once; return the TTL etcd gave it (0: the lease no longer exists).

        Args:
            timeout: how long to wait for the reply.
            silent_after: once the reply is this many seconds late and the channel heard nothing
                else for as long, the connection is silent: the client dials a new one
                (``redial``) and the renewal fails as ``abandoned``.

        Raises:
            KeepAliveFailed: the stream failed, or gave no reply within ``timeout`` (it is then
                dropped: the next renewal on it opens another), or its connection went silent.
        """
        slot = lease_id % len(self._streams)
        with self._lock:
            if self._stopped:
                raise KeepAliveFailed(RpcStatus(grpc.StatusCode.CANCELLED, "the etcd client is closed"), None)
            stream = self._streams[slot]
            if stream is None or stream.failure is not None:
                stream = self._streams[slot] = _Stream(self._client)
        renewal = stream.send(lease_id)
        end = time.monotonic() + timeout
        wait = timeout if silent_after is None else min(silent_after, timeout)
        while not renewal.wait(wait):
            if silent_after is not None:
                quiet = self._client.hearing.quiet_for(stream.endpoint)
                if quiet >= silent_after:
                    why = f"no reply on it for {quiet:.1f}s, not even to a lease renewal"
                    self._client.redial(stream.endpoint, stream.channel, why)
                    gone = RpcStatus(grpc.StatusCode.UNAVAILABLE, f"the connection went silent ({why})")
                    raise KeepAliveFailed(gone, stream.endpoint, abandoned=True)
            remaining = end - time.monotonic()
            if remaining <= 0:
                silent = RpcStatus(grpc.StatusCode.DEADLINE_EXCEEDED, f"no lease keep-alive reply within {timeout:g}s")
                stream.cancel(silent)
                raise KeepAliveFailed(RpcStatus.of(silent), stream.endpoint)
            # The channel heard something lately: etcd is slow, not gone. Look again once it
            # could have been quiet for ``silent_after``.
            wait = remaining if silent_after is None else min(remaining, max(0.05, silent_after - quiet))
        if renewal.error is not None:
            raise KeepAliveFailed(renewal.error, stream.endpoint)
        return renewal.ttl

    def abandon(self, channel: object, why: RpcStatus) -> None:
        """Cancel the streams on ``channel`` (its connection was abandoned); their renewals fail
        with ``why``, and the next renewals open streams on the endpoint's new channel."""
        with self._lock:
            streams = [s for s in self._streams if s is not None and s.channel is channel]
            self._streams = [None if s in streams else s for s in self._streams]
        for stream in streams:
            stream.cancel(why)

    def pause(self, timeout: float) -> None:
        """Close the streams and wait for their threads (before a ``fork()``); renewals in flight
        fail as retryable, and the next ones open other streams."""
        self._close(RpcStatus(grpc.StatusCode.UNAVAILABLE, "the lease keep-alive stream was paused"), timeout)

    def stop(self) -> None:
        """Close the streams for good (the client is closing)."""
        with self._lock:
            self._stopped = True
        self._close(RpcStatus(grpc.StatusCode.CANCELLED, "the etcd client is closed"), 1.0)

    def _close(self, why: RpcStatus, timeout: float) -> None:
        with self._lock:
            streams, self._streams = self._streams, [None] * len(self._streams)
        end = time.monotonic() + timeout
        for stream in streams:
            if stream is not None:
                stream.cancel(why, join=max(0.0, end - time.monotonic()))
