"""The wire format of ``RendezvousState``: versioned JSON, validated on the way in. Never pickle.

Format (version 3), UTF-8 JSON object::

    {"format": "torch-rdzv-state", "version": 3,
     "round": 3, "complete": true, "closed": false, "deadline": null, "cursor": 17,
     "world_size": 2,
     "participants": [{"addr": "10.0.0.1", "pid": 41, "local_id": 0, "rank": 0,
                       "topology": "zone-a/rack-07"}, ...],
     "wait_list": [{"addr": ..., "pid": ..., "local_id": ...}, ...],
     "redundancy_list": [...],
     "previous_ranks": [{"addr": ..., "pid": ..., "local_id": ..., "rank": 1}, ...]}

A node entry carries ``topology`` only if the node announced a label. A closed run whose running
group an operator asked to stop at once (``etcd-rdzv close --now``) carries ``"stop_now": true``;
the field is absent otherwise, and releases that do not know it ignore it. Version rules: a release
writes one version and reads every version it can read without losing a field; a version 1
state (before topology labels and ``previous_ranks``) reads as one with neither, and is
rewritten as version 3 by the next write. A version it does not know is refused, never guessed:
version 1 releases refuse version 2, which is why every node of a job must run the same release.
Version 3 stores what version 2 does; it marks a run whose mailbox may hold ``rejoin`` records,
which version 2 releases do not know, so that such a release stops at the state with the advice
to upgrade instead of at the first record it cannot read.

Announcements posted to a backend's mailbox are ``{"join": NODE}``,
``{"leave": NODE, "round": N, "complete": BOOL}`` and ``{"rejoin": NODE, "round": N}``, NODE being
``{"addr", "pid", "local_id"}`` (a join's and a rejoin's NODE also carry ``topology`` if the node
has a label). A rejoin is a leave of the complete round N and a join of the next, in one record:
a re-rendezvous then costs each node one announcement, not two.
A leave names the round it leaves and whether that round was complete when the node decided to
leave: a node that leaves a complete round (its workers stopped) and one that takes back its join
of an incomplete round (its join timed out) want different things, and a leave folded late must
not do the one for the other.
"""

from __future__ import annotations

import collections
import json
import math
import threading
from dataclasses import dataclass
from typing import Any

from torch.distributed.elastic.rendezvous import RendezvousStateError

from .backend import QuarantineEntry
from .node import NodeDesc
from .ranks import check_topology
from .state import RendezvousState

FORMAT = "torch-rdzv-state"
VERSION = 3
# The versions this release reads (see the module's version rules).
READABLE_VERSIONS = (1, 2, 3)
# A state for tens of thousands of nodes stays far below this; a larger value is not ours.
MAX_STATE_BYTES = 16 * 1024 * 1024


def _node_to_json(node: NodeDesc, topology: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"addr": node.addr, "pid": node.pid, "local_id": node.local_id}
    if topology is not None:
        doc["topology"] = topology
    return doc


def encode_state(state: RendezvousState) -> bytes:
    """Serialize ``state``; participants and lists are sorted so equal states encode equally."""
    labels = state.topology
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "round": state.round,
        "complete": state.complete,
        "closed": state.closed,
        "deadline": state.deadline,
        "cursor": state.cursor,
        "world_size": state.world_size,
        "participants": [
            {**_node_to_json(n, labels.get(n)), "rank": r} for n, r in sorted(state.participants.items())
        ],
        "wait_list": [_node_to_json(n, labels.get(n)) for n in sorted(state.wait_list)],
        "redundancy_list": [_node_to_json(n, labels.get(n)) for n in sorted(state.redundancy_list)],
        "previous_ranks": [{**_node_to_json(n), "rank": r} for n, r in sorted(state.previous_ranks.items())],
    }
    if state.stop_now:
        doc["stop_now"] = True
    return json.dumps(doc, separators=(",", ":")).encode()


def _fail(where: str, problem: str) -> RendezvousStateError:
    return RendezvousStateError(
        f"The rendezvous state at {where} is corrupt: {problem}. "
        "Reset the run (for etcd: `etcd-rdzv reset RUN_ID --yes`) or use a new run id."
    )


