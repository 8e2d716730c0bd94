"""Reading runs from etcd: one run's keys at one revision and its decoded state, and the list of
every run under the key prefix (``list``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch.distributed.elastic.rendezvous import RendezvousStateError

from rdzv_common.backend import QuarantineEntry
from rdzv_common.codec import decode_state
from rdzv_common.state import RendezvousState

from ..keys import RunKeys, parse, prefix_range
from ..quarantine import decode_entry
from ..run import EtcdClient
from .options import PROG, RunNotFound
from .output import emit, emit_all


@dataclass(frozen=True)
class RunSnapshot:
    """A run's keys as read at one etcd ``revision``.

    Attributes:
        layout: where the run's keys are.
        state: the state key's value, or ``None`` when it does not exist.
        mod_revision, version: the state key's last-write revision and its number of writes.
        alive: node key -> lease id, for each liveness key.
        join_revisions: the create revision of each pending announcement.
        quarantined: the run's quarantined hosts whose cool-down has not ended.
    """

    layout: RunKeys
    revision: int
    state: bytes | None
    mod_revision: int = 0
    version: int = 0
    alive: dict[str, int] = field(default_factory=dict)
    join_revisions: tuple[int, ...] = ()
    quarantined: tuple[QuarantineEntry, ...] = ()

    @property
    def key(self) -> str:
        """The state key."""
        return self.layout.state


def read_run(etcd: EtcdClient, run_id: str) -> RunSnapshot:
    """Read the run's whole directory at one revision."""
    layout = RunKeys(etcd.config.key_prefix, run_id)
    start, end = prefix_range(layout.root)
    response = etcd.request(lambda c: c.get_range_response(start, end))
    state = None
    alive: dict[str, int] = {}
    joins: list[int] = []
    quarantined: list[QuarantineEntry] = []
    for kv in response.kvs:
        kind, node = layout.classify(kv.key) or (None, None)
        if kind == "state":
            state = kv
        elif kind == "alive":
            alive[node] = kv.lease
        elif kind == "joins":
            joins.append(kv.create_revision)
        elif kind == "quarantine":
            quarantined += filter(None, [decode_entry(kv)])
    revision = response.header.revision
    extra = {"alive": alive, "join_revisions": tuple(joins), "quarantined": tuple(quarantined)}
    if state is None:
        return RunSnapshot(layout, revision, None, **extra)
    return RunSnapshot(layout, revision, state.value, state.mod_revision, state.version, **extra)


def decode_run_state(keys: RunSnapshot, run_id: str) -> RendezvousState:
    """The run's decoded state.

    Raises:
        RunNotFound: the run has no state key.
        RendezvousStateError: the value is not a valid state (the codec's message).
    """
    if keys.state is None:
        raise RunNotFound(
            f"run '{run_id}' not found: no key '{keys.key}' in etcd; `{PROG} list` shows the runs "
            "under the key prefix (set with --key-prefix)"
        )
    return decode_state(keys.state, where=f"key '{keys.key}'")


def lease_ttls(etcd: EtcdClient, lease_ids: Iterable[int]) -> dict[int, int]:
    """Seconds left on each lease, from etcd's lease time-to-live API; -1 for a lapsed one."""
    return {lease: etcd.request(lambda c, lease=lease: c.get_lease_info(lease)).TTL for lease in set(lease_ids)}


def _run_entry(run_id: str, kv: Any, alive: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"run_id": run_id, "mod_revision": kv.mod_revision, "alive": alive}
    try:
        state = decode_state(kv.value, where=f"key '{kv.key.decode()}'")
    except RendezvousStateError as exc:
        return {**entry, "round": None, "complete": None, "closed": None, "stop_now": None, "participants": None,
                "world_size": None, "error": str(exc)}
    return {**entry, "round": state.round, "complete": state.complete, "closed": state.closed,
            "stop_now": state.stop_now, "participants": len(state.participants), "world_size": state.world_size, "error": None}


def list_runs(etcd: EtcdClient) -> list[dict[str, Any]]:
    """One entry per state key under the key prefix, sorted by run id (``list --json``'s runs).

    A corrupt state gives an entry with ``error`` set and its state fields ``None``; ``alive``
    counts the run's liveness keys.
    """
    key_prefix = etcd.config.key_prefix
    start, end = prefix_range(key_prefix + "/")
    response = etcd.request(lambda c: c.get_range_response(start, end))
    states, alive = {}, {}
    for kv in response.kvs:
        run_id, kind, _ = parse(key_prefix, kv.key) or (None, None, None)
        if kind == "state":
            states[run_id] = kv
        elif kind == "alive":
            alive[run_id] = alive.get(run_id, 0) + 1
    return [_run_entry(run_id, states[run_id], alive.get(run_id, 0)) for run_id in sorted(states)]


LIST_COLUMNS = ("RUN", "ROUND", "STATE", "OPEN", "PARTICIPANTS", "ALIVE", "REVISION")


def _run_cells(entry: Mapping[str, Any]) -> list[str]:
    if entry["error"] is not None:
        return [entry["run_id"], f"CORRUPT (reset it with `{PROG} reset {entry['run_id']} --yes`): {entry['error']}"]
    return [
        entry["run_id"],
        str(entry["round"]),
        "complete" if entry["complete"] else "forming",
        "closed" if entry["closed"] else "open",
        str(entry["participants"]),
        str(entry["alive"]),
        str(entry["mod_revision"]),
    ]


def list_lines(runs: list[Mapping[str, Any]]) -> list[str]:
    """``list``'s text: a header, then a line per run, in columns (``ALIVE``: nodes with a liveness
    key; ``REVISION``: the state key's last write)."""
    rows = [list(LIST_COLUMNS), *(_run_cells(entry) for entry in runs)]
    # A corrupt run's line is its id and the problem: it sets no column's width but the first.
    whole = [row for row in rows if len(row) == len(LIST_COLUMNS)]
    widths = [max(len(row[0]) for row in rows), *(max(len(row[i]) for row in whole) for i in range(1, len(LIST_COLUMNS)))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def cmd_list(etcd: EtcdClient, args: argparse.Namespace) -> int:
    """Print every run under the key prefix."""
    runs = list_runs(etcd)
    if args.json:
        emit(json.dumps({"key_prefix": etcd.config.key_prefix, "runs": runs}, indent=2))
    elif not runs:
        emit(f"no runs under {etcd.config.key_prefix}")
    else:
        emit_all(list_lines(runs))
    return 0
