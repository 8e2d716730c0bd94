"""Leases: granting and revoking one, a key range's shared lease, and the keep-alive streams that
renew every lease of a client (the Go client's ``Lease`` keep-alive loop). A renewal is one message
on one of ``STREAMS`` streams that stay open, chosen by lease id (docs/design.md); one that gets no
reply on a channel that hears nothing else redials it (``client.silent_after``)."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import math
import queue
import threading
import time
from concurrent import futures
from concurrent.futures import Future

import etcd3
import etcd3.exceptions
import grpc
from etcd3.etcdrpc import LeaseKeepAliveRequest, LeaseStub
from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from .client import EtcdClient, FailoverClient, Retryable, RpcStatus, fail_over, silent_after

logger = logging.getLogger(__name__)

STREAMS = 8  # keep-alive streams per client, opened as used


class KeepAliveFailed(Exception):
    """A renewal failed: ``error`` is the stream's status, ``endpoint`` the endpoint it was on;
    ``abandoned``: the connection went silent and was left, so the renewal goes again at once."""

    def __init__(self, error: RpcStatus, endpoint: str | None, abandoned: bool = False) -> None:
        super().__init__(str(error))
        self.error, self.endpoint, self.abandoned = error, endpoint, abandoned


class _Stream:
    """An open ``LeaseKeepAlive`` call, the thread that reads its replies, the renewals waiting."""

    def __init__(self, client: FailoverClient) -> None:
        self._lock = threading.Lock()
        self._requests: queue.SimpleQueue[LeaseKeepAliveRequest | None] = queue.SimpleQueue()
        self._waiting: dict[int, collections.deque[Future]] = collections.defaultdict(collections.deque)  # TTLs
        self.failure: RpcStatus | None = None
        # The channel, not a cached stub: a stub made before a redial rides the abandoned connection.
        self.channel = client.channel
        self.endpoint = client._current_endpoint_label
        self._hearing = client.hearing
        self._call = LeaseStub(self.channel).LeaseKeepAlive(
            iter(self._requests.get, None), credentials=client.call_credentials, metadata=client.metadata
        )
        self._reader = threading.Thread(target=self._read, name="etcd-rdzv-keepalive", daemon=True)
        self._reader.start()

    def send(self, lease_id: int) -> Future:
        renewal = Future()
        with self._lock:
            if self.failure is not None:
                renewal.set_exception(RpcStatus.of(self.failure))
                return renewal
            self._waiting[lease_id].append(renewal)
        self._requests.put(LeaseKeepAliveRequest(ID=lease_id))
        return renewal

    def _read(self) -> None:
        try:
            for reply in self._call:  # etcd answers a stream's requests in order
                self._hearing.heard(self.endpoint)
                with self._lock:
                    waiting = self._waiting.get(reply.ID)
                    renewal = waiting.popleft() if waiting else None
                if renewal is not None:
                    renewal.set_result(reply.TTL)
            failure = RpcStatus(grpc.StatusCode.UNAVAILABLE, "the lease keep-alive stream ended")
        except grpc.RpcError as exc:
            failure = RpcStatus.of(exc)
        self._fail(failure)

    def _fail(self, failure: RpcStatus) -> None:
        with self._lock:
            self.failure = self.failure or failure
            waiting, self._waiting = self._waiting, collections.defaultdict(collections.deque)
        self._requests.put(None)  # ends the feed thread
        for renewal in (r for renewals in waiting.values() for r in renewals):
            renewal.set_exception(RpcStatus.of(self.failure))

    def cancel(self, why: RpcStatus, join: float | None = None) -> None:
        self._fail(why)
        self._call.cancel()
        if join is not None and self._reader is not threading.current_thread():
            self._reader.join(join)


class KeepAliveStreams:
    """The keep-alive streams of ``of(client)``, each opened on first use and again after it failed."""

    def __init__(self, client: FailoverClient, streams: int = STREAMS) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._streams: list[_Stream | None] = [None] * streams
        self._stopped = False

    @classmethod
    def of(cls, client: FailoverClient) -> KeepAliveStreams:
        with client._dial_lock:
            streams = getattr(client, "keep_alive", None)
            if streams is None:
                streams = client.keep_alive = cls(client)
                client.on_redial.append(streams.abandon)
                client.on_close.append(streams.stop)
        return streams

    def renew(self, lease_id: int, timeout: float, silent_after: float | None = None) -> int:
        """Renew ``lease_id`` once; the TTL etcd gave it (0: gone). ``KeepAliveFailed``: the stream
        failed, gave no reply within ``timeout``, or heard nothing for ``silent_after`` seconds."""
        with self._lock:
            if self._stopped:
                raise KeepAliveFailed(RpcStatus(grpc.StatusCode.CANCELLED, "the etcd client is closed"), None)
            slot = lease_id % len(self._streams)  # one lease's renewals stay in order
            stream = self._streams[slot]
            if stream is None or stream.failure is not None:
                stream = self._streams[slot] = _Stream(self._client)
        renewal = stream.send(lease_id)
        end = time.monotonic() + timeout
        wait = timeout if silent_after is None else min(silent_after, timeout)
        while not futures.wait([renewal], wait).done:
            if silent_after is not None:
                quiet = self._client.hearing.quiet_for(stream.endpoint)
                if quiet >= silent_after:
                    why = f"no reply on it for {quiet:.1f}s, not even to a lease renewal"
                    self._client.redial(stream.endpoint, stream.channel, why)
                    gone = RpcStatus(grpc.StatusCode.UNAVAILABLE, f"the connection went silent ({why})")
                    raise KeepAliveFailed(gone, stream.endpoint, abandoned=True)
            remaining = end - time.monotonic()
            if remaining <= 0:
                late = RpcStatus(grpc.StatusCode.DEADLINE_EXCEEDED, f"no lease keep-alive reply within {timeout:g}s")
                stream.cancel(late)
                raise KeepAliveFailed(RpcStatus.of(late), stream.endpoint)
            # The channel heard something lately: etcd is slow, not gone; look again later.
            wait = remaining if silent_after is None else min(remaining, max(0.05, silent_after - quiet))
        if renewal.exception() is not None:
            raise KeepAliveFailed(renewal.exception(), stream.endpoint)
        return renewal.result()

    def abandon(self, channel: object, why: RpcStatus) -> None:
        """Cancel the streams on ``channel``, whose connection was left."""
        with self._lock:
            streams = [s for s in self._streams if s is not None and s.channel is channel]
            self._streams = [None if s in streams else s for s in self._streams]
        for stream in streams:
            stream.cancel(why)

    def pause(self, timeout: float) -> None:
        """Close the streams and wait for their threads (before a ``fork()``); they reopen on use."""
        self._close(RpcStatus(grpc.StatusCode.UNAVAILABLE, "the lease keep-alive stream was paused"), timeout)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
        self._close(RpcStatus(grpc.StatusCode.CANCELLED, "the etcd client is closed"), 1.0)

    def _close(self, why: RpcStatus, timeout: float) -> None:
        with self._lock:
            streams, self._streams = self._streams, [None] * len(self._streams)
        end = time.monotonic() + timeout
        for stream in filter(None, streams):
            stream.cancel(why, join=max(0.0, end - time.monotonic()))


def refresh(client: FailoverClient, lease_id: int, ttl: float | None = None) -> bool:
    """Renew the lease once, within a request; ``False`` if it is gone. Its ``ttl`` bounds the wait
    on a silent connection."""
    try:
        return KeepAliveStreams.of(client).renew(lease_id, client.timeout, silent_after(ttl, client.timeout)) > 0
    except KeepAliveFailed as failed:
        if failed.abandoned:
            raise Retryable(failed.error.details()) from failed.error
        fail_over(client, failed.error, failed.endpoint)


def grant(etcd: EtcdClient, ttl: float, budget: float | None = None) -> int:
    """A new lease of ``ttl`` seconds (``grant_within``), as a request of its own; its id."""
    return etcd.request(lambda c: grant_within(c, ttl), budget)


def grant_within(client: FailoverClient, ttl: float) -> int:
    """A new lease of ``ttl`` seconds, rounded up to whole seconds (etcd's unit), within a request."""
    return client.lease(max(1, math.ceil(ttl))).id


def revoke(etcd: EtcdClient, lease_id: int) -> None:
    """Revoke a lease with one attempt; a failure is only logged, its TTL ends it anyway."""
    try:
        etcd.request(lambda c: c.revoke_lease(lease_id), budget=0)
    except RendezvousConnectionError as exc:
        logger.debug("Could not revoke etcd lease %x: %s", lease_id, exc)


class SharedLease:
    """One lease shared, without coordination, by every process that writes a key range: its id is
    a hash of ``name``. Each process renews it on use, at most every ``ttl / 4``, and none revokes
    it, so the keys on it vanish ``ttl`` after the range went quiet (a run's keys)."""

    def __init__(self, name: str, ttl: float) -> None:
        digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
        self.id = (digest & (2**63 - 1)) or 1
        self._ttl = max(1, math.ceil(ttl))
        self._lock = threading.Lock()
        self._renewed_at: float | None = None

    def current(self, client: FailoverClient) -> int:
        """The lease id, granted first if this process has not confirmed it, renewed when due; call
        within a request. Only the first use waits: a renewal due later is made by one caller."""
        with self._lock:
            renewed_at = self._renewed_at
            if renewed_at is not None:
                if time.monotonic() - renewed_at < self._ttl / 4:
                    return self.id
                self._renewed_at = time.monotonic()
        if renewed_at is not None:
            self._renew(client)
            return self.id
        with self._lock:
            if self._renewed_at is None:
                self._renew(client)
                self._renewed_at = time.monotonic()
        return self.id

    def _renew(self, client: FailoverClient) -> None:
        if not refresh(client, self.id):
            with contextlib.suppress(etcd3.exceptions.PreconditionFailedError):  # granted by another process
                client.lease(self._ttl, lease_id=self.id)

    def lost(self, lease_id: int) -> None:
        """The lease lapsed: the next ``current`` grants it again."""
        with self._lock:
            self._renewed_at = None
