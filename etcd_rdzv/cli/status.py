"""``status``: one run's round, members with ranks and liveness, lists and pending joins, as a
JSON document with stable keys or as text for a person."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from rdzv_common.state import NodeDesc, RendezvousState

from ..run import EtcdClient
from .output import clock, emit_all
from .runs import RunSnapshot, decode_run_state, lease_ttls, read_run


def _node_doc(node: NodeDesc, keys: RunSnapshot, ttls: Mapping[int, int], state: RendezvousState) -> dict[str, Any]:
    lease = keys.alive.get(node.key)
    ttl = ttls.get(lease) if lease is not None else None
    return {
        "node": node.key,
        "addr": node.addr,
        "pid": node.pid,
        "local_id": node.local_id,
        "topology": state.topology.get(node),
        "alive": ttl is not None and ttl > 0,
        # A 64-bit id: as a JSON number, jq and JavaScript round it. Hex, as etcdctl takes it.
        "lease_id": f"{lease:x}" if lease is not None else None,
        "lease_ttl": ttl,
    }


def status_document(run_id: str, keys: RunSnapshot, state: RendezvousState, ttls: Mapping[int, int]) -> dict[str, Any]:
    """The run's status with stable keys (``status --json``).

    Nodes carry ``alive`` (their liveness key exists on an unexpired lease), ``lease_id`` (a hex
    string, as ``etcdctl lease timetolive`` takes it) and ``lease_ttl`` (seconds left; ``None``
    without a liveness key) and ``topology`` (their label,
    ``None`` without one). ``quarantined`` lists the hosts kept out of the run, with the time their
    cool-down ends (``until``, UNIX time), ``seconds_left`` and ``reason``. Participants carry ``rank``,
    ``None`` until the round is complete. etcd keeps no timestamps: the last change is the state
    key's ``mod_revision`` (and its ``version``, the number of writes), against the cluster's
    ``revision`` at the time of reading.
    """
    listed = {n.key for n in state.nodes()}
    now = time.time()
    return {
        "run_id": run_id,
        "state_key": keys.key,
        "revision": keys.revision,
        "mod_revision": keys.mod_revision,
        "version": keys.version,
        "round": state.round,
        "complete": state.complete,
        "closed": state.closed,
        "stop_now": state.stop_now,
        "world_size": state.world_size,
        "deadline": state.deadline,
        "participants": [
            {**_node_doc(n, keys, ttls, state), "rank": rank if state.complete else None}
            for n, rank in sorted(state.participants.items(), key=lambda item: (item[1], item[0]))
        ],
        "wait_list": [_node_doc(n, keys, ttls, state) for n in sorted(state.wait_list)],
        "redundancy_list": [_node_doc(n, keys, ttls, state) for n in sorted(state.redundancy_list)],
        "pending_joins": sum(1 for r in keys.join_revisions if r > state.cursor),
        "alive_unlisted": sorted(set(keys.alive) - listed),
        "quarantined": [
            {"host": e.host, "until": e.until, "seconds_left": max(0, round(e.until - now)), "reason": e.reason,
             "strikes": e.strikes}
            for e in sorted(keys.quarantined, key=lambda e: e.host)
        ],
    }


def _liveness_text(node: Mapping[str, Any], closed: bool) -> str:
    if node["alive"]:
        return f"alive (lease {node['lease_id']}, {node['lease_ttl']}s left)"
    if node["lease_id"] is not None:
        return f"DEAD (lease {node['lease_id']} expired)"
    # A node's liveness key goes when it shuts down, when its process exits, and when its lease
    # lapses after it died: which one, etcd does not say.
    if closed:
        return "exited (no liveness key; the run is closed)"
    return "gone (no liveness key: it exited, or died and its lease lapsed; the next write drops it)"


def _node_line(node: Mapping[str, Any], closed: bool) -> str:
    rank = node.get("rank")
    where = f"addr={node['addr']} pid={node['pid']} local_id={node['local_id']}"
    if node["topology"] is not None:
        where += f" topology={node['topology']}"
    prefix = f"rank {rank if rank is not None else '-'}  " if "rank" in node else ""
    return f"  {prefix}{node['node']}  {where}  {_liveness_text(node, closed)}"


def _section(title: str, nodes: Sequence[Mapping[str, Any]], closed: bool) -> list[str]:
    return [f"{title + ':':<18}{len(nodes)}", *(_node_line(n, closed) for n in nodes)]


def _openness(doc: Mapping[str, Any]) -> str:
    if not doc["closed"]:
        return "open"
    return "CLOSED (--now: running agents stop their workers)" if doc["stop_now"] else "CLOSED"


def render_status(doc: Mapping[str, Any]) -> list[str]:
    """``status``'s text: the lines of ``status_document``'s content for a person."""
    progress = "complete" if doc["complete"] else "forming"
    lines = [
        f"{'run:':<18}{doc['run_id']}  (key {doc['state_key']})",
        f"{'round:':<18}{doc['round']}, {progress}, {_openness(doc)}, "
        f"world size {doc['world_size']}",
        f"{'last change:':<18}revision {doc['mod_revision']} (write #{doc['version']} of the state "
        f"key; etcd is at revision {doc['revision']}; etcd records no wall-clock time)",
    ]
    if doc["deadline"] is not None:
        left = doc["deadline"] - time.time()
        lines.append(f"{'last call:':<18}round completes by {clock(doc['deadline'])} ({left:+.0f}s)")
    lines += _section("participants", doc["participants"], doc["closed"])
    lines += _section("wait list", doc["wait_list"], doc["closed"])
    lines += _section("redundancy list", doc["redundancy_list"], doc["closed"])
    lines.append(f"{'pending joins:':<18}{doc['pending_joins']} announcement(s) not yet folded into the state")
    if doc["alive_unlisted"]:
        lines.append(f"{'alive, unlisted:':<18}{', '.join(doc['alive_unlisted'])}")
    lines.append(f"{'quarantined:':<18}{len(doc['quarantined'])}")
    lines += [f"  {q['host']}  {q['seconds_left']}s left (until {clock(q['until'])})  {q['reason']}" for q in doc["quarantined"]]
    return lines


def cmd_status(etcd: EtcdClient, args: argparse.Namespace) -> int:
    """Print one run's status."""
    keys = read_run(etcd, args.run_id)
    state = decode_run_state(keys, args.run_id)
    doc = status_document(args.run_id, keys, state, lease_ttls(etcd, keys.alive.values()))
    emit_all([json.dumps(doc, indent=2)] if args.json else render_status(doc))
    return 0
