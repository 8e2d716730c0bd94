"""``etcd-rdzv``: look at and repair the rendezvous runs that live in etcd, without reading code.

Subcommands::

    etcd-rdzv status RUN_ID [--json]        one run: round, members, liveness, pending joins
    etcd-rdzv watch RUN_ID [--timeout S] [--count N]
                                            print each change to the run as it happens
    etcd-rdzv list [--json]                 every run under the key prefix, one line each
    etcd-rdzv close RUN_ID                  mark the run closed, so that its agents exit
    etcd-rdzv reset RUN_ID --yes            delete every key of the run (the fix for a corrupt state)

The connection options are the backend's ``--rdzv-conf`` keys, validated by the same code
(``config_from_params``); each may also come from an ``ETCD_RDZV_*`` environment variable, and a
flag wins over its variable. Failures print one line, ``etcd-rdzv: error: ...``, on stderr and exit
with 2 (usage or configuration), 1 (etcd unreachable, corrupt state, other runtime failure) or
3 (no such run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NoReturn

import etcd3
import etcd3.utils
import grpc
import tenacity
from etcd3 import etcdrpc
from etcd3.etcdrpc import kv_pb2
from torch.distributed.elastic.rendezvous import (
    RendezvousConnectionError,
    RendezvousError,
    RendezvousParameters,
    RendezvousStateError,
)

from rdzv_common.codec import decode_announcement, decode_state, encode_state
from rdzv_common.state import NodeDesc, RendezvousState

from .backend import EtcdRendezvousBackend, state_key
from .client import EtcdClient, fail_over
from .config import EtcdConfig, config_from_params
from .store import STORE_PREFIX

PROG = "etcd-rdzv"
ENV_PREFIX = "ETCD_RDZV_"
# An operator waits on the terminal: give up on an unreachable etcd sooner than the agents do.
DEFAULT_READ_TIMEOUT = 10.0
CLOSE_ATTEMPTS = 20
# How often ``watch``'s main thread wakes up to act on a Ctrl-C.
SIGNAL_CHECK_SECONDS = 0.2

# CLI option (argparse dest) -> the backend's ``--rdzv-conf`` key; ``endpoints`` is the endpoint.
CONF_KEYS: dict[str, str] = {
    "protocol": "protocol",
    "ca_cert": "ca_cert",
    "cert": "ssl_cert",
    "key": "ssl_cert_key",
    "user": "username",
    "password": "password",
    "key_prefix": "key_prefix",
    "read_timeout": "read_timeout",
}
CONNECTION_OPTIONS = ("endpoints", *CONF_KEYS)


# --- errors ------------------------------------------------------------------------------------


class CliError(Exception):
    """A failure reported as one line on stderr; ``exit_code`` is the process's exit status."""

    exit_code = 1


class UsageError(CliError):
    """The command line or the configuration is wrong."""

    exit_code = 2


class RunNotFound(CliError):
    """The run has no keys in etcd."""

    exit_code = 3


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --- configuration -----------------------------------------------------------------------------


def env_var(option: str) -> str:
    """The environment variable that supplies ``option`` (an argparse dest) when no flag does."""
    return ENV_PREFIX + option.upper()


def resolve_options(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, str]:
    """The connection options that are set, each from its flag or else its environment variable;
    an empty variable counts as unset."""
    values: dict[str, str] = {}
    for option in CONNECTION_OPTIONS:
        value = getattr(args, option, None)
        if value is None:
            value = environ.get(env_var(option), "").strip() or None
        if value is not None:
            values[option] = value
    return values


def params_from_options(options: Mapping[str, str], run_id: str | None) -> RendezvousParameters:
    """The ``RendezvousParameters`` a torchrun agent would pass the backend for these options."""
    conf: dict[str, Any] = {CONF_KEYS[k]: v for k, v in options.items() if k in CONF_KEYS}
    conf.setdefault("read_timeout", DEFAULT_READ_TIMEOUT)
    return RendezvousParameters(
        backend="etcd_rdzv",
        endpoint=options.get("endpoints", ""),
        run_id=run_id or PROG,
        min_nodes=1,
        max_nodes=1,
        **conf,
    )


def load_config(args: argparse.Namespace, environ: Mapping[str, str]) -> EtcdConfig:
    """Validate the connection options exactly as the backend does.

    Raises:
        UsageError: an option is invalid; the message names it.
    """
    try:
        params = params_from_options(resolve_options(args, environ), getattr(args, "run_id", None))
        return config_from_params(params)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# --- reading a run -----------------------------------------------------------------------------


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


