"""The latest revision of one key, kept current by one long-lived etcd watch per process.

Every node that waits for the rendezvous state to change waits here, so waiting costs no request:
one watch stream per (cluster, key) in the process delivers each change to all local waiters.
A watch opened per wait would cost a stream each time, and etcd delivers a watch that starts in
the past only on its next sync tick (100 ms).
"""

from __future__ import annotations

import threading
from typing import Any

import etcd3
import etcd3.etcdrpc as rpc
import grpc
import tenacity

from .client import EtcdClient, fail_over
from .config import EtcdConfig


class KeyWatch:
    """Tracks the revision of the last change to ``key`` (0 while it never existed); waiters block
    until it passes the revision they last read, so one that just wrote does not spin."""

    def __init__(self, config: EtcdConfig, key: str) -> None:
        self._etcd = EtcdClient(config)
        self._key = key.encode()
        self._cond = threading.Condition()
        self._revision = 0
        self._healthy = False
        self._closed = False
        self._stream_done: threading.Event | None = None
        self._call: Any = None
        self._thread = threading.Thread(target=self._run, name=f"etcd-watch {key}", daemon=True)
        self._thread.start()

    def wait_past(self, revision: int | None, timeout: float) -> None:
        """Return once the key changed after ``revision`` (``None``: it did not exist), or after
        ``timeout`` seconds. While the watch reconnects, waiters return at ``timeout``."""
        after = revision or 0
        with self._cond:
            self._cond.wait_for(lambda: self._closed or (self._healthy and self._revision > after), timeout)

    def _run(self) -> None:
        retrying = tenacity.Retrying(
            wait=tenacity.wait_exponential_jitter(multiplier=0.05, max=2.0),
            retry=tenacity.retry_if_exception(lambda exc: not self._closed),
        )
        try:
            retrying(self._watch)
        except Exception:
            # Only reached once closed: the stream was cancelled on purpose.
            pass

    def _watch(self) -> None:
        """Read the key's revision, then follow it on one stream until closed or broken."""
        try:
            response = self._etcd.request(lambda c: c.get_response(self._key))
        except Exception:
            self._set(healthy=False)
            raise
        current = response.kvs[0].mod_revision if response.kvs else 0
        self._set(healthy=True, revision=current)
        done = threading.Event()
        create = rpc.WatchCreateRequest(key=self._key, start_revision=response.header.revision + 1)

        def requests():
            yield rpc.WatchRequest(create_request=create)
            done.wait()

        client = self._etcd.raw
        call = rpc.WatchStub(client.channel).Watch(requests(), metadata=client.metadata)
        with self._cond:
            self._call, self._stream_done = call, done
        try:
            for reply in call:
                if reply.compact_revision or reply.canceled:
                    raise RuntimeError("the state watch was compacted or cancelled; re-reading")
                if reply.events:
                    self._set(healthy=True, revision=max(_revision_of(e, reply) for e in reply.events))
            raise RuntimeError("the state watch ended")
        except grpc.RpcError as exc:
            self._set(healthy=False)
            if not self._closed:
                fail_over(client, exc)
            raise
        finally:
            done.set()
            call.cancel()

    def _set(self, healthy: bool, revision: int | None = None) -> None:
        with self._cond:
            self._healthy = healthy
            if revision is not None:
                self._revision = max(self._revision, revision)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            call, self._call = self._call, None
            done, self._stream_done = self._stream_done, None
            self._cond.notify_all()
        if done is not None:
            done.set()
        if call is not None:
            call.cancel()
        self._thread.join(timeout=5)
        self._etcd.close()


def _revision_of(event: Any, reply: Any) -> int:
    # A put carries the key's new mod_revision; a delete carries none, so use the reply's revision.
    return event.kv.mod_revision or reply.header.revision


class _Registry:
    """Shares one ``KeyWatch`` among the backends of a process that watch the same key."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watches: dict[tuple[EtcdConfig, str], tuple[KeyWatch, int]] = {}

    def acquire(self, config: EtcdConfig, key: str) -> KeyWatch:
        with self._lock:
            watch, users = self._watches.get((config, key), (None, 0))
            if watch is None:
                watch = KeyWatch(config, key)
            self._watches[(config, key)] = (watch, users + 1)
            return watch

    def release(self, config: EtcdConfig, key: str) -> None:
        with self._lock:
            watch, users = self._watches.pop((config, key))
            if users > 1:
                self._watches[(config, key)] = (watch, users - 1)
                return
        watch.close()


watches = _Registry()
