"""Rendezvous operations: pure decisions over a state, and the transitions they ask for.

An operation looks at the shared state from one node's point of view and names the next action;
the executor carries the action out and syncs. Keeping decisions pure lets the same join logic
run for the node itself and for every join announcement folded in by another node.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto
from itertools import islice

from torch.distributed.elastic.rendezvous import RendezvousGracefulExitError

from .codec import MembershipChange
from .node import NodeDesc
from .settings import RendezvousSettings
from .state import RendezvousState

logger = logging.getLogger(__name__)

# How long past its deadline a join may still take itself back out of the state.
ROLLBACK_PERIOD = 5.0

# When a round's last call ends, every participant may ask for the write that completes it; all
# asking at once, all but one of those writes would lose, and each loser would read the state
# again. So the participant k-th in the state's order asks COMPLETE_STEP * min(k, COMPLETE_RANKS)
# seconds after the deadline: the first one completes the round alone, and a dead or stalled one
# ahead delays it by one step.
COMPLETE_STEP = 0.25
COMPLETE_RANKS = 16


class Action(Enum):
    KEEP_ALIVE = auto()
    ADD_TO_PARTICIPANTS = auto()
    ADD_TO_WAIT_LIST = auto()
    ADD_TO_REDUNDANCY_LIST = auto()
    REMOVE_FROM_PARTICIPANTS = auto()
    REMOVE_FROM_WAIT_LIST = auto()
    REMOVE_FROM_REDUNDANCY_LIST = auto()
    # Leave a complete round and join the next, announced as one record (``rejoin_op``).
    REJOIN = auto()
    MARK_RENDEZVOUS_COMPLETE = auto()
    MARK_RENDEZVOUS_CLOSED = auto()
    SYNC = auto()
    ERROR_CLOSED = auto()
    ERROR_TIMEOUT = auto()
    FINISH = auto()


# Joins that a mailbox can carry: they only add a node, so they commute and can be batched.
ADD_ACTIONS = frozenset(
    {Action.ADD_TO_PARTICIPANTS, Action.ADD_TO_WAIT_LIST, Action.ADD_TO_REDUNDANCY_LIST}
)
# Actions a mailbox can carry: joins, and leaving a round, which commutes with other leaves.
ANNOUNCED_ACTIONS = ADD_ACTIONS | {Action.REMOVE_FROM_PARTICIPANTS, Action.REJOIN}


@dataclass
class Context:
    """One node's view: the state it last synced, its settings, the time, and whether a heartbeat
    is due. ``now`` is monotonic time (deadlines of this process), ``wall`` is UNIX time (the
    state's last-call deadline, shared between machines)."""

    node: NodeDesc
    state: RendezvousState
    settings: RendezvousSettings
    now: float
    wall: float
    keep_alive_due: bool = False


Op = Callable[[Context, float], Action]


def exit_op(ctx: Context, deadline: float) -> Action:
    """Leave the previous round, if this node is one of its participants."""
    if ctx.node in ctx.state.participants:
        return Action.ERROR_TIMEOUT if ctx.now > deadline else Action.REMOVE_FROM_PARTICIPANTS
    return Action.FINISH


def rejoin_op(round_: int) -> Op:
    """Leave the complete round ``round_``, if this node is one of its participants, and join the
    next one, in one announcement (``Action.REJOIN``); ``join_op`` then goes on from wherever the
    fold placed the node.

    ``exit_op`` followed by ``join_op`` does the same in two announcements, each waiting for its
    own fold: in a re-rendezvous of N nodes that is 2N records and twice the writes, and each
    write wakes every node. The round is named because the fold may place this node in the
    participants of round ``round_ + 1``, which may complete before this node looks again: it must
    not leave that group. A participant of an incomplete round stays in it (``exit_op`` would take
    its join back only for ``join_op`` to make it again).
    """

    def op(ctx: Context, deadline: float) -> Action:
        state = ctx.state
        if state.round != round_ or not state.complete or ctx.node not in state.participants:
            return Action.FINISH
        return Action.ERROR_TIMEOUT if ctx.now > deadline else Action.REJOIN

    return op


def _placement(state: RendezvousState, node: NodeDesc, settings: RendezvousSettings) -> Action | None:
    """Where a node that is in no list belongs now, or ``None`` if it needs no move. A complete
    group below ``max_world`` has room for more whole units: a node waits for the next round; a
    full one makes it redundant.

    An open round that already has ``max_world`` participants is full too: only a fold, which folds
    several joins into one write before ``settle`` completes the round, can see one, and the node
    then goes where it would have gone had the round been completed at the join that filled it (a
    fold once put every pending join into the round, which then completed above ``max_nodes``).
    """
    has_room = len(state.participants) < settings.max_world
    if not state.complete and has_room:
        return Action.ADD_TO_PARTICIPANTS
    if has_room:
        return None if node in state.wait_list else Action.ADD_TO_WAIT_LIST
    if node in state.redundancy_list or node in state.wait_list:
        return None
    return Action.ADD_TO_REDUNDANCY_LIST


def join_op(ctx: Context, deadline: float) -> Action:
    """Join the current round, or wait for the next one; torch's join semantics.

    Raises:
        RendezvousGracefulExitError: the run closed while this node was redundant.
    """
    state, node, settings = ctx.state, ctx.node, ctx.settings
    if state.closed:
        if node in state.redundancy_list:
            raise RendezvousGracefulExitError(
                f"The rendezvous '{settings.run_id}' is closed, terminating pending rendezvous."
            )
        return Action.ERROR_CLOSED

    if node in state.redundancy_list:
        # Redundant nodes ignore the join timeout: they may wait for a free place indefinitely.
        if len(state.participants) < settings.max_world:
            return Action.REMOVE_FROM_REDUNDANCY_LIST
        return Action.KEEP_ALIVE if ctx.keep_alive_due else Action.SYNC

    is_participant = node in state.participants
    if state.complete and is_participant:
        return Action.FINISH

    if ctx.now > deadline:
        if ctx.now <= deadline + ROLLBACK_PERIOD:
            if is_participant:
                return Action.REMOVE_FROM_PARTICIPANTS
            if node in state.wait_list:
                return Action.REMOVE_FROM_WAIT_LIST
        return Action.ERROR_TIMEOUT

    if is_participant:
        due = completion_due(state, node)
        if settings.group_size(len(state.participants)) >= settings.min_nodes and due is not None and due < ctx.wall:
            return Action.MARK_RENDEZVOUS_COMPLETE
    else:
        placement = _placement(state, node, settings)
        if placement is not None:
            return placement
    return Action.KEEP_ALIVE if ctx.keep_alive_due else Action.SYNC


def waits_for_next_round(state: RendezvousState, node: NodeDesc) -> bool:
    """Whether ``node`` waits in the wait list of a complete round of an open run, where only a new
    round, the run closing or the node's own removal can change what ``join_op`` decides for it
    (before its deadline): members leaving the round one by one do not."""
    return state.complete and not state.closed and node in state.wait_list


def waits_for_members(state: RendezvousState, node: NodeDesc) -> bool:
    """Whether ``node`` is a participant of an open round that has too few members for a last call
    (``deadline`` is unset), where only the round completing, a last call starting, the run
    closing, a new round or the node's own removal can change what ``join_op`` decides for it
    (before its deadline): the joins folded into the round one write after another do not. A
    large join takes tens of writes, and a full read of each by every placed node would cost N
    reads of the whole state per write."""
    return not state.complete and not state.closed and state.deadline is None and node in state.participants


def completion_due(state: RendezvousState, node: NodeDesc) -> float | None:
    """The UNIX time after which ``node``, a participant, asks for the write that completes the
    round (see ``COMPLETE_STEP``); ``None`` while no last call runs. Every node reads the same
    order from the same stored state, so no two share a place below ``COMPLETE_RANKS``."""
    if state.deadline is None:
        return None
    place = COMPLETE_RANKS
    for index, participant in enumerate(islice(state.participants, COMPLETE_RANKS)):
        if participant == node:
            place = index
            break
    return state.deadline + COMPLETE_STEP * place


def close_op(ctx: Context, deadline: float) -> Action:
    """Mark the run closed."""
    if ctx.state.closed:
        return Action.FINISH
    return Action.ERROR_TIMEOUT if ctx.now > deadline else Action.MARK_RENDEZVOUS_CLOSED


def apply(action: Action, state: RendezvousState, node: NodeDesc) -> None:
    """Carry out a state-changing ``action`` for ``node`` on ``state`` in place.

    Completing a round is not done here but by ``settle``, which every write runs last:
    ``MARK_RENDEZVOUS_COMPLETE`` only asks for that write.
    """
    if action is Action.ADD_TO_PARTICIPANTS:
        state.wait_list.discard(node)
        state.redundancy_list.discard(node)
        state.participants[node] = 0
    elif action is Action.ADD_TO_WAIT_LIST:
        state.redundancy_list.discard(node)
        state.wait_list.add(node)
    elif action is Action.ADD_TO_REDUNDANCY_LIST:
        state.redundancy_list.add(node)
    elif action is Action.REMOVE_FROM_PARTICIPANTS:
        state.remove_participant(node)
    elif action is Action.REMOVE_FROM_WAIT_LIST:
        state.wait_list.discard(node)
    elif action is Action.REMOVE_FROM_REDUNDANCY_LIST:
        state.redundancy_list.discard(node)
    elif action is Action.MARK_RENDEZVOUS_CLOSED:
        state.closed = True
    elif action is not Action.MARK_RENDEZVOUS_COMPLETE:
        raise ValueError(f"{action} does not change the state")


def settle(state: RendezvousState, settings: RendezvousSettings, wall: float) -> None:
    """The completion rule, applied to every state just before it is written (``wall``: UNIX time).

    Participants count in whole ``node_unit``s (``settings.group_size``). An open round completes
    once they fill ``max_world``, or with ``min_nodes`` or more once its last call
    (``last_call_timeout`` from reaching ``min_nodes``) is over; ranks are assigned then, and
    participants beyond the group's size move to the wait list. Applying it last, after folding
    announcements and dropping dead nodes, means a round never completes below ``min_nodes``, nor
    below ``max_world`` before its last call, whatever the write removed. A round that was
    complete already keeps its group. An open round first takes in the waiting nodes it has room
    for (``_take_in_waiting``).
    """
    if state.complete or state.closed:
        return
    _take_in_waiting(state, settings)
    size = settings.group_size(len(state.participants))
    if size < settings.min_nodes:
        state.deadline = None
    elif size >= settings.max_world or (state.deadline is not None and state.deadline <= wall):
        state.complete = True
        state.deadline = None
        state.assign_ranks(size, settings.rank_order, settings.stable_ranks)
    elif state.deadline is None:
        state.deadline = wall + settings.last_call_timeout


def _take_in_waiting(state: RendezvousState, settings: RendezvousSettings) -> None:
    """Move waiting nodes into an open round while it has room, in node order.

    A node waits only for the next round, and would add itself as soon as it saw that round
    open; doing it in the write that opens the round spares every waiting node an announcement
    and a write (a re-rendezvous of N nodes otherwise costs each node a third announcement)."""
    room = settings.max_world - len(state.participants)
    if room <= 0 or not state.wait_list:
        return
    for node in sorted(state.wait_list)[:room]:
        state.wait_list.discard(node)
        state.participants[node] = 0


def _leave_applies(state: RendezvousState, change: MembershipChange) -> bool:
    # A node leaves the round it saw, as it saw it: a take-back of a join to an incomplete round
    # must not remove a member from the group that round formed since. (A rejoin leaves only a
    # round it saw complete.)
    return (
        state.round == change.round
        and state.complete == change.complete
        and change.node in state.participants
    )


def _join_action(state: RendezvousState, change: MembershipChange, settings: RendezvousSettings) -> Action | None:
    """What the join part of ``change`` (a join or a rejoin) does to ``state`` now: ``None``
    for a leave, a join to a closed run, or a node already placed."""
    if change.kind == "leave" or state.closed or change.node in state.participants:
        return None
    return _placement(state, change.node, settings)


def fold(state: RendezvousState, change: MembershipChange, settings: RendezvousSettings) -> bool:
    """Apply ``change`` as its poster's own actions would; return whether it changed ``state``.

    A rejoin is its leave, then its join. Repeated joins of placed nodes, joins to a closed run,
    and stale leaves change nothing.
    """
    node = change.node
    actions = []
    if change.kind in ("leave", "rejoin") and _leave_applies(state, change):
        apply(Action.REMOVE_FROM_PARTICIPANTS, state, node)
        actions.append(Action.REMOVE_FROM_PARTICIPANTS)
    action = _join_action(state, change, settings)
    if action is not None:
        apply(action, state, node)
        if change.topology is not None:
            state.topology[node] = change.topology
        actions.append(action)
    if actions:
        logger.debug(
            "Folded the announcement of %s into round %d of the rendezvous '%s': %s",
            node,
            state.round,
            settings.run_id,
            ", ".join(action.name for action in actions),
        )
    return bool(actions)


def would_fold(state: RendezvousState, change: MembershipChange, settings: RendezvousSettings) -> bool:
    """Whether ``fold`` would change ``state`` (without changing it)."""
    if change.kind in ("leave", "rejoin") and _leave_applies(state, change):
        return True
    return _join_action(state, change, settings) is not None


def nodes_waiting(state: RendezvousState, settings: RendezvousSettings) -> int:
    """How many waiting nodes a new round would add to the group (``num_nodes_waiting``), counted
    against the group's live members, not the world size it formed with: a group that lost a
    member to a lapse or a restart is short, and a waiting node that would fill the place must
    restart it (torchrun's monitor restarts its workers only on a positive answer; a spare never
    replaced a dead node otherwise). Only waiting nodes that fill whole ``node_unit``s up to
    ``max_world`` count: a leftover too few for a unit does not restart a group it cannot grow."""
    if not state.complete:
        return len(state.wait_list)
    live = len(state.participants)
    return max(0, settings.group_size(live + len(state.wait_list)) - live)
