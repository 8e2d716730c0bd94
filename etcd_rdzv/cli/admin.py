"""The commands that change a run: ``close`` (mark it closed so that its agents exit) and
``reset`` (delete every key of it)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import tenacity

from rdzv_common.codec import decode_state, encode_state
from rdzv_common.state import RendezvousState

from ..backend import EtcdRendezvousBackend, state_key, store_prefix
from ..client import EtcdClient
from .options import CliError, RunNotFound, UsageError
from .output import emit, emit_all
from .runs import prefix_range

CLOSE_ATTEMPTS = 20


class _Conflict(Exception):
    """Another writer changed the state between this command's read and its compare-and-set."""


def _close_once(backend: EtcdRendezvousBackend, run_id: str) -> tuple[RendezvousState, bool]:
    current = backend.get_state()
    if current is None:
        raise RunNotFound(f"run '{run_id}' not found: no key '{backend.key}' in etcd")
    value, token = current
    state = decode_state(value, where=f"key '{backend.key}'")
    if state.closed:
        return state, False
    state.closed = True
    written = backend.set_state(encode_state(state), token)
    if written is None:
        raise RunNotFound(f"run '{run_id}' vanished while it was being closed")
    if not written[2]:
        raise _Conflict(run_id)
    return state, True


def close_run(backend: EtcdRendezvousBackend, run_id: str) -> tuple[RendezvousState, bool]:
    """Mark the run closed by compare-and-set on the state key's revision, retried when another
    writer wins; return the closed state and whether this call closed it (``False``: it already
    was).

    Raises:
        RunNotFound: the run has no state.
        RendezvousStateError: the state is corrupt.
        CliError: other writers won every attempt.
    """
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(_Conflict),
        stop=tenacity.stop_after_attempt(CLOSE_ATTEMPTS),
        wait=tenacity.wait_random_exponential(multiplier=0.05, max=1.0),
        reraise=True,
    )
    try:
        return retrying(_close_once, backend, run_id)
    except _Conflict:
        raise CliError(
            f"run '{run_id}' kept changing during {CLOSE_ATTEMPTS} attempts to close it; try again"
        ) from None


def cmd_close(etcd: EtcdClient, args: argparse.Namespace) -> int:
    """Close a run so that its agents exit."""
    backend = EtcdRendezvousBackend(etcd, args.run_id, name="etcd_rdzv")
    try:
        state, changed = close_run(backend, args.run_id)
    finally:
        backend.close()
    if changed:
        emit(f"run '{args.run_id}' closed at round {state.round}; its agents exit at their next check")
    else:
        emit(f"run '{args.run_id}' was already closed (round {state.round})")
    return 0


@dataclass(frozen=True)
class ResetPlan:
    """What ``reset`` deletes: the state key (if present) and the keys of two ranges."""

    state_key: str
    state_present: bool
    run_range: str
    run_keys: int
    store_range: str
    store_keys: int

    @property
    def empty(self) -> bool:
        return not self.state_present and self.run_keys == 0 and self.store_keys == 0

    def lines(self) -> list[str]:
        return [
            f"  state key {self.state_key} ({'present' if self.state_present else 'absent'})",
            f"  {self.run_keys} key(s) under {self.run_range} (join announcements, liveness)",
            f"  {self.store_keys} key(s) under {self.store_range} (the agents' store)",
        ]


def _count(etcd: EtcdClient, prefix: str) -> int:
    start, end = prefix_range(prefix)
    return etcd.request(lambda c: c.get_range_response(start, end, count_only=True)).count


def plan_reset(etcd: EtcdClient, run_id: str) -> ResetPlan:
    """Count the keys that ``reset`` would delete; other runs' keys are outside every range."""
    key = state_key(etcd.config.key_prefix, run_id)
    present = bool(etcd.request(lambda c: c.get_response(key, count_only=True)).count)
    run_range, store_range = f"{key}/", f"{store_prefix(etcd.config.key_prefix, run_id)}/"
    stores = _count(etcd, store_range)
    return ResetPlan(key, present, run_range, _count(etcd, run_range) - stores, store_range, stores)


def cmd_reset(etcd: EtcdClient, args: argparse.Namespace) -> int:
    """Delete every key of a run (``EtcdRendezvousBackend.delete_run``), only with ``--yes``."""
    plan = plan_reset(etcd, args.run_id)
    if plan.empty:
        raise RunNotFound(f"run '{args.run_id}' not found: it has no keys to delete")
    if not args.yes:
        emit_all([f"reset would delete from etcd at {etcd.config.describe_endpoints()}:", *plan.lines()])
        raise UsageError(f"refusing to delete run '{args.run_id}' without --yes")
    backend = EtcdRendezvousBackend(etcd, args.run_id, name="etcd_rdzv")
    try:
        backend.delete_run()
    finally:
        backend.close()
    emit_all([f"deleted run '{args.run_id}':", *plan.lines()])
    return 0
