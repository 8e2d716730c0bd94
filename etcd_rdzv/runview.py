"""A process's live copy of one run's keys in etcd, kept current by one watch.

The nodes of a process read the run's state, join mailbox and liveness keys here instead of asking
etcd each time, and wait here for the state or a store key to change: one watch stream per
(cluster, run) delivers every change to every local node. Polling would cost a request per node
and wake; a watch opened per wait would cost a stream each time, and etcd delivers a watch that
starts in the past only on its next sync tick (100 ms).

The copy is a consistent snapshot: etcd sends a watcher's events in revision order, so after the
events up to revision ``r`` are applied the copy equals the keys at ``r``. The process tells the
view each revision of the run it learns of otherwise (a state it wrote or read from etcd, a record
it posted): the newest is the view's *floor*. The view answers only once it has caught up with its
floor and has heard from the server recently, else it raises ``ViewBehind`` and the reader asks
etcd itself. So nothing in the process reads older than what the process has already seen, and a
stalled stream costs speed, never a stale answer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

import etcd3.etcdrpc as rpc
from etcd3.etcdrpc import kv_pb2
import etcd3.utils
import grpc
import tenacity

from .client import EtcdClient, fail_over
from .config import EtcdConfig
from .shared import Shared

# How often the watch asks etcd to confirm that it is up to date (a progress request), and how
# long after the last word from etcd the view still answers reads.
PROGRESS_EVERY_SECONDS = 1.0
TRUSTED_FOR_SECONDS = 3.0
# How long a reader waits for the view to reach its floor before it asks etcd instead.
CATCH_UP_SECONDS = 0.2

_DELETE = kv_pb2.Event.DELETE


class ViewBehind(Exception):
    """The view cannot answer yet (reconnecting, silent, or behind the reader's floor)."""


class RunView:
    """The state, join records, liveness keys and store key names of the run at ``run_key``.

    ``run_key`` is the state key; the run's other keys are below ``run_key + "/"`` (see
    ``backend.py``). Store values are not kept, only which store keys exist.
    """

    def __init__(self, config: EtcdConfig, run_key: str) -> None:
        self._etcd = EtcdClient(config)
        key = run_key.encode()
        self._state_key = key
        self._joins = key + b"/joins/"
        self._alive = key + b"/alive/"
        self._store = key + b"/store/"
        self._range_end = etcd3.utils.prefix_range_end(key + b"/")
        lock = threading.Lock()
        self._state_changed = threading.Condition(lock)
        self._store_changed = threading.Condition(lock)
        self._progressed = threading.Condition(lock)
        self._lock = lock
        self._state: tuple[bytes, int] | None = None
        self._state_revision = 0  # revision of the state's last change (put or delete)
        self._joins_kv: dict[bytes, tuple[bytes, int]] = {}  # key -> (value, create_revision)
        self._alive_keys: set[str] = set()
        self._store_keys: set[bytes] = set()
        self._revision = 0  # every event up to this revision is applied
        self._floor = 0  # the newest revision of the run's keys the process has seen
        self._heard_at = float("-inf")
        self._healthy = False
        self._closed = False
        self._stream_done: threading.Event | None = None
        self._call: Any = None
        self._thread = threading.Thread(target=self._run, name=f"etcd-run-view {run_key}", daemon=True)
        self._thread.start()

    def saw(self, revision: int) -> None:
        """Record that the process has seen the run's keys at ``revision``, a revision of one of
        the run's keys (so the watch reaches it)."""
        with self._lock:
            self._floor = max(self._floor, revision)

    # Reads. Each raises ``ViewBehind`` when the view cannot vouch for its floor.

    def state(self) -> tuple[bytes, int] | None:
        """The state's value and mod revision, or ``None`` if there is no state."""
        with self._caught_up():
            return self._state

    def joins(self, after: int) -> list[tuple[bytes, bytes, int]]:
        """``(key, value, create_revision)`` of the join records created after ``after``, oldest first."""
        with self._caught_up():
            found = [(k, v, rev) for k, (v, rev) in self._joins_kv.items() if rev > after]
        return sorted(found, key=lambda item: item[2])

    def alive(self, node_keys: Collection[str], floor: int = 0) -> set[str]:
        """Which of ``node_keys`` have a liveness key, as of ``floor`` or later."""
        with self._caught_up(floor):
            return self._alive_keys.intersection(node_keys)

    @contextmanager
    def _caught_up(self, floor: int = 0) -> Iterator[None]:
        """Hold the view's lock once it can answer for its floor and ``floor``; else ``ViewBehind``."""
        with self._lock:
            if not self._progressed.wait_for(lambda: self._trusted(floor), CATCH_UP_SECONDS):
                raise ViewBehind(
                    f"the run view of {self._state_key.decode()} is not at revision {max(floor, self._floor)}"
                )
            yield

    def _trusted(self, floor: int) -> bool:
        return (
            self._healthy
            and self._revision >= max(floor, self._floor)
            and time.monotonic() - self._heard_at < TRUSTED_FOR_SECONDS
        )

    # Waits. Both return at ``timeout`` while the watch reconnects.

    def wait_state_past(self, revision: int | None, timeout: float) -> None:
        """Return once the state changed after ``revision`` (``None``: it did not exist), or after
        ``timeout`` seconds."""
        after = revision or 0
        with self._state_changed:
            self._state_changed.wait_for(
                lambda: self._closed or (self._healthy and self._state_revision > after), timeout
            )

    def wait_store_keys(self, keys: Collection[bytes], timeout: float) -> None:
        """Return once every store key (full etcd key) in ``keys`` exists, or after ``timeout``."""
        with self._store_changed:
            self._store_changed.wait_for(
                lambda: self._closed or (self._healthy and self._store_keys.issuperset(keys)), timeout
            )

    # The watch.

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

    def _load(self) -> int:
        """Read every kept key in one transaction; return the revision it was read at."""
        ranges = [
            rpc.RangeRequest(key=self._state_key),
            rpc.RangeRequest(key=self._joins, range_end=etcd3.utils.prefix_range_end(self._joins)),
            rpc.RangeRequest(key=self._alive, range_end=etcd3.utils.prefix_range_end(self._alive), keys_only=True),
            rpc.RangeRequest(key=self._store, range_end=etcd3.utils.prefix_range_end(self._store), keys_only=True),
        ]
        request = rpc.TxnRequest(success=[rpc.RequestOp(request_range=r) for r in ranges])

        def txn(client: Any) -> Any:
            try:
                return client.kvstub.Txn(request, client.timeout, metadata=client.metadata)
            except grpc.RpcError as exc:
                fail_over(client, exc)

        response = self._etcd.request(txn)
        state, joins, alive, store = (op.response_range.kvs for op in response.responses)
        with self._lock:
            self._state = (state[0].value, state[0].mod_revision) if state else None
            self._state_revision = max(self._state_revision, state[0].mod_revision if state else 0)
            self._joins_kv = {kv.key: (kv.value, kv.create_revision) for kv in joins}
            self._alive_keys = {kv.key[len(self._alive) :].decode() for kv in alive}
            self._store_keys = {kv.key for kv in store}
            self._revision = response.header.revision
            self._heard_at = time.monotonic()
            self._healthy = True
            for cond in (self._state_changed, self._store_changed, self._progressed):
                cond.notify_all()
        return response.header.revision

    def _watch(self) -> None:
        """Load the keys, then follow them on one stream until closed or broken."""
        try:
            revision = self._load()
        except Exception:
            self._set_unhealthy()
            raise
        done = threading.Event()
        create = rpc.WatchCreateRequest(key=self._state_key, range_end=self._range_end, start_revision=revision + 1)

        def requests():
            yield rpc.WatchRequest(create_request=create)
            while not done.wait(PROGRESS_EVERY_SECONDS):
                yield rpc.WatchRequest(progress_request=rpc.WatchProgressRequest())

        client = self._etcd.raw
        call = rpc.WatchStub(client.channel).Watch(requests(), metadata=client.metadata)
        with self._lock:
            self._call, self._stream_done = call, done
        try:
            for reply in call:
                if reply.compact_revision or reply.canceled:
                    raise RuntimeError("the run watch was compacted or cancelled; re-reading")
                self._apply(reply)
            raise RuntimeError("the run watch ended")
        except grpc.RpcError as exc:
            self._set_unhealthy()
            if not self._closed:
                fail_over(client, exc)
            raise
        except Exception:
            self._set_unhealthy()
            raise
        finally:
            done.set()
            call.cancel()

    def _apply(self, reply: Any) -> None:
        state_changed = store_changed = False
        with self._lock:
            for event in reply.events:
                kv = event.kv
                revision = kv.mod_revision or reply.header.revision
                deleted = event.type == _DELETE
                if kv.key == self._state_key:
                    self._state = None if deleted else (kv.value, kv.mod_revision)
                    self._state_revision = max(self._state_revision, revision)
                    state_changed = True
                elif kv.key.startswith(self._joins):
                    if deleted:
                        self._joins_kv.pop(kv.key, None)
                    else:
                        self._joins_kv[kv.key] = (kv.value, kv.create_revision)
                elif kv.key.startswith(self._alive):
                    node_key = kv.key[len(self._alive) :].decode()
                    if deleted:
                        self._alive_keys.discard(node_key)
                    else:
                        self._alive_keys.add(node_key)
                elif kv.key.startswith(self._store):
                    (self._store_keys.discard if deleted else self._store_keys.add)(kv.key)
                    store_changed = True
                self._revision = max(self._revision, revision)
            if not reply.events and not reply.created:
                # A progress reply: every event up to its revision has been sent.
                self._revision = max(self._revision, reply.header.revision)
            self._heard_at = time.monotonic()
            if state_changed:
                self._state_changed.notify_all()
            if store_changed:
                self._store_changed.notify_all()
            self._progressed.notify_all()

    def _set_unhealthy(self) -> None:
        with self._lock:
            self._healthy = False
            for cond in (self._state_changed, self._store_changed, self._progressed):
                cond.notify_all()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            call, self._call = self._call, None
            done, self._stream_done = self._stream_done, None
            for cond in (self._state_changed, self._store_changed, self._progressed):
                cond.notify_all()
        if done is not None:
            done.set()
        if call is not None:
            call.cancel()
        # Closing the client first ends a load that is still retrying, so the thread stops at once.
        self._etcd.close()
        self._thread.join(timeout=5)


# One view per (cluster, run key) in the process.
views: Shared[tuple[EtcdConfig, str], RunView] = Shared(lambda key: RunView(*key), RunView.close)


class ViewReader:
    """One backend's use of its run's shared ``RunView``: acquired on first use, released on
    ``close``.

    Args:
        config: the cluster, which with ``run_key`` picks the shared view.
        run_key: the run's state key.
    """

    def __init__(self, config: EtcdConfig, run_key: str) -> None:
        self._config = config
        self._run_key = run_key
        self._lock = threading.Lock()
        self._view: RunView | None = None
        self._closed = False

    def saw(self, revision: int) -> None:
        """Tell the view the backend has seen ``revision`` (see ``RunView.saw``)."""
        try:
            self.view().saw(revision)
        except ViewBehind:
            pass  # closed: nothing reads the view any more

    def view(self) -> RunView:
        """The shared view; ``ViewBehind`` once closed."""
        with self._lock:
            if self._closed:
                raise ViewBehind("the backend is closed")
            if self._view is None:
                self._view = views.acquire((self._config, self._run_key))
            return self._view

    def close(self) -> None:
        with self._lock:
            self._closed = True
            view, self._view = self._view, None
        if view is not None:
            views.release((self._config, self._run_key))
