"""Read-your-writes: no decision rests on a read older than what its node wrote or read.

Each user of a range has a ``Floor``, raised by every transaction it runs (``txn.run``). ``Cache``
is a copy of a key range, loaded at one revision and advanced by the watch's events only; it
answers a read once it has applied the reader's floor and heard from etcd lately, else the reader
asks etcd, sharing the request with the process's other readers (``SharedReads``). Every wait ends
within ``WAIT_CAP_SECONDS``. Why it is built so: docs/design.md, "Waiting is a watch"."""

from __future__ import annotations

import bisect
import contextlib
import copy
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any, TypeVar

import tenacity
from etcd3.etcdrpc import kv_pb2

from . import txn
from .client import EtcdClient
from .watch import Watch

logger = logging.getLogger(__name__)

T = TypeVar("T")

PROGRESS_EVERY_SECONDS = 1.0  # the stream asks etcd to confirm it is current
TRUSTED_FOR_SECONDS = 3.0  # after the last word from etcd, reads are still answered
STALL_AFTER_SECONDS = 3.0  # without any reply, the stream is reopened
# A reader waits this long for the cache to reach its floor, and on while the cache keeps applying
# up to the limit: readers that ask etcd instead only slow a cache busy with a burst.
CATCH_UP_SECONDS = 1.0
CATCH_UP_LIMIT_SECONDS = 5.0
WAIT_CAP_SECONDS = 1.0


class ViewBehind(Exception):
    """The cache cannot answer for the floor (loading, silent, paused, closed, or behind)."""


class Floor:
    """The newest revision of the range one user wrote or read: its reads are at least this new."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.revision = 0

    def raise_to(self, revision: int) -> None:
        with self._lock:
            self.revision = max(self.revision, revision)


class SharedReads:
    """Reads of etcd shared by the readers of one kind: per kind, one request in the air and one
    flight boarding. Every reader is answered by a request sent after it came, so a shared answer
    holds all it wrote or saw before."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._boarding: dict[Hashable, Future] = {}
        self._flying: dict[Hashable, Future] = {}

    def read(self, kind: Hashable, request: Callable[[], T]) -> T:
        """``request()``'s answer, shared with the readers of ``kind`` aboard; so is a failure."""
        with self._lock:
            flight = self._boarding.get(kind)
            leads = flight is None
            if leads:
                flight = self._boarding[kind] = Future()
                ahead = self._flying.get(kind)
        if not leads:
            if (error := flight.exception()) is not None:
                raise _own_copy(error) from error
            return flight.result()
        if ahead is not None:
            ahead.exception()  # waits for it to land
        with self._lock:
            del self._boarding[kind]  # from now on a reader waits for the next flight
            self._flying[kind] = flight
        try:
            result = request()
        except BaseException as exc:
            with self._lock:
                del self._flying[kind]
            flight.set_exception(exc)
            raise
        with self._lock:
            del self._flying[kind]
        flight.set_result(result)
        return result


def _own_copy(error: BaseException) -> BaseException:
    """A copy, where the error's class can be rebuilt: raised in many threads, one would gather
    all their tracebacks."""
    try:
        return copy.copy(error)
    except Exception:
        return error