def _prefix_range(prefix: str) -> tuple[bytes, bytes]:
    raw = prefix.encode()
    return raw, etcd3.utils.prefix_range_end(raw)


def read_run_keys(etcd: EtcdClient, run_id: str) -> RunKeys:
    """Read the state key and its ``joins/`` and ``alive/`` keys at one revision."""
    key = state_key(etcd.config.key_prefix, run_id)
    head = etcd.request(lambda c: c.get_response(key))
    revision = head.header.revision
    start, end = _prefix_range(key + "/")
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


# --- status ------------------------------------------------------------------------------------


def _node_doc(node: NodeDesc, keys: RunKeys, ttls: Mapping[int, int]) -> dict[str, Any]:
    lease = keys.alive.get(node.key)
    ttl = ttls.get(lease) if lease is not None else None
    return {
        "node": node.key,
        "addr": node.addr,
        "pid": node.pid,
        "local_id": node.local_id,
        "alive": ttl is not None and ttl > 0,
        "lease_id": lease,
        "lease_ttl": ttl,
    }


def status_document(run_id: str, keys: RunKeys, state: RendezvousState, ttls: Mapping[int, int]) -> dict[str, Any]:
    """The run's status with stable keys (``status --json``).

    Nodes carry ``alive`` (their liveness key exists on an unexpired lease), ``lease_id`` and
    ``lease_ttl`` (seconds left; ``None`` without a liveness key). Participants carry ``rank``,
    ``None`` until the round is complete. etcd keeps no timestamps: the last change is the state
    key's ``mod_revision`` (and its ``version``, the number of writes), against the cluster's
    ``revision`` at the time of reading.
    """
    listed = {n.key for n in state.nodes()}
    return {
        "run_id": run_id,
        "state_key": keys.key,
        "revision": keys.revision,
        "mod_revision": keys.mod_revision,
        "version": keys.version,
        "round": state.round,
        "complete": state.complete,
        "closed": state.closed,
        "world_size": state.world_size,
        "deadline": state.deadline,
        "participants": [
            {**_node_doc(n, keys, ttls), "rank": rank if state.complete else None}
            for n, rank in sorted(state.participants.items(), key=lambda item: (item[1], item[0]))
        ],
        "wait_list": [_node_doc(n, keys, ttls) for n in sorted(state.wait_list)],
        "redundancy_list": [_node_doc(n, keys, ttls) for n in sorted(state.redundancy_list)],
        "pending_joins": sum(1 for r in keys.join_revisions if r > state.cursor),
        "alive_unlisted": sorted(set(keys.alive) - listed),
    }


def _clock(unix_time: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix_time))


def _liveness_text(node: Mapping[str, Any]) -> str:
    if node["alive"]:
        return f"alive (lease {node['lease_id']:x}, {node['lease_ttl']}s left)"
    if node["lease_id"] is None:
        return "DEAD (no liveness key)"
    return f"DEAD (lease {node['lease_id']:x} expired)"


def _node_line(node: Mapping[str, Any]) -> str:
    rank = node.get("rank")
    where = f"addr={node['addr']} pid={node['pid']} local_id={node['local_id']}"
    prefix = f"rank {rank if rank is not None else '-'}  " if "rank" in node else ""
    return f"  {prefix}{node['node']}  {where}  {_liveness_text(node)}"


def _section(title: str, nodes: Sequence[Mapping[str, Any]]) -> list[str]:
    return [f"{title + ':':<18}{len(nodes)}", *(_node_line(n) for n in nodes)]


def render_status(doc: Mapping[str, Any]) -> list[str]:
    """``status``'s text: the lines of ``status_document``'s content for a person."""
    progress = "complete" if doc["complete"] else "forming"
    lines = [
        f"{'run:':<18}{doc['run_id']}  (key {doc['state_key']})",
        f"{'round:':<18}{doc['round']}, {progress}, {'CLOSED' if doc['closed'] else 'open'}, "
        f"world size {doc['world_size']}",
        f"{'last change:':<18}revision {doc['mod_revision']} (write #{doc['version']} of the state "
        f"key; etcd is at revision {doc['revision']}; etcd records no wall-clock time)",
    ]
    if doc["deadline"] is not None:
        left = doc["deadline"] - time.time()
        lines.append(f"{'last call:':<18}round completes by {_clock(doc['deadline'])} ({left:+.0f}s)")
    lines += _section("participants", doc["participants"])
    lines += _section("wait list", doc["wait_list"])
    lines += _section("redundancy list", doc["redundancy_list"])
    lines.append(f"{'pending joins:':<18}{doc['pending_joins']} announcement(s) not yet folded into the state")
    if doc["alive_unlisted"]:
        lines.append(f"{'alive, unlisted:':<18}{', '.join(doc['alive_unlisted'])}")
    return lines


