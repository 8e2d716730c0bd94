"""The lines ``watch`` prints: the differences between a run's consecutive states, and
``RunWatcher``, which turns the events on a run's keys into such lines."""

from __future__ import annotations

from typing import Any

from etcd3.etcdrpc import kv_pb2
from torch.distributed.elastic.rendezvous import RendezvousStateError

from rdzv_common.codec import decode_announcement, decode_state
from rdzv_common.state import NodeDesc, RendezvousState

from .output import clock
from .runs import RunSnapshot


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


def state_summary(state: RendezvousState) -> dict[str, Any]:
    """The state's fields for ``watch --json``: node ids as strings, ranks by node."""
    return {
        "round": state.round,
        "complete": state.complete,
        "closed": state.closed,
        "stop_now": state.stop_now,
        "world_size": state.world_size,
        "deadline": state.deadline,
        "participants": {node.key: (rank if state.complete else None) for node, rank in sorted(state.participants.items())},
        "wait_list": sorted(node.key for node in state.wait_list),
        "redundancy_list": sorted(node.key for node in state.redundancy_list),
    }


def _changes(old: RendezvousState, new: RendezvousState) -> list[str]:
    r = new.round
    lines = [f"round {r} started"] if new.round != old.round else []
    lines += _list_changes(r, "participants", set(old.participants), set(new.participants))
    lines += _list_changes(r, "the wait list", old.wait_list, new.wait_list)
    lines += _list_changes(r, "the redundancy list", old.redundancy_list, new.redundancy_list)
    completed = new.complete and not (old.complete and old.round == new.round)
    if new.deadline is not None and new.deadline != old.deadline:
        lines.append(f"round {r}: last call, completes by {clock(new.deadline)}")
    elif new.deadline is None and old.deadline is not None and not completed:
        lines.append(f"round {r}: last call cancelled")
    if completed:
        ranks = ", ".join(f"{n}={rank}" for n, rank in sorted(new.participants.items(), key=lambda i: i[1]))
        lines.append(f"round {r} complete: world size {new.world_size} ({ranks})")
    if new.stop_now and not old.stop_now:
        lines.append("closed with --now: the running group's agents stop their workers and exit")
    elif new.closed != old.closed:
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

    def __init__(self, keys: RunSnapshot) -> None:
        self.layout = keys.layout
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
        if self.state is not None and self.state.closed:
            # A closed run's nodes end their liveness as their agents exit.
            return [f"node {node_key} exited{self._role(node_key)}: its liveness key is gone and the run is closed"]
        return [f"node {node_key} lost liveness{self._role(node_key)}"]

    def _role(self, node_key: str) -> str:
        members = self.state.participants if self.state is not None else {}
        for node, rank in members.items():
            if node.key == node_key:
                return f" (participant, rank {rank})" if self.state.complete else " (participant)"
        return ""

    def on_event(self, event: Any) -> list[str]:
        """Lines for one watch event on the run's keys."""
        self.revision = max(self.revision, event.kv.mod_revision + 1)
        put = event.type == kv_pb2.Event.PUT
        kind, node = self.layout.classify(event.kv.key) or (None, None)
        if kind == "state":
            return self.on_state(event.kv.value if put else None)
        if kind == "alive":
            return self.on_liveness(node, put)
        if kind == "joins" and put:
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

    def on_snapshot(self, keys: RunSnapshot) -> list[str]:
        """Lines for the run having become ``keys``, read afresh after a gap in the watch."""
        self.revision = keys.revision + 1
        lines = self.on_state(keys.state) if keys.state != self.value else []
        for node_key in sorted(self.alive ^ set(keys.alive)):
            lines += self.on_liveness(node_key, node_key in keys.alive)
        return lines
