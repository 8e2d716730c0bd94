"""The rendezvous state shared by every node of a run, and the identity of a node."""

from __future__ import annotations

import itertools
import os
import socket
import threading
import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True, order=True)
class NodeDesc:
    """One rendezvous participant: a handler in one process on one host.

    Ordering (addr, pid, local_id) is what assigns ranks when a round completes, as in torch.
    """

    addr: str
    pid: int
    local_id: int

    @property
    def key(self) -> str:
        """A string naming this node in keys and logs, in torch's format ``addr_pid_localid``."""
        return f"{self.addr}_{self.pid}_{self.local_id}"

    def __str__(self) -> str:
        return self.key


class NodeDescGenerator:
    """Creates distinct ``NodeDesc`` values for the handlers of this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count()

    def generate(self, local_addr: str | None = None) -> NodeDesc:
        """Return a new node for this process, addressed by ``local_addr`` or the host's FQDN."""
        with self._lock:
            local_id = next(self._ids)
        return NodeDesc(local_addr or socket.getfqdn(), os.getpid(), local_id)


@dataclass
class RendezvousState:
    """The state of one run.

    Attributes:
        round: the current round; it grows by one each time a completed round empties.
        complete: whether the current round has formed its group.
        deadline: wall-clock time (UNIX seconds) at which a round that reached ``min_nodes``
            completes, or ``None`` while it has fewer.
        closed: whether the run accepts no more rounds.
        participants: the nodes of the current round with their ranks (0 until complete).
        wait_list: nodes that arrived after completion and want the next round.
        redundancy_list: nodes beyond ``max_nodes`` that wait for a free place.
        cursor: the mailbox position up to which join announcements are folded in.
        world_size: the size of the group the current round formed when it completed (0 before).
            It stays fixed while participants later leave the complete round, so every member
            reports the same world size whenever it reads the state.
    """

    round: int = 0
    complete: bool = False
    deadline: float | None = None
    closed: bool = False
    participants: dict[NodeDesc, int] = field(default_factory=dict)
    wait_list: set[NodeDesc] = field(default_factory=set)
    redundancy_list: set[NodeDesc] = field(default_factory=set)
    cursor: int = 0
    world_size: int = 0

    def copy(self) -> RendezvousState:
        """A copy whose lists can change without touching this state's."""
        return dataclasses.replace(
            self,
            participants=dict(self.participants),
            wait_list=set(self.wait_list),
            redundancy_list=set(self.redundancy_list),
        )

    def nodes(self) -> set[NodeDesc]:
        """Every node the state names, in any list."""
        return set(self.participants) | self.wait_list | self.redundancy_list

    def remove_participant(self, node: NodeDesc) -> None:
        """Drop ``node`` from the participants; a complete round that loses its last participant
        opens the next round. (An incomplete round's last call is settled by ``ops.settle``.)"""
        del self.participants[node]
        if self.complete and not self.participants:
            self.complete = False
            self.world_size = 0
            self.round += 1

    def assign_ranks(self) -> None:
        """Give the participants ranks 0..n-1 in (addr, pid, local_id) order; fix the world size."""
        for rank, member in enumerate(sorted(self.participants)):
            self.participants[member] = rank
        self.world_size = len(self.participants)

    def remove_node(self, node: NodeDesc) -> None:
        """Drop ``node`` from whichever lists hold it."""
        self.wait_list.discard(node)
        self.redundancy_list.discard(node)
        if node in self.participants:
            self.remove_participant(node)