def cmd_status(etcd: EtcdClient, args: argparse.Namespace) -> int:
    """Print one run's status."""
    keys = read_run_keys(etcd, args.run_id)
    state = decode_run_state(keys, args.run_id)
    doc = status_document(args.run_id, keys, state, lease_ttls(etcd, keys.alive.values()))
    _emit_all([json.dumps(doc, indent=2)] if args.json else render_status(doc))
    return 0


# --- list --------------------------------------------------------------------------------------


def _is_state_key(relative: str) -> bool:
    """Whether a key below the key prefix (``relative`` to it) is a run's state key rather than
    one of a run's ``joins/`` or ``alive/`` keys."""
    parts = relative.split("/")
    return len(parts) < 3 or parts[-2] not in ("joins", "alive")


def _run_of(relative: str) -> str:
    return relative.rsplit("/", 2)[0]


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
    start, end = _prefix_range(prefix)
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
        _emit(json.dumps({"key_prefix": etcd.config.key_prefix, "runs": runs}, indent=2))
    elif not runs:
        _emit(f"no runs under {etcd.config.key_prefix}")
    else:
        _emit_all(_run_line(entry) for entry in runs)
    return 0


# --- watch -------------------------------------------------------------------------------------


def _list_changes(round_: int, title: str, before: set[NodeDesc], after: set[NodeDesc]) -> list[str]:
    return [f"round {round_}: +{n} joined {title}" for n in sorted(after - before)] + [
        f"round {round_}: -{n} left {title}" for n in sorted(before - after)
    ]


def summarize_state(state: RendezvousState) -> str:
    """One line: the round, its progress and its members' count."""
    progress = f"complete, world size {state.world_size}" if state.complete else "forming"
    closed = ", closed" if state.closed else ""
    return (
        f"round {state.round} {progress}{closed}; {len(state.participants)} participant(s), "
        f"{len(state.wait_list)} waiting, {len(state.redundancy_list)} redundant"
    )


def _changes(old: RendezvousState, new: RendezvousState) -> list[str]:
    r = new.round
    lines = [f"round {r} started"] if new.round != old.round else []
    lines += _list_changes(r, "participants", set(old.participants), set(new.participants))
    lines += _list_changes(r, "the wait list", old.wait_list, new.wait_list)
    lines += _list_changes(r, "the redundancy list", old.redundancy_list, new.redundancy_list)
    completed = new.complete and not (old.complete and old.round == new.round)
    if new.deadline is not None and new.deadline != old.deadline:
        lines.append(f"round {r}: last call, completes by {_clock(new.deadline)}")
    elif new.deadline is None and old.deadline is not None and not completed:
        lines.append(f"round {r}: last call cancelled")
    if completed:
        ranks = ", ".join(f"{n}={rank}" for n, rank in sorted(new.participants.items(), key=lambda i: i[1]))
        lines.append(f"round {r} complete: world size {new.world_size} ({ranks})")
    if new.closed != old.closed:
        lines.append("closed" if new.closed else "reopened")
    return lines


def state_changes(old: RendezvousState | None, new: RendezvousState) -> list[str]:
    """Human lines for the difference between two consecutive states (``old`` is ``None`` when
    the state was just created); never empty."""
    if old is None:
        return [f"state created: {summarize_state(new)}", *_changes(RendezvousState(round=new.round), new)]
    quiet = f"round {new.round}: state rewritten, nothing visible changed (join cursor {new.cursor})"
    return _changes(old, new) or [quiet]


