"""Prometheus metrics of every run under a key prefix, kept current by one watch of the prefix.

``RunsMirror`` reads the whole key prefix once at one revision, then follows it with one
``Watch`` from the next revision, so a scrape reads memory and never etcd: the cost to etcd is one
stream, whatever the number of runs or scrapers. After a compaction, a stalled stream or a lost
connection it reads the prefix again and goes on. ``RunsCollector`` turns the mirror into metric
families for ``prometheus_client`` (``etcd-rdzv exporter`` serves them).

etcd keeps no wall-clock times, so the rounds completed and the time since the last completion
count what the exporter itself saw: from its start, not from the run's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import tenacity
from etcd3.etcdrpc import kv_pb2
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from torch.distributed.elastic.rendezvous import RendezvousStateError

from rdzv_common.codec import decode_state
from rdzv_common.state import RendezvousState

from .client import EtcdClient
from .keys import RunKeys, prefix_range, run_of_key, run_of_state_key
from .quarantine import decode_entry
from .watch import Watch

logger = logging.getLogger(__name__)

PREFIX = "torch_rdzv_"
# How often the stream asks etcd for progress (the revision metric moves with it even on a quiet
# cluster), and after how long without any reply it is reopened.
PROGRESS_EVERY_SECONDS = 5.0
STALL_AFTER_SECONDS = 15.0


@dataclass
class RunMirror:
    """What the exporter knows of one run."""

    keys: RunKeys
    state: RendezvousState | None = None
    corrupt: bool = False
    alive: set[str] = field(default_factory=set)
    joins: dict[bytes, int] = field(default_factory=dict)  # announcement key -> create revision
    quarantine: dict[bytes, float] = field(default_factory=dict)  # quarantine key -> until (UNIX time)
    rounds_completed: int = 0
    last_completed_at: float | None = None  # UNIX time the exporter saw the last round complete

    def set_state(self, value: bytes | None, seen_at: float, created: bool = False) -> None:
        """The state key now holds ``value`` (``None``: deleted); counts a round that completed.

        ``created``: the key was created by this write (the watch saw it appear). A run's first
        write may complete its first round (every join was folded by then), and that round counts;
        a state found complete when the exporter loads the prefix was not seen completing."""
        before = self.state
        try:
            self.state = None if value is None else decode_state(value, where=f"key '{self.keys.state}'")
            self.corrupt = False
        except RendezvousStateError:
            self.state, self.corrupt = None, True
        after = self.state
        if after is None or not after.complete:
            return
        if (before is None and created) or (before is not None and (before.round, before.complete) != (after.round, True)):
            self.rounds_completed += 1
            self.last_completed_at = seen_at


class RunsMirror:
    """Every run under ``etcd``'s key prefix, mirrored by one watch; ``start`` it, ``close`` it."""

    def __init__(self, etcd: EtcdClient, clock: Any = time.time) -> None:
        self._etcd = etcd
        self._prefix = etcd.config.key_prefix
        self._clock = clock
        self._lock = threading.Lock()
        self._runs: dict[str, RunMirror] = {}
        self.revision = 0  # the newest etcd revision seen, from a read, an event or a progress reply
        self.current = False  # whether the watch is open on a loaded mirror
        self._closed = threading.Event()
        self._watch: Watch | None = None
        self._thread = threading.Thread(target=self._run, name="etcd-rdzv-exporter", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            watch = self._watch
        if watch is not None:
            watch.cancel()
        self._thread.join(timeout=5)

    @property
    def lock(self) -> threading.Lock:
        """Held while the watch changes the mirror; hold it around ``runs`` and what it returns."""
        return self._lock

    def runs(self) -> list[tuple[str, RunMirror]]:
        """The runs that have a state key (a corrupt one included), by run id."""
        return sorted((rid, run) for rid, run in self._runs.items() if run.state is not None or run.corrupt)

    # The watch.

    def _run(self) -> None:
        retrying = tenacity.Retrying(
            wait=tenacity.wait_exponential_jitter(initial=0.2, max=5.0),
            retry=tenacity.retry_if_exception(lambda exc: not self._closed.is_set()),
            before_sleep=lambda state: logger.warning("The exporter's watch restarts: %s", state.outcome.exception()),
        )
        try:
            retrying(self._follow)
        except Exception:
            pass  # only reached once closed: the stream was cancelled on purpose

    def _follow(self) -> None:
        try:
            start, end = prefix_range(self._prefix + "/")
            response = self._etcd.request(lambda c: c.get_range_response(start, end))
            self._load(response)
            watch = Watch(
                self._etcd.raw,
                start,
                end,
                response.header.revision + 1,
                progress_every=PROGRESS_EVERY_SECONDS,
                stall_after=STALL_AFTER_SECONDS,
            )
            with self._lock:
                self._watch = watch
                self.current = True
            if self._closed.is_set():
                watch.cancel()
            for reply in watch:
                self._apply(reply)
            if not self._closed.is_set():
                raise ConnectionError("the exporter's watch stream ended")
        finally:
            with self._lock:
                self._watch = None
                self.current = False

    def _load(self, response: Any) -> None:
        """Replace the mirror by the prefix as read; a run's counters carry over."""
        now = self._clock()
        with self._lock:
            previous, self._runs = self._runs, {}
            states: dict[str, bytes] = {}
            for kv in response.kvs:
                run = self._route(kv.key, previous)
                if run is not None and self._is_state(kv.key):
                    states[run.keys.run_id] = kv.value
                elif run is not None:
                    self._put(run, kv)
            for run_id, run in self._runs.items():
                run.set_state(states.get(run_id), now)
            self.revision = max(self.revision, response.header.revision)

    def _is_state(self, raw_key: bytes) -> bool:
        return run_of_state_key(self._prefix, raw_key.decode(errors="replace")) is not None

    def _route(self, raw_key: bytes, previous: dict[str, RunMirror]) -> RunMirror | None:
        """The mirror of the run whose directory holds ``raw_key``, made on first sight."""
        run_id = run_of_key(self._prefix, raw_key.decode(errors="replace"))
        if run_id is None:
            return None
        if run_id not in self._runs:
            old = previous.get(run_id)
            self._runs[run_id] = RunMirror(
                RunKeys(self._prefix, run_id),
                state=old.state if old else None,
                corrupt=old.corrupt if old else False,
                rounds_completed=old.rounds_completed if old else 0,
                last_completed_at=old.last_completed_at if old else None,
            )
        return self._runs[run_id]

    def _put(self, run: RunMirror, kv: Any) -> None:
        key, keys = kv.key, run.keys
        if key.startswith(keys.alive.encode()):
            node = keys.node_of(key)
            if node is not None:
                run.alive.add(node)
        elif key.startswith(keys.joins.encode()):
            run.joins[key] = kv.create_revision
        elif key.startswith(keys.quarantine.encode()):
            try:
                entry = decode_entry(kv)
            except RendezvousStateError:
                entry = None  # not an entry: `etcd-rdzv status` names it; it keeps no host out
            if entry is not None:
                run.quarantine[key] = entry.until

    def _delete(self, run: RunMirror, key: bytes) -> None:
        keys = run.keys
        if key.startswith(keys.alive.encode()):
            run.alive.discard(keys.node_of(key))
        run.joins.pop(key, None)
        run.quarantine.pop(key, None)

    def _apply(self, reply: Any) -> None:
        now = self._clock()
        with self._lock:
            for event in reply.events:
                key = event.kv.key
                run = self._route(key, {})
                if run is None:
                    continue
                put = event.type != kv_pb2.Event.DELETE
                if self._is_state(key):
                    run.set_state(event.kv.value if put else None, now, created=put and event.kv.version == 1)
                elif put:
                    self._put(run, event.kv)
                else:
                    self._delete(run, key)
                if not put and run.state is None and not run.corrupt and not (run.alive or run.joins or run.quarantine):
                    del self._runs[run.keys.run_id]  # the run was reset or its keys expired
            self.revision = max(self.revision, reply.header.revision)


def _family(kind: type, name: str, doc: str, labels: tuple[str, ...] = ("run_id",)) -> Any:
    return kind(PREFIX + name, doc, labels=list(labels))


class RunsCollector(Collector):
    """The mirror's runs as Prometheus metric families, the run id the only per-run label."""

    def __init__(self, mirror: RunsMirror, clock: Any = time.time) -> None:
        self._mirror = mirror
        self._clock = clock

    def collect(self) -> Iterator[Any]:
        now = self._clock()
        gauges = {
            name: _family(GaugeMetricFamily, name, doc)
            for name, doc in (
                ("round", "The run's current rendezvous round."),
                ("round_complete", "1 when the current round has formed its group, else 0."),
                ("closed", "1 when the run is closed (its agents exit), else 0."),
                ("world_size", "The size of the group the last completed round formed."),
                ("participants", "Nodes among the current round's participants."),
                ("wait_list_nodes", "Nodes waiting for the next round."),
                ("redundancy_list_nodes", "Nodes beyond max_nodes, kept as spares."),
                ("live_nodes", "Nodes with a liveness key (a heartbeat within their lease)."),
                ("pending_joins", "Join and leave announcements not yet folded into the state."),
                ("quarantined_hosts", "Hosts kept out of the run by a health-check quarantine."),
                ("state_corrupt", "1 when the run's state key does not decode, else 0."),
                ("time_since_last_round_completed_seconds",
                 "Seconds since the exporter saw a round of the run complete (absent until it has)."),
            )
        }
        completed = _family(CounterMetricFamily, "rounds_completed", "Rounds of the run the exporter saw complete.")
        with self._mirror.lock:
            runs = self._mirror.runs()
            for run_id, run in runs:
                labels = [run_id]
                gauges["state_corrupt"].add_metric(labels, int(run.corrupt))
                gauges["live_nodes"].add_metric(labels, len(run.alive))
                gauges["quarantined_hosts"].add_metric(labels, sum(until > now for until in run.quarantine.values()))
                completed.add_metric(labels, run.rounds_completed)
                if run.last_completed_at is not None:
                    gauges["time_since_last_round_completed_seconds"].add_metric(labels, now - run.last_completed_at)
                state = run.state
                if state is None:
                    continue
                for name, value in (
                    ("round", state.round),
                    ("round_complete", int(state.complete)),
                    ("closed", int(state.closed)),
                    ("world_size", state.world_size),
                    ("participants", len(state.participants)),
                    ("wait_list_nodes", len(state.wait_list)),
                    ("redundancy_list_nodes", len(state.redundancy_list)),
                    ("pending_joins", sum(rev > state.cursor for rev in run.joins.values())),
                ):
                    gauges[name].add_metric(labels, value)
            revision, current = self._mirror.revision, self._mirror.current
        yield from gauges.values()
        yield completed
        yield GaugeMetricFamily(PREFIX + "runs", "Runs under the key prefix.", value=len(runs))
        yield GaugeMetricFamily(PREFIX + "etcd_revision", "The newest etcd revision the exporter has seen.", value=revision)
        yield GaugeMetricFamily(
            PREFIX + "exporter_watch_up", "1 while the exporter's watch of the key prefix is open, else 0.", value=int(current)
        )
