"""Prometheus metrics of every run under a key prefix, kept current by one watch of the prefix.

``RunsMirror`` keeps the whole key prefix in one ``Cache`` (the process's copy of a run is the same
class), so a scrape reads memory and never etcd: the cost to etcd is one stream, whatever the
number of runs or scrapers. ``RunsCollector`` turns the mirror into metric families for
``prometheus_client`` (``etcd-rdzv exporter`` serves them).

etcd keeps no wall-clock times, so the rounds completed and the time since the last completion
count what the exporter itself saw: from its start, not from the run's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from torch.distributed.elastic.rendezvous import RendezvousStateError

from rdzv_common.codec import decode_state
from rdzv_common.state import RendezvousState

from .keys import RunKeys, parse
from .quarantine import decode_entry
from .run import Cache, EtcdClient

PREFIX = "torch_rdzv_"


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
    """Every run under ``etcd``'s key prefix, one ``Cache`` of the prefix; ``start``, ``close``."""

    def __init__(self, etcd: EtcdClient, clock: Any = time.time) -> None:
        self._etcd, self._prefix, self._clock = etcd, etcd.config.key_prefix, clock
        self._runs: dict[str, RunMirror] = {}
        self._cache: Cache | None = None

    def start(self) -> None:
        self._cache = Cache(self._etcd, (self._prefix + "/").encode(), self._bucket_of, on_change=self._changed,
                            name="etcd-rdzv-exporter")

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()

    @property
    def lock(self) -> threading.Lock:
        """Held while the stream changes the mirror; hold it around ``runs`` and what it returns."""
        return self._cache._lock

    @property
    def revision(self) -> int:
        """The newest etcd revision seen."""
        return self._cache.applied if self._cache is not None else 0

    @property
    def current(self) -> bool:
        """Whether the watch is open on a loaded mirror."""
        return self._cache is not None and self._cache.healthy

    def runs(self) -> list[tuple[str, RunMirror]]:
        """The runs that have a state key (a corrupt one included), by run id, with their keys."""
        cache = self._cache
        for run_id, run in self._runs.items():
            run.alive = set(cache.ids((run_id, "alive")))
            run.joins = {kv.key: kv.create_revision for kv in cache.items((run_id, "joins"))}
            run.quarantine = {}
            for kv in cache.items((run_id, "quarantine")):
                try:
                    entry = decode_entry(kv)
                except RendezvousStateError:
                    entry = None  # not an entry: `etcd-rdzv status` names it; it keeps no host out
                if entry is not None:
                    run.quarantine[kv.key] = entry.until
        return sorted((rid, run) for rid, run in self._runs.items() if run.state is not None or run.corrupt)

    def _bucket_of(self, key: bytes) -> tuple[tuple[str, str], Hashable] | None:
        parsed = parse(self._prefix, key)
        if parsed is None or parsed[1] not in ("state", "alive", "joins", "quarantine"):
            return None
        run_id, kind, rest = parsed
        return (run_id, kind), (rest if kind == "alive" else key)

    def _changed(self, bucket: tuple[str, str], key: Hashable, kv: Any, loaded: bool) -> None:
        run_id, kind = bucket
        if kind != "state":
            return
        run = self._runs.get(run_id)
        if run is None:
            run = self._runs[run_id] = RunMirror(RunKeys(self._prefix, run_id))
        # A state found complete at a load was not seen completing.
        run.set_state(None if kv is None else kv.value, self._clock(), created=not loaded and kv is not None and kv.version == 1)
        if kv is None and not run.corrupt:
            del self._runs[run_id]  # the run was reset, or its keys expired


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