def _field(doc: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in doc:
        raise _fail(where, f"field '{name}' is missing")
    value = doc[name]
    # bool is an int in Python; a flag must not pass as a number nor a number as a flag.
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise _fail(where, f"field '{name}' has {type(value).__name__} {value!r}")
    return value


def _node(doc: Any, where: str) -> NodeDesc:
    if not isinstance(doc, dict):
        raise _fail(where, f"a node entry is {type(doc).__name__}, not an object")
    addr = _field(doc, "addr", str, where)
    pid = _field(doc, "pid", int, where)
    local_id = _field(doc, "local_id", int, where)
    if not addr or pid < 0 or local_id < 0:
        raise _fail(where, f"node entry {doc!r} is out of range")
    return NodeDesc(addr, pid, local_id)


def _topology(entry: dict[str, Any], where: str) -> str | None:
    if "topology" not in entry:
        return None
    try:
        return check_topology(_field(entry, "topology", str, where))
    except ValueError as exc:
        raise _fail(where, str(exc)) from None


def _node_list(doc: dict[str, Any], name: str, where: str, default: list | None = None) -> list[tuple[NodeDesc, dict]]:
    entries = default if default is not None and name not in doc else _field(doc, name, list, where)
    nodes = [(_node(e, where), e) for e in entries]
    if len({n for n, _ in nodes}) != len(nodes):
        raise _fail(where, f"'{name}' names a node twice")
    return nodes


def _load_json(data: bytes, where: str) -> Any:
    if not isinstance(data, (bytes, bytearray)):
        raise _fail(where, f"value is {type(data).__name__}, not bytes")
    if len(data) > MAX_STATE_BYTES:
        raise _fail(where, f"value is {len(data)} bytes, over the {MAX_STATE_BYTES} byte limit")
    try:
        return json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail(where, f"value is not UTF-8 JSON ({exc})") from None
    except RecursionError:
        # Python's parser recurses per level: no value of ours nests more than a few.
        raise _fail(where, "value is JSON nested too deeply to be a state or a record") from None


def decode_state(data: bytes, where: str = "the backend") -> RendezvousState:
    """Parse and validate a state written by ``encode_state``; the caller owns the result.

    The nodes of one process that read the same stored value share one parse of it.

    Raises:
        RendezvousStateError: naming ``where`` and what is wrong, for any value that is not a
            well-formed state of a version this release reads.
    """
    return _cached(_decode_state, data, where).copy()


def peek_state(data: bytes, where: str = "the backend") -> RendezvousState:
    """``decode_state`` without the copy: the parse that the nodes of the process share, to look
    at and never to change (a node waiting for one field of a state skips a copy of the rest).

    Raises:
        RendezvousStateError: as ``decode_state``.
    """
    return _cached(_decode_state, data, where)


class _Parses:
    """The parses of the last ``size`` distinct values, shared by the nodes of a process. A miss is
    parsed by one thread while the others that want the same value wait for it: when a write
    lands, hundreds of nodes of a process read the new state at once, and one parse serves them
    all where a parse each would take much of the process's CPU."""

    def __init__(self, parse: Any, size: int) -> None:
        self.parse = parse
        self._size = size
        self._lock = threading.Lock()
        self._parsed: collections.OrderedDict[tuple[bytes, str], Any] = collections.OrderedDict()

    def __call__(self, data: bytes, where: str) -> Any:
        key = (data, where)
        parsed = self._parsed.get(key)
        if parsed is not None:
            return parsed
        with self._lock:
            parsed = self._parsed.get(key)
            if parsed is None:
                parsed = self.parse(data, where)
                self._parsed[key] = parsed
                if len(self._parsed) > self._size:
                    self._parsed.popitem(last=False)
        return parsed


def _cached(parses: _Parses, data: bytes, where: str) -> Any:
    """``parses(data, where)`` when ``data`` is bytes; anything else is refused by the parser
    itself."""
    if isinstance(data, bytearray):
        data = bytes(data)
    return parses(data, where) if isinstance(data, bytes) else parses.parse(data, where)


def _parse_state(data: bytes, where: str) -> RendezvousState:
    doc = _load_json(data, where)
    if not isinstance(doc, dict):
        raise _fail(where, f"value is a JSON {type(doc).__name__}, not an object")
    if doc.get("format") != FORMAT:
        raise _fail(where, f"format is {doc.get('format')!r}, expected {FORMAT!r}")
    version = doc.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:  # noqa: E721 - True must not pass as 1
        raise _fail(
            where,
            f"format version {version!r} is not supported (this library reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}); upgrade every node to the same release",
        )
    state = RendezvousState(
        round=_field(doc, "round", int, where),
        complete=_field(doc, "complete", bool, where),
        closed=_field(doc, "closed", bool, where),
        cursor=_field(doc, "cursor", int, where),
        world_size=_field(doc, "world_size", int, where),
    )
    if "stop_now" in doc:
        state.stop_now = _field(doc, "stop_now", bool, where)
    if "deadline" not in doc:
        raise _fail(where, "field 'deadline' is missing")
    deadline = doc["deadline"]
    if deadline is not None:
        deadline = _field(doc, "deadline", (int, float), where)
        if not math.isfinite(deadline):
            raise _fail(where, f"deadline {deadline!r} is not a finite time")
        state.deadline = float(deadline)
    if state.round < 0 or state.cursor < 0 or state.world_size < 0:
        raise _fail(where, "round, cursor and world_size must not be negative")
    labelled = []
    for node, entry in _node_list(doc, "participants", where):
        state.participants[node] = _field(entry, "rank", int, where)
        labelled.append((node, entry))
    ranks = list(state.participants.values())
    if state.complete and (
        len(set(ranks)) != len(ranks) or not all(0 <= r < state.world_size for r in ranks)
    ):
        raise _fail(where, f"the ranks {sorted(ranks)} do not fit a complete group of {state.world_size}")
    if not state.complete and (state.world_size != 0 or any(ranks)):
        raise _fail(where, "an incomplete round carries ranks or a world size")
    waiting = _node_list(doc, "wait_list", where)
    redundant = _node_list(doc, "redundancy_list", where)
    state.wait_list = {n for n, _ in waiting}
    state.redundancy_list = {n for n, _ in redundant}
    lists = [set(state.participants), state.wait_list, state.redundancy_list]
    if sum(map(len, lists)) != len(set().union(*lists)):
        raise _fail(where, "a node is in more than one of participants, wait_list, redundancy_list")
    for node, entry in labelled + waiting + redundant:
        label = _topology(entry, where)
        if label is not None:
            state.topology[node] = label
    # Version 1 has no previous ranks: it reads as a run whose ranks start afresh.
    for node, entry in _node_list(doc, "previous_ranks", where, default=[] if version == 1 else None):
        state.previous_ranks[node] = _field(entry, "rank", int, where)
    previous = list(state.previous_ranks.values())
    if len(set(previous)) != len(previous) or any(r < 0 for r in previous):
        raise _fail(where, f"the previous ranks {sorted(previous)} are not distinct ranks")
    return state


@dataclass(frozen=True)
class MembershipChange:
    """What a mailbox record announces, decoded: ``node`` joins, or leaves round ``round``, which
    was ``complete`` or not when it decided to, or (``rejoin``) leaves the complete round
    ``round`` and joins the next."""

    kind: str
    node: NodeDesc
    round: int | None = None
    complete: bool | None = None
    topology: str | None = None


def encode_join(node: NodeDesc, topology: str | None = None) -> bytes:
    """Serialize the announcement that ``node``, labelled ``topology`` if given, wants to join."""
    return json.dumps({"join": _node_to_json(node, topology)}, separators=(",", ":")).encode()


def encode_leave(node: NodeDesc, round: int, complete: bool) -> bytes:
    """Serialize the announcement that ``node`` leaves the participants of ``round``, which is
    ``complete`` or not as the node saw it."""
    doc = {"leave": _node_to_json(node), "round": round, "complete": complete}
    return json.dumps(doc, separators=(",", ":")).encode()


def encode_rejoin(node: NodeDesc, round: int, topology: str | None = None) -> bytes:
    """Serialize the announcement that ``node`` leaves the participants of the complete round
    ``round`` and joins the next round."""
    doc = {"rejoin": _node_to_json(node, topology), "round": round}
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_announcement(data: bytes, where: str = "the mailbox") -> MembershipChange:
    """Parse a mailbox record; raises ``RendezvousStateError`` if it is malformed.

    Records are parsed once per process, however many of its nodes read them.
    """
    return _cached(_decode_announcement, data, where)


def _round_of(doc: dict[str, Any], kind: str, where: str) -> int:
    round_ = _field(doc, "round", int, where)
    if round_ < 0:
        raise _fail(where, f"a {kind} announcement names round {round_}")
    return round_


def _parse_announcement(data: bytes, where: str) -> MembershipChange:
    doc = _load_json(data, where)
    if isinstance(doc, dict) and "join" in doc:
        node = _node(doc["join"], where)
        return MembershipChange("join", node, topology=_topology(doc["join"], where))
    if isinstance(doc, dict) and "leave" in doc:
        round_ = _round_of(doc, "leave", where)
        complete = _field(doc, "complete", bool, where)
        return MembershipChange("leave", _node(doc["leave"], where), round_, complete)
    if isinstance(doc, dict) and "rejoin" in doc:
        round_ = _round_of(doc, "rejoin", where)
        node = _node(doc["rejoin"], where)
        return MembershipChange("rejoin", node, round_, True, _topology(doc["rejoin"], where))
    raise _fail(
        where,
        "a mailbox record is neither a 'join', a 'leave' nor a 'rejoin' announcement (a newer "
        "release may have posted it: every node of a job must run the same release)",
    )


def encode_quarantine_entry(entry: QuarantineEntry) -> bytes:
    """Serialize a quarantine entry: ``{"host", "until", "reason", "strikes"}``."""
    doc = {"host": entry.host, "until": entry.until, "reason": entry.reason, "strikes": entry.strikes}
    return json.dumps(doc).encode()


def decode_quarantine_entry(data: bytes, where: str) -> QuarantineEntry:
    """Parse a quarantine entry written by ``encode_quarantine_entry``.

    Raises:
        RendezvousStateError: naming ``where`` (the entry's key), for a value that is no entry.
    """
    try:
        doc = json.loads(bytes(data).decode("utf-8"))
        entry = QuarantineEntry(str(doc["host"]), float(doc["until"]), str(doc["reason"]), int(doc["strikes"]))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as exc:
        problem = "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise RendezvousStateError(
            f"The quarantine entry '{where}' holds {bytes(data)[:200]!r}, which is not an entry ({problem}); "
            "remove it (for etcd: `etcd-rdzv quarantine RUN_ID --remove HOST`) or reset the run."
        ) from None
    if not math.isfinite(entry.until):
        raise RendezvousStateError(f"The quarantine entry '{where}' ends at {entry.until!r}, which is not a time.")
    return entry


_decode_state = _Parses(_parse_state, size=8)
_decode_announcement = _Parses(_parse_announcement, size=8192)