class RunWatcher:
    """Turns the changes to one run's keys into human lines, remembering what it last saw.

    Args:
        keys: the run as read when watching starts.

    Attributes:
        revision: the etcd revision to watch from next (the one after the last change seen).
    """

    def __init__(self, keys: RunKeys) -> None:
        self.key = keys.key
        self.revision = keys.revision + 1
        self.value = keys.state
        self.state, self.problem = self._decode(keys.state)
        self.alive = set(keys.alive)

    def _decode(self, value: bytes | None) -> tuple[RendezvousState | None, str | None]:
        if value is None:
            return None, None
        try:
            return decode_state(value, where=f"key '{self.key}'"), None
        except RendezvousStateError as exc:
            return None, str(exc)

    def describe(self) -> str:
        """What the run looks like now."""
        if self.problem is not None:
            return f"state is corrupt: {self.problem}"
        if self.state is None:
            return "no state yet (waiting for the run to start)"
        return summarize_state(self.state)

    def on_state(self, value: bytes | None) -> list[str]:
        """Lines for the state key now holding ``value`` (``None``: deleted)."""
        previous, existed = self.state, self.value is not None
        self.value = value
        self.state, self.problem = self._decode(value)
        if self.problem is not None:
            return [f"state is corrupt: {self.problem}"]
        if self.state is None:
            return ["state deleted (the run was reset, or its keys expired)"] if existed else []
        return state_changes(previous, self.state)

    def on_liveness(self, node_key: str, alive: bool) -> list[str]:
        """Lines for ``node_key``'s liveness key appearing (``alive``) or vanishing."""
        if alive == (node_key in self.alive):
            return []
        if alive:
            self.alive.add(node_key)
            return [f"node {node_key} is alive"]
        self.alive.discard(node_key)
        return [f"node {node_key} lost liveness{self._role(node_key)}"]

    def _role(self, node_key: str) -> str:
        members = self.state.participants if self.state is not None else {}
        for node, rank in members.items():
            if node.key == node_key:
                return f" (participant, rank {rank})" if self.state.complete else " (participant)"
        return ""

    def on_event(self, event: Any) -> list[str]:
        """Lines for one watch event on the run's keys; none for keys of other runs."""
        self.revision = max(self.revision, event.kv.mod_revision + 1)
        key = event.kv.key.decode()
        put = event.type == kv_pb2.Event.PUT
        if key == self.key:
            return self.on_state(event.kv.value if put else None)
        if key.startswith(f"{self.key}/alive/"):
            return self.on_liveness(key[len(f"{self.key}/alive/") :], put)
        if key.startswith(f"{self.key}/joins/") and put:
            return [self._announcement(event.kv.value)]
        return []

    def _announcement(self, value: bytes) -> str:
        try:
            note = decode_announcement(value)
        except RendezvousStateError as exc:
            return f"unreadable join announcement: {exc}"
        if note.kind == "join":
            return f"node {note.node} announced a join"
        return f"node {note.node} announced it leaves round {note.round}"

    def on_snapshot(self, keys: RunKeys) -> list[str]:
        """Lines for the run having become ``keys``, read afresh after a gap in the watch."""
        self.revision = keys.revision + 1
        lines = self.on_state(keys.state) if keys.state != self.value else []
        for node_key in sorted(self.alive ^ set(keys.alive)):
            lines += self.on_liveness(node_key, node_key in keys.alive)
        return lines


def _stamp(revision: int, line: str) -> str:
    return f"{time.strftime('%H:%M:%S')} [rev {revision}] {line}"


@dataclass
class WatchLimits:
    """When ``watch`` stops: after ``count`` changes, at monotonic time ``deadline``, or on ``stop``
    (from another thread), which also cancels the watch stream in progress (``call``)."""

    count: int | None
    deadline: float
    seen: int = 0
    stopped: threading.Event = field(default_factory=threading.Event)
    call: grpc.Future | None = None

    def done(self) -> bool:
        return (
            self.stopped.is_set()
            or (self.count is not None and self.seen >= self.count)
            or time.monotonic() >= self.deadline
        )

    def stop(self) -> None:
        self.stopped.set()
        if self.call is not None:
            self.call.cancel()

    def remaining(self) -> float | None:
        """Seconds left, ``None`` without a deadline."""
        return None if self.deadline == float("inf") else max(0.0, self.deadline - time.monotonic())


def _report(revision: int, lines: list[str], limits: WatchLimits) -> None:
    """Print ``lines`` as one change; they count toward ``--count`` once, if there are any."""
    if lines:
        _emit_all(_stamp(revision, line) for line in lines)
        limits.seen += 1


