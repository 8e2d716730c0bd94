"""The commands that change a run: ``close`` (mark it closed so that its agents exit), ``reset``
(delete every key of it) and ``quarantine`` (keep a host out of it, or let it back in)."""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass

from rdzv_common.backend import QuarantineEntry

from rdzv_common.codec import decode_state, encode_state
from rdzv_common.state import RendezvousState

from ..backend import EtcdRendezvousBackend
from ..keys import RunKeys, prefix_range
from ..quarantine import EtcdQuarantine
from ..run import EtcdClient, EtcdRun, Floor, acquire, release
from ..store import Conflict, compare_and_swap
from .options import PROG, CliError, RunNotFound, UsageError
from .output import clock, emit, emit_all

# How long ``close`` keeps trying while agents keep winning the state's compare-and-set.
CLOSE_SECONDS = 10.0


def close_run(run: EtcdRun, now: bool = False) -> tuple[RendezvousState, bool]:
    """Mark the run closed (with ``now``, also ask its running group to stop its workers at once)
    by compare-and-set on the state key's revision, retried while other writers win; return the
    state written and whether this call changed it (``False``: it already was so).

    Raises:
        RunNotFound: the run has no state.
        RendezvousStateError: the state is corrupt.
        CliError: other writers won every attempt.
    """
    where = f"key '{run.keys.state}'"
    # The state and the decision of the last attempt, which is the one that counts (none: absent).
    last: list[tuple[RendezvousState, bool] | None] = []

    def closed(value: bytes | None) -> bytes | None:
        if value is None:
            last[:] = [None]
            return None
        state = decode_state(value, where=where)
        done = state.closed and (state.stop_now or not now)
        last[:] = [(state, not done)]
        if done:
            return None
        state.closed = True
        state.stop_now = state.stop_now or now
        return encode_state(state)

    try:
        compare_and_swap(run, run.keys.state.encode(), closed, CLOSE_SECONDS)
    except Conflict:
        raise CliError(f"run '{run.run_id}' kept changing for {CLOSE_SECONDS:g}s while closing it; try again") from None
    if last[-1] is None:
        raise RunNotFound(f"run '{run.run_id}' not found: no key '{run.keys.state}' in etcd")
    return last[-1]


def cmd_close(etcd: EtcdClient, args: argparse.Namespace) -> int:
    """Close a run: no node joins it any more; with ``--now`` its running group stops too."""
    run = acquire(etcd.config, args.run_id)
    try:
        state, changed = close_run(run, now=args.now)
    finally:
        release(run)
    name = f"run '{args.run_id}'"
    if not changed:
        emit(f"{name} was already closed{' with --now' if state.stop_now else ''} (round {state.round})")
    elif args.now:
        emit_all([
            f"{name} closed at round {state.round}, with --now: each torchrun agent of its running group "
            "stops its workers within its monitor interval (and a second), then exits (status 1, "
            "RendezvousClosedError in its log); new agents are refused.",
        ])
    else:
        emit_all([
            f"{name} closed at round {state.round}: new agents are refused, and no new round forms. A running "
            "group trains on until its workers exit; an agent whose workers finish exits as usual, one whose "
            "workers fail, or that would restart them for a new node, exits instead of rejoining.",
            f"To stop the running group now: {PROG} close {args.run_id} --now",
        ])
    return 0


@dataclass(frozen=True)
class ResetPlan:
    """What ``reset`` deletes: the state key (if present) and the keys of two ranges; and how many
    of the run's nodes are alive (have a liveness key)."""

    state_key: str
    state_present: bool
    run_range: str
    run_keys: int
    store_range: str
    store_keys: int
    live_nodes: int = 0

    @property
    def empty(self) -> bool:
        return not self.state_present and self.run_keys == 0 and self.store_keys == 0

    def lines(self) -> list[str]:
        return [
            f"  state key {self.state_key} ({'present' if self.state_present else 'absent'})",
            f"  {self.run_keys} key(s) under {self.run_range} (announcements, liveness, receipts; "
            f"{self.live_nodes} live node(s))",
            f"  {self.store_keys} key(s) under {self.store_range} (the agents' store)",
        ]


