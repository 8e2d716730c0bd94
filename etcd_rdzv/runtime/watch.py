"""The one etcd watch loop, which every watcher of the package iterates. Its stream carries the
client's require-leader metadata (a member cut off from its cluster cancels it); it can ask for
progress replies on a timer and cancel itself when even those stop (a half-open connection)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import etcd3
import etcd3.etcdrpc as rpc
import etcd3.exceptions
import grpc

from .client import fail_over


class WatchCanceled(etcd3.exceptions.Etcd3Exception):
    """etcd ended the watch for a reason other than compaction (e.g. missing permission)."""


class WatchCompacted(Exception):
    """The history the watch was to start from is compacted: re-read, then watch from there."""


class WatchStalled(etcd3.exceptions.Etcd3Exception):
    """Nothing came on the stream, not even a progress reply, for too long: it was cancelled."""


class Watch:
    """A watch stream on ``[key, range_end)`` from ``start_revision`` (0: now). Iterating yields
    etcd's replies in order until ``cancel`` or ``timeout``, or raises ``WatchCompacted``,
    ``WatchCanceled``, ``WatchStalled`` (no reply for ``stall_after`` seconds while progress is
    asked for every ``progress_every``), or etcd3's exception of a failed connection."""

    def __init__(self, client: etcd3.MultiEndpointEtcd3Client, key: bytes, range_end: bytes | None = None,
                 start_revision: int = 0, timeout: float | None = None, progress_every: float | None = None,
                 stall_after: float | None = None) -> None:
        self._client = client
        self._done = threading.Event()
        self._stalled = False
        self.heard_at = time.monotonic()
        create = rpc.WatchCreateRequest(key=key, range_end=range_end or b"", start_revision=start_revision)

        def requests() -> Iterator[rpc.WatchRequest]:
            yield rpc.WatchRequest(create_request=create)
            # Ending the request stream would end the watch on the server: hold it open until done.
            while not self._done.wait(progress_every):
                if stall_after is not None and time.monotonic() - self.heard_at > stall_after:
                    self._stalled = True
                    self._call.cancel()
                    return
                yield rpc.WatchRequest(progress_request=rpc.WatchProgressRequest())

        channel = client.channel
        # A failure benches the stream's endpoint, not the one current by then; every reply tells
        # the client that the connection is alive (``client.Hearing``).
        self._endpoint = getattr(client, "_current_endpoint_label", None)
        self._hearing = getattr(client, "hearing", None)
        self._call = rpc.WatchStub(channel).Watch(requests(), timeout=timeout, metadata=client.metadata)

    def __iter__(self) -> Iterator[Any]:
        try:
            for reply in self._call:
                self.heard_at = time.monotonic()
                if self._hearing is not None:
                    self._hearing.heard(self._endpoint)
                if reply.compact_revision:
                    raise WatchCompacted(f"revision {reply.compact_revision} is compacted")
                if reply.canceled:
                    raise WatchCanceled(reply.cancel_reason or "the watch was cancelled by etcd")
                yield reply
        except grpc.RpcError as exc:
            if self._stalled:
                raise WatchStalled("the watch stream went silent; it was cancelled") from exc
            if self._done.is_set() or exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return  # cancelled here, or its timeout is over
            fail_over(self._client, exc, self._endpoint)
        finally:
            self.cancel()

    def cancel(self) -> None:
        """End the stream; an iteration in progress ends. Idempotent, from any thread."""
        self._done.set()
        self._call.cancel()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()

