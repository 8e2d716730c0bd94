"""Waiting for the first change to a key with an etcd watch: no polling."""

from __future__ import annotations

import threading
import time

import etcd3
import etcd3.etcdrpc
import etcd3.exceptions
import grpc

from .client import fail_over


class WatchCanceled(etcd3.exceptions.Etcd3Exception):
    """etcd ended the watch for a reason other than compaction (e.g. missing permission)."""


def wait_for_events(
    client: etcd3.MultiEndpointEtcd3Client,
    key: bytes,
    start_revision: int | None,
    timeout: float,
) -> list:
    """Return the events on ``key`` from ``start_revision`` on, at the first response that has
    any, or ``[]`` once ``timeout`` seconds pass.

    ``start_revision=None`` watches from the next revision. Events already in the history since
    ``start_revision`` come back at once. If that history was compacted, ``[]`` comes back early:
    the caller must re-read, which it does after any return. The watch is always cancelled.

    Raises:
        WatchCanceled: etcd refused or ended the watch.
        etcd3.exceptions.Etcd3Exception: the connection failed (its endpoint is marked failed).
    """
    if timeout <= 0:
        return []
    create = etcd3.etcdrpc.WatchCreateRequest(key=key, start_revision=start_revision or 0)
    done = threading.Event()
    ends_at = time.monotonic() + timeout

    def requests():
        yield etcd3.etcdrpc.WatchRequest(create_request=create)
        # Ending the request stream would end the watch on the server: hold it open until done.
        done.wait()

    call = etcd3.etcdrpc.WatchStub(client.channel).Watch(requests(), timeout=timeout, metadata=client.metadata)
    try:
        for response in call:
            if response.compact_revision:
                return []
            if response.canceled:
                raise WatchCanceled(response.cancel_reason or "the watch was cancelled by etcd")
            if response.events:
                return list(response.events)
        return []
    except grpc.RpcError as exc:
        # The gRPC deadline is how the timeout ends the stream; etcd may report it as UNKNOWN.
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED or time.monotonic() >= ends_at:
            return []
        fail_over(client, exc)
    finally:
        done.set()
        call.cancel()

