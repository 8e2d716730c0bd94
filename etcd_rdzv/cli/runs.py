"""Reading runs from etcd: one run's keys at one revision and its decoded state, and the list of
every run under the key prefix (``list``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import etcd3.utils
from torch.distributed.elastic.rendezvous import RendezvousStateError

from rdzv_common.codec import decode_state
from rdzv_common.state import RendezvousState

from ..backend import state_key
from ..client import EtcdClient
from .options import PROG, RunNotFound
from .output import emit, emit_all


@dataclass(frozen=True)
class RunKeys:
    """A run's keys as read at one etcd ``revision``.

    Attributes:
        state: the state key's value, or ``None`` when it does not exist.
        mod_revision, version: the state key's last-write revision and its number of writes.
        alive: node key -> lease id, for each ``alive/<node key>`` key.
        join_revisions: the create revision of each ``joins/`` announcement.
    """

    key: str
    revision: int
    state: bytes | None
    mod_revision: int = 0
    version: int = 0
    alive: dict[str, int] = field(default_factory=dict)
    join_revisions: tuple[int, ...] = ()


def prefix_range(prefix: str) -> tuple[bytes, bytes]:
    raw = prefix.encode()
    return raw, etcd3.utils.prefix_range_end(raw)


def read_run_keys(etcd: EtcdClient, run_id: str) -> RunKeys:
    """Read the state key and its ``joins/`` and ``alive/`` keys at one revision."""
    key = state_key(etcd.config.key_prefix, run_id)
    head = etcd.request(lambda c: c.get_response(key))
    revision = head.header.revision
    start, end = prefix_range(key + "/")
    below = etcd.request(lambda c: c.get_range_response(start, end, keys_only=True, revision=revision))
    alive_prefix, joins_prefix = f"{key}/alive/".encode(), f"{key}/joins/".encode()
    alive = {kv.key[len(alive_prefix) :].decode(): kv.lease for kv in below.kvs if kv.key.startswith(alive_prefix)}
    joins = tuple(kv.create_revision for kv in below.kvs if kv.key.startswith(joins_prefix))
    if not head.kvs:
        return RunKeys(key, revision, None, alive=alive, join_revisions=joins)
    kv = head.kvs[0]
    return RunKeys(key, revision, kv.value, kv.mod_revision, kv.version, alive, joins)


def decode_run_state(keys: RunKeys, run_id: str) -> RendezvousState:
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


# Directories below a run's state key: announcements, liveness and the agents' store.
RUN_SUBDIRS = ("joins", "alive", "store")


def _is_state_key(relative: str) -> bool:
    """Whether a key below the key prefix (``relative`` to it) is a run's state key rather than
    one of the keys in a run's ``joins/``, ``alive/`` or ``store/`` directories."""
    return not any(part in RUN_SUBDIRS for part in relative.split("/")[1:-1])


def _run_of(relative: str) -> str:
    """The run a key in one of a run's directories belongs to."""
    parts = relative.split("/")
    inner = next(i for i, part in enumerate(parts[1:-1], 1) if part in RUN_SUBDIRS)
    return "/".join(parts[:inner])


def _run_entry(run_id: str, kv: Any, alive: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"run_id": run_id, "mod_revision": kv.mod_revision, "alive": alive}
    try:
        state = decode_state(kv.value, where=f"key '{kv.key.decode()}'")
    except RendezvousStateError as exc:
        return {**entry, "round": None, "complete": None, "closed": None, "participants": None,
                "world_size": None, "error": str(exc)}
    return {**entry, "round": state.round, "complete": state.complete, "closed": state.closed,
            "participants": len(state.participants), "world_size": state.world_size, "error": None}


def list_runs(etcd: EtcdClient) -> list[dict[str, Any]]:
    """One entry per state key under the key prefix, sorted by run id (``list --json``'s runs).

    A corrupt state gives an entry with ``error`` set and its state fields ``None``; ``alive``
    counts the run's liveness keys.
    """
    prefix = etcd.config.key_prefix + "/"
    start, end = prefix_range(prefix)
    response = etcd.request(lambda c: c.get_range_response(start, end))
    states, alive = {}, {}
    for kv in response.kvs:
        relative = kv.key.decode()[len(prefix) :]
        if _is_state_key(relative):
            states[relative] = kv
        elif relative.split("/")[-2] == "alive":
            alive[_run_of(relative)] = alive.get(_run_of(relative), 0) + 1
    return [_run_entry(run_id, states[run_id], alive.get(run_id, 0)) for run_id in sorted(states)]


def _run_line(entry: Mapping[str, Any]) -> str:
    if entry["error"] is not None:
        return f"{entry['run_id']}  CORRUPT (reset it with `{PROG} reset {entry['run_id']} --yes`): {entry['error']}"
    return (
        f"{entry['run_id']}  round {entry['round']}  participants {entry['participants']}  "
        f"alive {entry['alive']}  {'complete' if entry['complete'] else 'forming'}  "
        f"{'closed' if entry['closed'] else 'open'}  rev {entry['mod_revision']}"
    )


def cmd_list(etcd: EtcdClient, args: argparse.Namespace) -> int:
    """Print every run under the key prefix."""
    runs = list_runs(etcd)
    if args.json:
        emit(json.dumps({"key_prefix": etcd.config.key_prefix, "runs": runs}, indent=2))
    elif not runs:
        emit(f"no runs under {etcd.config.key_prefix}")
    else:
        emit_all(_run_line(entry) for entry in runs)
    return 0
