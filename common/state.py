"""The rendezvous state shared by every node of a run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from . import ranks
from .node import NodeDesc


@dataclass
class RendezvousState:
    """The state of one run.

    Attributes:
        round: the current round; it grows by one each time a completed round empties.
        complete: whether the current round has formed its group.
        deadline: wall-clock time (UNIX seconds) at which a round that reached ``min_nodes``
            completes, or ``None`` while it has fewer.
        closed: whether the run accepts no more rounds.
        stop_now: set with ``closed`` by an operator (``etcd-rdzv close --now``): the running group
            is to stop its workers now, not when they finish (``num_nodes_waiting``).
        participants: the nodes of the current round with their ranks (0 until complete).
        wait_list: nodes that arrived after completion and want the next round.
        redundancy_list: nodes beyond ``max_nodes`` that wait for a free place.
        cursor: the mailbox position up to which join announcements are folded in.
        world_size: the size of the group the current round formed when it completed (0 before).
            It stays fixed while participants later leave the complete round, so every member
            reports the same world size whenever it reads the state.
        topology: the topology label each labelled node announced with its join. Only labels of
            nodes the state names are stored; one left behind by a removal is dropped on encoding.
        previous_ranks: the ranks that nodes held in the last complete round they left (or were
            dropped from); kept across the round change for ``stable_ranks``, and replaced by
            the next completion.
    """

    round: int = 0
    complete: bool = False
    deadline: float | None = None
    closed: bool = False
    stop_now: bool = False
    participants: dict[NodeDesc, int] = field(default_factory=dict)
    wait_list: set[NodeDesc] = field(default_factory=set)
    redundancy_list: set[NodeDesc] = field(default_factory=set)
    cursor: int = 0
    world_size: int = 0
    topology: dict[NodeDesc, str] = field(default_factory=dict)
    previous_ranks: dict[NodeDesc, int] = field(default_factory=dict)

    def copy(self) -> RendezvousState:
        """A copy whose lists can change without touching this state's."""
        return dataclasses.replace(
            self,
            participants=dict(self.participants),
            wait_list=set(self.wait_list),
            redundancy_list=set(self.redundancy_list),
            topology=dict(self.topology),
            previous_ranks=dict(self.previous_ranks),
        )

    def nodes(self) -> set[NodeDesc]:
        """Every node the state names, in any list."""
        return set(self.participants) | self.wait_list | self.redundancy_list

    def remove_participant(self, node: NodeDesc) -> None:
        """Drop ``node`` from the participants; a complete round that loses its last participant
        opens the next round. (An incomplete round's last call is settled by ``ops.settle``.)
        A node leaving a complete round leaves its rank behind for the next round's assignment."""
        rank = self.participants.pop(node)
        if self.complete:
            self.previous_ranks[node] = rank
        if self.complete and not self.participants:
            self.complete = False
            self.world_size = 0
            self.round += 1

    def assign_ranks(self, world_size: int, order: str, stable: bool) -> None:
        """Form the group of ``world_size`` (at most the number of participants): give its members
        ranks 0..world_size-1 and move the participants left over to the wait list.

        The participants are put in ``order`` (``ranks.RANK_ORDERS``). With ``stable``, a member of
        the previous group keeps its rank whenever that rank is below ``world_size``, and so is
        admitted first; the others fill the free ranks in order. Leftovers are the last in order.
        """
        ordered = ranks.order_nodes(self.participants, order, self.topology)
        kept = {}
        if stable:
            kept = {n: self.previous_ranks[n] for n in ordered if self.previous_ranks.get(n, world_size) < world_size}
        newcomers = [n for n in ordered if n not in kept]
        free = sorted(set(range(world_size)) - set(kept.values()))
        assigned = {**kept, **dict(zip(newcomers, free))}
        for node in newcomers[len(free) :]:
            del self.participants[node]
            self.wait_list.add(node)
        self.participants.update(assigned)
        self.world_size = world_size
        self.previous_ranks = {}

    def remove_node(self, node: NodeDesc) -> None:
        """Drop ``node`` from whichever lists hold it."""
        self.wait_list.discard(node)
        self.redundancy_list.discard(node)
        if node in self.participants:
            self.remove_participant(node)