class Cache:
    """The watch-fed copy of every key under ``prefix``, kept in buckets (``bucket_of(key) ->
    (bucket, id) | None``), each in creation order; a bucket keeps ``item(bucket, kv)`` of a key.
    ``on_change(bucket, id, kv or None, loaded)`` is called, under the lock, for each key loaded
    and each put or delete applied. ``pause`` and ``resume`` bracket a ``fork()``."""

    def __init__(self, etcd: EtcdClient, prefix: bytes, bucket_of: Callable[[bytes], tuple[Hashable, Hashable] | None],
                 item: Callable[[Hashable, Any], Any] = lambda bucket, kv: kv,
                 on_change: Callable[[Hashable, Hashable, Any, bool], None] | None = None, name: str = "etcd-rdzv-view") -> None:
        self.etcd, self.prefix, self._end = etcd, prefix, txn.prefix_end(prefix)
        self._bucket_of, self._item, self._on_change = bucket_of, item, on_change
        self._shared = SharedReads()
        self._lock = threading.Lock()
        self._conditions: dict[Hashable, threading.Condition] = {}
        self._buckets: dict[Hashable, dict[Hashable, Any]] = {}
        self._orders: dict[Hashable, tuple[list, list[int]]] = {}  # bucket -> (items, create revisions)
        self._creations: dict[Hashable, dict[Hashable, int]] = {}
        self._changed: dict[Hashable, int] = {}  # bucket -> revision of its last put or delete
        self._floor_waiters: list[tuple[int, int, threading.Event]] = []  # a heap
        self._tickets = itertools.count()
        self.applied = 0  # every event of the range up to this revision is applied
        self._heard_at = float("-inf")
        self._healthy = self._closed = False
        self._running = threading.Event()
        self._running.set()
        self._watch: Watch | None = None
        self._name = name
        self._thread = self._start()

    def _start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name=f"{self._name} {self.prefix.decode(errors='replace')}", daemon=True)
        thread.start()
        return thread

    # Reads of the copy, without a floor: call them inside ``read``.

    def get(self, bucket: Hashable, key: Hashable) -> Any:
        return self._buckets.get(bucket, {}).get(key)

    def ids(self, bucket: Hashable) -> Any:
        return self._buckets.get(bucket, {}).keys()

    def items(self, bucket: Hashable, after: int | None = None) -> list:
        """The bucket's items in creation order; with ``after``, those created after that revision."""
        order = self._orders.get(bucket)
        if order is None:
            found = self._buckets.get(bucket, {})
            creations = self._creations.get(bucket, {})
            order = self._orders[bucket] = (list(found.values()), [creations[k] for k in found])
        items, created = order
        return items if after is None else items[bisect.bisect_right(created, after):]

    def changed(self, bucket: Hashable) -> int:
        return self._changed.get(bucket, 0)

    @property
    def healthy(self) -> bool:
        """Whether the copy is loaded and its stream open."""
        return self._healthy

    def read(self, floor: int, reader: Callable[[Cache], T]) -> T:
        """``reader(self)`` under the lock once the cache can answer for ``floor``; else
        ``ViewBehind`` (see ``CATCH_UP_SECONDS``)."""
        give_up = time.monotonic() + CATCH_UP_LIMIT_SECONDS
        while True:
            with self._lock:
                if self._trusted(floor):
                    return reader(self)
                before = self.applied
                reached = threading.Event()
                heapq.heappush(self._floor_waiters, (floor, next(self._tickets), reached))
            reached.wait(CATCH_UP_SECONDS)
            with self._lock:
                if self._trusted(floor):
                    return reader(self)
                if not self._healthy or self.applied == before or time.monotonic() >= give_up:
                    raise ViewBehind(f"the cache of {self.prefix!r} cannot vouch for revision {floor}")

    def peek(self, reader: Callable[[Cache], T]) -> T:
        """``reader(self)`` on the copy as it is, however current."""
        with self._lock:
            return reader(self)

    def answer(self, reader: Callable[[Cache], T], from_etcd: Callable[[], T], floor: Any, at_least: int = 0) -> T:
        """``reader`` on the copy when it can vouch for ``floor`` (a ``Floor``, raised to what the
        copy had applied) and ``at_least``, else ``from_etcd()``."""
        with contextlib.suppress(ViewBehind):
            answer, applied = self.read(max(floor.revision, at_least), lambda cache: (reader(cache), cache.applied))
            floor.raise_to(applied)
            return answer
        return from_etcd()  # outside the handler: its failure must not carry ViewBehind

    def fetch(self, request: txn.Txn, floor: Any, kind: Hashable | None = None, budget: float | None = None) -> txn.Result:
        """Run the read-only ``request`` on etcd, shared with the other readers of ``kind`` (a name
        for all it reads), and raise ``floor`` to what it saw."""
        if kind is None:
            return txn.run(self.etcd, request, floor, budget)
        result = self._shared.read((kind, budget), lambda: txn.run(self.etcd, request, None, budget))
        floor.raise_to(result.seen)
        return result

    def _trusted(self, floor: int = 0) -> bool:
        return self._healthy and self.applied >= floor and time.monotonic() - self._heard_at < TRUSTED_FOR_SECONDS

    # Waits: each ends within ``WAIT_CAP_SECONDS``; callers look again.

    def _condition(self, bucket: Hashable) -> threading.Condition:
        return self._conditions.get(bucket) or self._conditions.setdefault(bucket, threading.Condition(self._lock))

    def wait_changed(self, bucket: Hashable, after: int, timeout: float) -> None:
        """Return once the bucket changed after revision ``after``, or after ``timeout``."""
        condition = self._condition(bucket)
        with condition:
            condition.wait_for(lambda: self._closed or (self._healthy and self.changed(bucket) > after),
                               min(timeout, WAIT_CAP_SECONDS))

    def wait_for(self, bucket: Hashable, ready: Callable[[Cache], bool], floor: int, timeout: float) -> bool | None:
        """Wait until ``ready(self)`` at ``floor`` or later, or ``timeout``; ``ready(self)`` if the
        cache can vouch for ``floor`` (``False``: wait on without asking etcd), else ``None``."""
        condition = self._condition(bucket)
        with condition:
            condition.wait_for(
                lambda: self._closed or (self._healthy and self.applied >= floor and ready(self)),
                min(timeout, WAIT_CAP_SECONDS),
            )
            return ready(self) if self._trusted(floor) else None

    # The stream.

    def _run(self) -> None:
        retrying = tenacity.Retrying(
            wait=tenacity.wait_exponential_jitter(multiplier=0.05, max=2.0),
            # A pause ends the thread (``resume`` starts another), a close for good.
            retry=tenacity.retry_if_exception(lambda exc: not self._closed and self._running.is_set()),
            before_sleep=lambda s: logger.debug("The cache of %r reconnects: %s", self.prefix, s.outcome.exception()),
        )
        with contextlib.suppress(Exception):  # reached only once closed or paused
            retrying(self._follow)

    def _follow(self) -> None:
        try:
            if self._closed or not self._running.is_set():
                return
            loaded = txn.run(self.etcd, txn.Txn(then=[txn.Get(self.prefix, self._end)]))
            with self._lock:
                self._buckets, self._orders, self._creations, self.applied = {}, {}, {}, loaded.revision
                for kv in sorted(loaded.kvs(0), key=lambda kv: kv.create_revision):
                    self._change(kv.key, kv, kv.mod_revision, loading=True)
                self._heard_at, self._healthy = time.monotonic(), True
                self._wake_all()
            watch = Watch(self.etcd.raw, self.prefix, self._end, loaded.revision + 1,
                          progress_every=PROGRESS_EVERY_SECONDS, stall_after=STALL_AFTER_SECONDS)
            with self._lock:
                if self._closed or not self._running.is_set():
                    watch.cancel()
                self._watch = watch
            for reply in watch:
                self._apply(reply)
            if not self._closed and self._running.is_set():
                raise ViewBehind("the cache's stream ended")
        finally:
            with self._lock:
                self._healthy, self._watch = False, None
                self._wake_all()

    def _change(self, key: bytes, kv: Any, revision: int, loading: bool = False) -> Hashable | None:
        """Put ``kv`` in its bucket, or delete ``key`` (``kv`` ``None``); the bucket it changed."""
        placed = self._bucket_of(key)
        if placed is None:
            return None
        bucket, id_ = placed
        found = self._buckets.setdefault(bucket, {})
        if kv is None:
            if found.pop(id_, None) is None:
                return None
            self._orders.pop(bucket, None)
            self._creations[bucket].pop(id_, None)
        else:
            item, order = self._item(bucket, kv), self._orders.get(bucket)
            if id_ in found or order is None:  # a put of a key kept: its place stays, the list is rebuilt
                self._orders.pop(bucket, None)
            else:
                order[0].append(item)
                order[1].append(kv.create_revision)
            found[id_] = item
            self._creations.setdefault(bucket, {})[id_] = kv.create_revision
        self._changed[bucket] = max(self._changed.get(bucket, 0), revision)
        if self._on_change is not None:
            self._on_change(bucket, id_, kv, loading)
        return bucket

    def _apply(self, reply: Any) -> None:
        with self._lock:
            concerned = set()
            for event in reply.events:
                revision = event.kv.mod_revision or reply.header.revision
                self.applied = max(self.applied, revision)
                concerned.add(self._change(event.kv.key, None if event.type == kv_pb2.Event.DELETE else event.kv, revision))
            self._heard_at = time.monotonic()
            for bucket in concerned - {None}:
                if bucket in self._conditions:
                    self._conditions[bucket].notify_all()
            while self._floor_waiters and self._floor_waiters[0][0] <= self.applied:
                heapq.heappop(self._floor_waiters)[2].set()

    def _wake_all(self) -> None:
        for condition in self._conditions.values():
            condition.notify_all()
        waiters, self._floor_waiters = self._floor_waiters, []
        for _, _, reached in waiters:
            reached.set()

    def _stop_stream(self) -> None:
        with self._lock:
            watch = self._watch
            self._wake_all()
        if watch is not None:
            watch.cancel()

    def pause(self, timeout: float) -> None:
        """Take the stream down (before a ``fork()``): no thread of the cache stays inside gRPC."""
        self._running.clear()
        self._stop_stream()
        self._thread.join(timeout)

    def resume(self) -> None:
        self._running.set()
        if not self._thread.is_alive() and not self._closed:
            self._thread = self._start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._running.set()
        self._stop_stream()
        if self._thread is not threading.current_thread():  # a finalizer may run on it
            self._thread.join(timeout=5)
