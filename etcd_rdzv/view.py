"""A process's live copy of one run's keys, kept current by one watch stream.

The nodes of a process read the run's state, announcements and liveness keys here instead of asking
etcd each time, and wait here for the state or a store key to change: one stream per (cluster, run)
delivers every change to every local node.

The copy is a consistent snapshot: it loads the run's directory with one read at revision ``r`` and
then applies the watch's events in order, and etcd sends a watcher's events in revision order, so
after applying the events up to revision ``a`` the copy equals the run's keys at ``a``. The applied
revision advances by events of the run's keys only. A progress reply says nothing the copy can
rely on (etcd before 3.4.25 / 3.5.8 could send one ahead of events still queued for the stream,
etcd-io/etcd#15220), so it only proves the stream is alive.

Reads take a *floor*: the newest revision of the run's keys that the process has written or read
elsewhere (``EtcdRun`` keeps it). The view answers only once it has applied its floor and heard
from etcd within ``TRUSTED_FOR_SECONDS``, else it raises ``ViewBehind`` and the caller asks etcd
(one request per kind of read in the air for the whole process: ``shared_reads.py``). A stream that stays silent although asked for progress is cancelled and opened anew, a
reader leaves a view that applied nothing for ``CATCH_UP_SECONDS`` (it waits on, up to
``CATCH_UP_LIMIT_SECONDS``, only while the view keeps applying), and every other wait here ends
after ``WAIT_CAP_SECONDS`` at most: a silent stream costs a second, never a stale answer or a wait
to some long timeout.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from threading import Condition
from typing import Any

import tenacity
from etcd3.etcdrpc import kv_pb2

from rdzv_common.backend import Record

from .client import EtcdClient
from .keys import RunKeys, prefix_range
from .watch import Watch

logger = logging.getLogger(__name__)

# How often the stream asks etcd to confirm it is current, how long after the last word from etcd
# the view still answers reads, and after how long without any reply the stream is reopened.
PROGRESS_EVERY_SECONDS = 1.0
TRUSTED_FOR_SECONDS = 3.0
STALL_AFTER_SECONDS = 3.0
# How long a reader waits for the view to reach its floor before it asks etcd instead, and how long
# at most while the view keeps applying. A view on a busy machine trails a burst of hundreds of
# writes by a good part of a second; asking etcd then would only add to the burst.
CATCH_UP_SECONDS = 1.0
CATCH_UP_LIMIT_SECONDS = 5.0
# The longest any wait on the view lasts before its caller looks again (at etcd, if need be).
WAIT_CAP_SECONDS = 1.0

_DELETE = kv_pb2.Event.DELETE


@dataclass(frozen=True)
class Announcement:
    """The handle of a record of the etcd mailbox: its key, and a revision ``seen_at`` at which it
    existed and by which every withdrawal that its reader could have seen had happened (see
    ``EtcdMailbox.fence_compare``)."""

    key: bytes
    seen_at: int


class ViewBehind(Exception):
    """The view cannot answer yet (reconnecting, silent, paused, closed, or behind the floor)."""


def _position(record: Record) -> int:
    return record.position


class RunView:
    """The state, announcements, liveness keys, quarantine entries and store key names of one run.

    Store values are not kept, only which store keys exist. ``pause``/``resume`` take the stream
    down and up again around a ``fork()`` (see ``registry.py``).
    """

    def __init__(self, etcd: EtcdClient, keys: RunKeys) -> None:
        self._etcd = etcd
        self._keys = keys
        self._state_key = keys.state.encode()
        self._joins = keys.joins.encode()
        self._withdrawn = keys.withdrawn.encode()
        self._alive = keys.alive.encode()
        self._store = keys.store.encode()
        self._quarantine = keys.quarantine.encode()
        # One lock, and a condition per kind of waiter: a node waiting for the state must not be
        # woken by each of the hundreds of announcements and liveness keys of a large rendezvous.
        self._lock = threading.Lock()
        self._state_changed = threading.Condition(self._lock)
        self._store_changed = threading.Condition(self._lock)
        # Readers waiting for the view to reach their floor: (floor, ticket, event), a heap, so
        # that each applied reply wakes only those it satisfies.
        self._floor_waiters: list[tuple[int, int, threading.Event]] = []
        self._tickets = itertools.count()
        self._state: tuple[bytes, int] | None = None
        self._state_revision = 0  # revision of the state's last change (put or delete)
        # The announcements, by key, in the order of their creation (events come in revision
        # order), as the records every node of the process is handed: one object per record, not
        # one per record per read. ``_records`` lists them, rebuilt after a delete.
        self._joins_kv: dict[bytes, Record] = {}
        self._records: list[Record] | None = []
        # The live nodes, by node key: the create revision and lease of each one's liveness key.
        self._live: dict[str, tuple[int, int]] = {}
        self._store_keys: set[bytes] = set()
        self._quarantined: dict[bytes, Any] = {}  # key -> its KeyValue (a host's entry)
        self._applied = 0  # every event of the run up to this revision is applied
        self._heard_at = float("-inf")
        self._healthy = False
        self._closed = False
        self._running = threading.Event()  # cleared while paused
        self._running.set()
        self._watch: Watch | None = None
        self._thread = self._start()

    def _start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name=f"etcd-rdzv-view {self._keys.root}", daemon=True)
        thread.start()
        return thread

    # Reads. Each raises ``ViewBehind`` when the view cannot vouch for ``floor``.

    def state(self, floor: int) -> tuple[bytes, int] | None:
        """The state's value and mod revision, or ``None`` if there is no state."""
        with self._caught_up(floor):
            return self._state

    def joins(self, after: int, floor: int) -> tuple[list[Record], int]:
        """The announcements created after ``after``, oldest first, and the revision the view is at."""
        with self._caught_up(floor):
            if self._records is None:
                self._records = list(self._joins_kv.values())
            records = self._records
            return records[bisect.bisect_right(records, after, key=_position) :], self._applied

    def alive(self, node_keys: Collection[str], floor: int) -> set[str]:
        """Which of ``node_keys`` have a liveness key."""
        with self._caught_up(floor):
            return self._live.keys() & set(node_keys)

    def liveness_of(self, node_key: str, floor: int) -> tuple[tuple[int, int] | None, int]:
        """``(create_revision, lease)`` of the node's liveness key (``None`` if it has none), and
        the revision the view is at."""
        with self._caught_up(floor):
            return self._live.get(node_key), self._applied

    def quarantine_entry(self, key: bytes, floor: int) -> Any | None:
        """The KeyValue of a quarantine key, or ``None`` if there is none."""
        with self._caught_up(floor):
            return self._quarantined.get(key)

    def join_keys_up_to(self, cursor: int) -> list[bytes]:
        """The announcement keys created at or before ``cursor`` that the view knows of, however
        current it is (to delete folded records: a key missed here lapses with its session)."""
        with self._lock:
            return [k for k, record in self._joins_kv.items() if record.position <= cursor]

    @contextmanager
    def _caught_up(self, floor: int) -> Iterator[None]:
        """Hold the view's lock once it can answer for ``floor``; else raise ``ViewBehind``.

        A reader waits ``CATCH_UP_SECONDS`` for the view, and again as long as the view applied
        something meanwhile, up to ``CATCH_UP_LIMIT_SECONDS``: a view that is busy applying a
        burst is worth waiting for (hundreds of readers going to etcd instead would only slow it
        further), one that applied nothing for a second is not."""
        give_up = time.monotonic() + CATCH_UP_LIMIT_SECONDS
        while True:
            with self._lock:
                if self._trusted(floor):
                    yield
                    return
                before = self._applied
                reached = threading.Event()
                heapq.heappush(self._floor_waiters, (floor, next(self._tickets), reached))
            reached.wait(CATCH_UP_SECONDS)
            with self._lock:
                if self._trusted(floor):
                    yield
                    return
                if not self._healthy or self._applied == before or time.monotonic() >= give_up:
                    raise ViewBehind(f"the run view of {self._keys.root} cannot vouch for revision {floor}")

    def _trusted(self, floor: int = 0) -> bool:
        return (
            self._healthy
            and self._applied >= floor
            and time.monotonic() - self._heard_at < TRUSTED_FOR_SECONDS
        )

    # Waits: each returns after at most ``WAIT_CAP_SECONDS``; callers look again afterwards.

    def wait_state_past(self, revision: int | None, timeout: float) -> None:
        """Return once the state changed after ``revision`` (``None``: it did not exist), or after
        ``timeout`` seconds."""
        after = revision or 0
        with self._state_changed:
            self._state_changed.wait_for(
                lambda: self._closed or (self._healthy and self._state_revision > after),
                min(timeout, WAIT_CAP_SECONDS),
            )

    def wait_store_keys(self, keys: Collection[bytes], floor: int, timeout: float) -> bool | None:
        """Wait until every store key (full etcd key) in ``keys`` exists at or after ``floor``, or
        ``timeout``.

        Returns:
            ``True`` if the view vouches for ``floor`` and holds every key; ``False`` if it vouches
            for ``floor`` and still lacks a key, so the caller may wait on without asking etcd;
            ``None`` if it cannot vouch (ask etcd).
        """
        with self._store_changed:
            self._store_changed.wait_for(
                lambda: self._closed
                or (self._healthy and self._applied >= floor and self._store_keys.issuperset(keys)),
                min(timeout, WAIT_CAP_SECONDS),
            )
            if not self._trusted(floor):
                return None
            return self._store_keys.issuperset(keys)

    # The watch.

    def _run(self) -> None:
        retrying = tenacity.Retrying(
            wait=tenacity.wait_exponential_jitter(multiplier=0.05, max=2.0),
            # A pause ends the thread (``resume`` starts another), a close ends it for good.
            retry=tenacity.retry_if_exception(lambda exc: not self._closed and self._running.is_set()),
            before_sleep=lambda state: logger.debug(
                "The run view of %s reconnects: %s", self._keys.root, state.outcome.exception()
            ),
        )
        try:
            retrying(self._follow)
        except Exception:
            pass  # only reached once closed or paused: the stream was cancelled on purpose

    def _load(self) -> int:
        """Read the run's whole directory at one revision into the copy; return that revision."""
        start, end = prefix_range(self._keys.root)
        response = self._etcd.request(lambda c: c.get_range_response(start, end))
        with self._lock:
            self._state = None
            self._joins_kv, self._records, self._live, self._store_keys = {}, None, {}, set()
            self._quarantined = {}
            self._applied = response.header.revision
            for kv in sorted(response.kvs, key=lambda kv: kv.create_revision):
                self._put(kv)
            self._heard_at = time.monotonic()
            self._healthy = True
            self._wake_all()
        return response.header.revision

    def _follow(self) -> None:
        """Load the keys, then follow them on one stream until closed, paused or broken."""
        try:
            if self._closed or not self._running.is_set():
                return
            revision = self._load()
            start, end = prefix_range(self._keys.root)
            watch = Watch(
                self._etcd.raw,
                start,
                end,
                revision + 1,
                progress_every=PROGRESS_EVERY_SECONDS,
                stall_after=STALL_AFTER_SECONDS,
            )
            with self._lock:
                if self._closed or not self._running.is_set():
                    watch.cancel()
                self._watch = watch
            for reply in watch:
                self._apply(reply)
            if not self._closed and self._running.is_set():
                raise ViewBehind("the run view's stream ended")
        finally:
            self._set_unhealthy()

    def _put(self, kv: Any) -> Condition | None:
        """Apply a put; return the condition whose waiters it concerns."""
        key = kv.key
        if key == self._state_key:
            self._state = (kv.value, kv.mod_revision)
            self._state_revision = max(self._state_revision, kv.mod_revision)
            return self._state_changed
        if key.startswith(self._joins):
            if key in self._joins_kv:
                # A record is what was created: a later put of its key (another client's) moves
                # its mod revision, never its place in the log nor what was folded of it.
                return None
            # Records are created in revision order: a new one goes last.
            seen_at = max(kv.create_revision, self._applied)
            record = Record(kv.value, kv.create_revision, Announcement(key, seen_at))
            self._joins_kv[key] = record
            if self._records is not None:
                self._records.append(record)
        elif key == self._withdrawn:
            # Restamp the records: a reader's fence must not count a withdrawal it has seen (the
            # withdrawn record is gone from its read), or its writes would fail until a new post.
            self._joins_kv = {
                k: Record(r.data, r.position, Announcement(k, kv.mod_revision)) for k, r in self._joins_kv.items()
            }
            self._records = None
        elif key.startswith(self._alive):
            node = self._keys.node_of(key)
            if node is None:
                logger.warning("Ignoring the key %r under %s: it is not UTF-8, so it names no node.", key, self._keys.alive)
            else:
                self._live[node] = (kv.create_revision, kv.lease)
        elif key.startswith(self._store):
            self._store_keys.add(key)
            return self._store_changed
        elif key.startswith(self._quarantine):
            self._quarantined[key] = kv
        return None

    def _delete(self, key: bytes, revision: int) -> Condition | None:
        """Apply a delete; return the condition whose waiters it concerns."""
        if key == self._state_key:
            self._state = None
            self._state_revision = max(self._state_revision, revision)
            return self._state_changed
        if key.startswith(self._joins):
            if self._joins_kv.pop(key, None) is not None:
                self._records = None
        elif key.startswith(self._alive):
            self._live.pop(self._keys.node_of(key), None)
        elif key.startswith(self._store):
            self._store_keys.discard(key)
        elif key.startswith(self._quarantine):
            self._quarantined.pop(key, None)
        return None

    def _apply(self, reply: Any) -> None:
        with self._lock:
            concerned = set()
            for event in reply.events:
                kv = event.kv
                revision = kv.mod_revision or reply.header.revision
                self._applied = max(self._applied, revision)
                if event.type == _DELETE:
                    concerned.add(self._delete(kv.key, revision))
                else:
                    concerned.add(self._put(kv))
            self._heard_at = time.monotonic()
            for condition in concerned - {None}:
                condition.notify_all()
            while self._floor_waiters and self._floor_waiters[0][0] <= self._applied:
                heapq.heappop(self._floor_waiters)[2].set()

    def _wake_all(self) -> None:
        for condition in (self._state_changed, self._store_changed):
            condition.notify_all()
        waiters, self._floor_waiters = self._floor_waiters, []
        for _, _, reached in waiters:
            reached.set()

    def _set_unhealthy(self) -> None:
        with self._lock:
            self._healthy = False
            self._watch = None
            self._wake_all()

    def _stop_stream(self) -> None:
        with self._lock:
            watch = self._watch
            self._wake_all()
        if watch is not None:
            watch.cancel()

    def pause(self, timeout: float) -> None:
        """Take the stream down (before a ``fork()``): no thread of the view stays inside gRPC."""
        self._running.clear()
        self._stop_stream()
        self._thread.join(timeout)

    def resume(self) -> None:
        """Open the stream again after ``pause``."""
        self._running.set()
        if not self._thread.is_alive() and not self._closed:
            self._thread = self._start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._running.set()
        self._stop_stream()
        # The view's own thread can get here, from a finalizer that garbage collection ran on it.
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