def follow(client: etcd3.MultiEndpointEtcd3Client, watcher: RunWatcher, limits: WatchLimits) -> bool:
    """Stream the events on the run's keys from ``watcher.revision`` and report each change until
    ``limits`` are reached; call it within a request, which resumes from the last change seen.

    The range watched is ``[state key, state key + "0")``: the state key and everything under
    ``<state key>/``, plus keys of runs whose id extends this one (``run-1-b``), which
    ``RunWatcher`` ignores.

    Returns:
        ``False`` if etcd compacted the history the watch started in: re-read the run.

    Raises:
        CliError: etcd cancelled the watch (e.g. for lack of permission).
    """
    _, end = _prefix_range(watcher.key + "/")
    create = etcdrpc.WatchCreateRequest(key=watcher.key.encode(), range_end=end, start_revision=watcher.revision)
    done = threading.Event()

    def requests() -> Iterator[etcdrpc.WatchRequest]:
        yield etcdrpc.WatchRequest(create_request=create)
        done.wait()  # ending the request stream would end the watch on the server

    call = etcdrpc.WatchStub(client.channel).Watch(requests(), timeout=limits.remaining(), metadata=client.metadata)
    limits.call = call
    try:
        if limits.done():
            return True
        for response in call:
            if response.compact_revision:
                return False
            if response.canceled:
                reason = response.cancel_reason or "no reason given"
                raise CliError(f"etcd cancelled the watch on {watcher.key}: {reason}")
            for event in response.events:
                if limits.done():
                    break
                _report(event.kv.mod_revision, watcher.on_event(event), limits)
            if limits.done():
                break
        return True
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED or limits.done():
            return True
        fail_over(client, exc)
    finally:
        limits.call = None
        done.set()
        call.cancel()


def _follow_with_retries(etcd: EtcdClient, watcher: RunWatcher, limits: WatchLimits) -> bool:
    """``follow`` as a request. A watch that ran longer than ``read_timeout`` before failing gets a
    fresh request, and with it the full retry budget, so that it rides out a short etcd outage."""
    while True:
        began = time.monotonic()
        try:
            return etcd.request(lambda c: follow(c, watcher, limits))
        except RendezvousConnectionError:
            if time.monotonic() - began < etcd.config.read_timeout or limits.done():
                raise


def watch_run(etcd: EtcdClient, run_id: str, limits: WatchLimits) -> None:
    """Print how the run looks, then each change to it, until ``limits`` are reached."""
    keys = read_run_keys(etcd, run_id)
    watcher = RunWatcher(keys)
    _emit(_stamp(keys.revision, f"watching run '{run_id}': {watcher.describe()}"))
    while not limits.done():
        if not _follow_with_retries(etcd, watcher, limits):
            keys = read_run_keys(etcd, run_id)
            _report(keys.revision, watcher.on_snapshot(keys), limits)


def cmd_watch(etcd: EtcdClient, args: argparse.Namespace) -> int:
    """Print each change to a run until ``--count`` changes, ``--timeout`` or Ctrl-C (exit 0).

    The watch runs in a worker thread while this one waits in short steps (a signal that lands on
    one of gRPC's threads is only acted on once this thread runs Python code): a Ctrl-C raised
    inside gRPC's own code can leave its channel unable to close, so it is taken here, where it
    ends the watch by cancelling it.
    """
    deadline = time.monotonic() + args.timeout if args.timeout is not None else float("inf")
    limits = WatchLimits(args.count, deadline)
    with ThreadPoolExecutor(1, thread_name_prefix="etcd-rdzv-watch") as pool:
        watching = pool.submit(watch_run, etcd, args.run_id, limits)
        try:
            while not watching.done():
                futures.wait([watching], timeout=SIGNAL_CHECK_SECONDS)
        except KeyboardInterrupt:
            limits.stop()
        watching.result()
    return 0


# --- close -------------------------------------------------------------------------------------


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
        _emit(f"run '{args.run_id}' closed at round {state.round}; its agents exit at their next check")
    else:
        _emit(f"run '{args.run_id}' was already closed (round {state.round})")
    return 0


# --- reset -------------------------------------------------------------------------------------


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
    start, end = _prefix_range(prefix)
    return etcd.request(lambda c: c.get_range_response(start, end, count_only=True)).count


def plan_reset(etcd: EtcdClient, run_id: str) -> ResetPlan:
    """Count the keys that ``reset`` would delete; other runs' keys are outside every range."""
    key = state_key(etcd.config.key_prefix, run_id)
    present = bool(etcd.request(lambda c: c.get_response(key, count_only=True)).count)
    run_range, store_range = f"{key}/", f"{STORE_PREFIX}/{run_id}/"
    return ResetPlan(key, present, run_range, _count(etcd, run_range), store_range, _count(etcd, store_range))