def _count(etcd: EtcdClient, prefix: str) -> int:
    start, end = prefix_range(prefix)
    return etcd.request(lambda c: c.get_range_response(start, end, count_only=True)).count


def plan_reset(etcd: EtcdClient, run_id: str) -> ResetPlan:
    """Count the keys that ``reset`` would delete: the run's directory, no other run's keys."""
    layout = RunKeys(etcd.config.key_prefix, run_id)
    present = bool(etcd.request(lambda c: c.get_response(layout.state, count_only=True)).count)
    stores = _count(etcd, layout.store)
    others = _count(etcd, layout.root) - stores - int(present)
    return ResetPlan(layout.state, present, layout.root, others, layout.store, stores, _count(etcd, layout.alive))


def cmd_reset(etcd: EtcdClient, args: argparse.Namespace) -> int:
    """Delete every key of a run (``EtcdRendezvousBackend.delete_run``), only with ``--yes``, and
    while nodes of it are alive only with ``--force`` too."""
    plan = plan_reset(etcd, args.run_id)
    if plan.empty:
        raise RunNotFound(f"run '{args.run_id}' not found: it has no keys to delete")
    if not args.yes:
        emit_all([f"reset would delete from etcd at {etcd.config.describe_endpoints()}:", *plan.lines()])
        raise UsageError(f"refusing to delete run '{args.run_id}' without --yes")
    if plan.live_nodes and not args.force:
        raise UsageError(
            f"refusing to delete run '{args.run_id}': {plan.live_nodes} of its nodes are alive, and their agents "
            f"would write it again. End them first (`{PROG} close {args.run_id} --now` stops a running group), "
            "or pass --force to delete it anyway"
        )
    backend = EtcdRendezvousBackend(acquire(etcd.config, args.run_id), name="etcd_rdzv", release=release)
    try:
        backend.delete_run()
    finally:
        backend.close()
    emit_all([f"deleted run '{args.run_id}':", *plan.lines()])
    return 0


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a number with an optional unit, ``s``, ``m``, ``h`` or ``d`` (``10m``).

    Raises:
        argparse.ArgumentTypeError: naming the text and the expected form.
    """
    match = _DURATION.match(text.strip().lower())
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)] if match else 0.0
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: expected e.g. 90, 90s, 10m, 2h or 1d")
    return seconds


def cmd_quarantine(etcd: EtcdClient, args: argparse.Namespace) -> int:
    """Quarantine a host of a run for a while (``--add HOST --for DURATION``), end a host's
    quarantine (``--remove HOST``), or list the quarantined hosts (neither)."""
    if args.add is not None and args.duration is None:
        raise UsageError("--add needs --for DURATION (e.g. --for 10m)")
    if args.add is None and args.duration is not None:
        raise UsageError("--for goes with --add HOST")
    run = acquire(etcd.config, args.run_id)
    try:
        quarantine = EtcdQuarantine(run, Floor())
        if args.add is not None:
            until = time.time() + args.duration
            quarantine.put(QuarantineEntry(args.add, until, "quarantined by an operator (etcd-rdzv)"))
            emit(f"host {args.add} quarantined in run '{args.run_id}' until {clock(until)} ({args.duration:g}s)")
        elif args.remove is not None:
            quarantine.remove(args.remove)
            emit(f"host {args.remove} may join run '{args.run_id}' again")
        else:
            entries = quarantine.entries()
            emit_all(
                [f"{e.host}  {max(0, round(e.until - time.time()))}s left  {e.reason}" for e in entries]
                or [f"no host is quarantined in run '{args.run_id}'"]
            )
    finally:
        release(run)
    return 0