def cmd_reset(etcd: EtcdClient, args: argparse.Namespace) -> int:
    """Delete every key of a run (``EtcdRendezvousBackend.delete_run``), only with ``--yes``."""
    plan = plan_reset(etcd, args.run_id)
    if plan.empty:
        raise RunNotFound(f"run '{args.run_id}' not found: it has no keys to delete")
    if not args.yes:
        _emit_all([f"reset would delete from etcd at {etcd.config.describe_endpoints()}:", *plan.lines()])
        raise UsageError(f"refusing to delete run '{args.run_id}' without --yes")
    backend = EtcdRendezvousBackend(etcd, args.run_id, name="etcd_rdzv")
    try:
        backend.delete_run()
    finally:
        backend.close()
    _emit_all([f"deleted run '{args.run_id}':", *plan.lines()])
    return 0


# --- command line ------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors become one-line ``UsageError``s instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _connection_parent() -> argparse.ArgumentParser:
    """The connection options, accepted before or after the subcommand; unset ones stay absent
    from the namespace so that one given before the subcommand is not reset after it."""
    parent = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    group = parent.add_argument_group("etcd connection (each also from its ETCD_RDZV_* variable; flags win)")
    helps = {
        "endpoints": "host:port[,host:port...] (default localhost:2379)",
        "protocol": "http or https",
        "ca_cert": "PEM file of the CA that signs the server's certificate",
        "cert": "PEM client certificate (with --key)",
        "key": "PEM private key of the client certificate",
        "user": "etcd user name (with a password)",
        "password": f"etcd password; prefer {env_var('password')}, which `ps` does not show",
        "key_prefix": "the runs' key directory (default /torch/elastic/rendezvous)",
        "read_timeout": f"seconds to keep retrying a failed request (default {DEFAULT_READ_TIMEOUT:g})",
    }
    for option, text in helps.items():
        group.add_argument(
            "--" + option.replace("_", "-"), dest=option, metavar=option.upper(), help=f"{text} [{env_var(option)}]"
        )
    return parent


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected a positive integer")
    return int(text)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"invalid timeout {text!r}: expected a positive number of seconds")
    return value


Command = Callable[[EtcdClient, argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """The ``etcd-rdzv`` command line; each subcommand's namespace carries its ``handler``."""
    parent = _connection_parent()
    parser = _Parser(prog=PROG, parents=[parent], description="Inspect and repair rendezvous runs in etcd.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Command, text: str, run: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[parent], help=text, description=text)
        if run:
            sub.add_argument("run_id", metavar="RUN_ID", help="the run id (torchrun's --rdzv-id)")
        sub.set_defaults(handler=handler)
        return sub

    add("status", cmd_status, "Show a run: round, members with ranks and liveness, lists, pending joins.").add_argument(
        "--json", action="store_true", help="print a JSON document with stable keys"
    )
    add("list", cmd_list, "List the runs under the key prefix, one line each.", run=False).add_argument(
        "--json", action="store_true", help="print a JSON document with stable keys"
    )
    watch = add("watch", cmd_watch, "Print each change to a run as it happens; Ctrl-C stops.")
    watch.add_argument("--timeout", type=_positive_seconds, metavar="SECONDS", help="stop after this long")
    watch.add_argument("--count", type=_positive_int, metavar="N", help="stop after N changes")
    add("close", cmd_close, "Mark a run closed so that its agents exit.")
    add("reset", cmd_reset, "Delete every key of a run (its state, joins, liveness and store).").add_argument(
        "--yes", action="store_true", help="really delete; without it, only show what would go"
    )
    return parser


def _emit(line: str) -> None:
    print(line, flush=True)


def _emit_all(lines: Iterable[str]) -> None:
    for line in lines:
        _emit(line)


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr, flush=True)
    return code


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Connect with the configured options and run the chosen subcommand."""
    etcd = EtcdClient(load_config(args, environ))
    try:
        return args.handler(etcd, args)
    finally:
        etcd.close()


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run ``etcd-rdzv`` and return its exit status; every failure is one line on stderr."""
    run_id = None
    try:
        args = build_parser().parse_args(argv)
        run_id = getattr(args, "run_id", None)
        return run(args, os.environ if environ is None else environ)
    except CliError as exc:
        return _fail(str(exc), exc.exit_code)
    except RendezvousStateError as exc:
        fix = f" Fix: `{PROG} reset {run_id} --yes` deletes the run; its agents must then restart." if run_id else ""
        return _fail(f"{exc}{fix}", 1)
    except RendezvousError as exc:
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:  # the last resort: an operator gets a line, not a traceback
        return _fail(f"unexpected {type(exc).__name__}: {exc}", 1)
