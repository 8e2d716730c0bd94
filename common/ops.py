"""Rendezvous operations: pure decisions over a state, and the transitions they ask for.

An operation looks at the shared state from one node's point of view and names the next action;
the executor carries the action out and syncs. Keeping decisions pure lets the same join logic
run for the node itself and for every join announcement folded in by another node.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto

from torch.distributed.elastic.rendezvous import RendezvousGracefulExitError

from .codec import Announcement
from .settings import RendezvousSettings
from .state import NodeDesc, RendezvousState

logger = logging.getLogger(__name__)

# How long past its deadline a join may still take itself back out of the state.
ROLLBACK_PERIOD = 5.0


class Action(Enum):
    KEEP_ALIVE = auto()
    ADD_TO_PARTICIPANTS = auto()
    ADD_TO_WAIT_LIST = auto()
    ADD_TO_REDUNDANCY_LIST = auto()
    REMOVE_FROM_PARTICIPANTS = auto()
    REMOVE_FROM_WAIT_LIST = auto()
    REMOVE_FROM_REDUNDANCY_LIST = auto()
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
ANNOUNCED_ACTIONS = ADD_ACTIONS | {Action.REMOVE_FROM_PARTICIPANTS}


@dataclass
class Context:
    """One node's view: the state it last synced, its settings, and whether a heartbeat is due."""

    node: NodeDesc
    state: RendezvousState
    settings: RendezvousSettings
    keep_alive_due: bool = False


Op = Callable[[Context, float], Action]


def exit_op(ctx: Context, deadline: float) -> Action:
    """Leave the previous round, if this node is one of its participants."""
    if ctx.node in ctx.state.participants:
        return Action.ERROR_TIMEOUT if time.monotonic() > deadline else Action.REMOVE_FROM_PARTICIPANTS
    return Action.FINISH


def _placement(state: RendezvousState, node: NodeDesc, settings: RendezvousSettings) -> Action | None:
    """Where a node that is in no list belongs now, or ``None`` if it needs no move."""
    if not state.complete:
        return Action.ADD_TO_PARTICIPANTS
    if len(state.participants) < settings.max_nodes:
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
        if len(state.participants) < settings.max_nodes:
            return Action.REMOVE_FROM_REDUNDANCY_LIST
        return Action.KEEP_ALIVE if ctx.keep_alive_due else Action.SYNC

    is_participant = node in state.participants
    if state.complete and is_participant:
        return Action.FINISH

    now = time.monotonic()
    if now > deadline:
        if now <= deadline + ROLLBACK_PERIOD:
            if is_participant:
                return Action.REMOVE_FROM_PARTICIPANTS
            if node in state.wait_list:
                return Action.REMOVE_FROM_WAIT_LIST
        return Action.ERROR_TIMEOUT

    if is_participant:
        if (
            settings.min_nodes <= len(state.participants) <= settings.max_nodes
            and state.deadline is not None
            and state.deadline < time.time()
        ):
            return Action.MARK_RENDEZVOUS_COMPLETE
    else:
        placement = _placement(state, node, settings)
        if placement is not None:
            return placement
    return Action.KEEP_ALIVE if ctx.keep_alive_due else Action.SYNC


def close_op(ctx: Context, deadline: float) -> Action:
    """Mark the run closed."""
    if ctx.state.closed:
        return Action.FINISH
    return Action.ERROR_TIMEOUT if time.monotonic() > deadline else Action.MARK_RENDEZVOUS_CLOSED


def keep_alive_op(ctx: Context, deadline: float) -> Action:
    """Send one heartbeat if one is due."""
    if ctx.keep_alive_due:
        return Action.ERROR_TIMEOUT if time.monotonic() > deadline else Action.KEEP_ALIVE
    return Action.FINISH


def apply(action: Action, state: RendezvousState, node: NodeDesc, settings: RendezvousSettings) -> None:
    """Carry out a state-changing ``action`` for ``node`` on ``state`` in place."""
    if action is Action.ADD_TO_PARTICIPANTS:
        state.wait_list.discard(node)
        state.redundancy_list.discard(node)
        state.participants[node] = 0
        if len(state.participants) == settings.min_nodes:
            state.deadline = time.time() + settings.last_call_timeout
        if len(state.participants) == settings.max_nodes:
            apply(Action.MARK_RENDEZVOUS_COMPLETE, state, node, settings)
    elif action is Action.ADD_TO_WAIT_LIST:
        state.redundancy_list.discard(node)
        state.wait_list.add(node)
    elif action is Action.ADD_TO_REDUNDANCY_LIST:
        state.redundancy_list.add(node)
    elif action is Action.REMOVE_FROM_PARTICIPANTS:
        state.remove_participant(node, settings.min_nodes)
    elif action is Action.REMOVE_FROM_WAIT_LIST:
        state.wait_list.discard(node)
    elif action is Action.REMOVE_FROM_REDUNDANCY_LIST:
        state.redundancy_list.discard(node)
    elif action is Action.MARK_RENDEZVOUS_COMPLETE:
        state.complete = True
        state.deadline = None
        state.assign_ranks()
    elif action is Action.MARK_RENDEZVOUS_CLOSED:
        state.closed = True
    else:
        raise ValueError(f"{action} does not change the state")


def fold_leave(state: RendezvousState, node: NodeDesc, round: int, settings: RendezvousSettings) -> bool:
    """Apply ``node``'s announced exit from ``round``; a stale or repeated one changes nothing."""
    if state.round != round or node not in state.participants:
        return False
    apply(Action.REMOVE_FROM_PARTICIPANTS, state, node, settings)
    logger.debug("Folded the exit of %s from round %d of the rendezvous '%s'.", node, round, settings.run_id)
    return True


def fold_join(state: RendezvousState, node: NodeDesc, settings: RendezvousSettings) -> Action | None:
    """Apply a join announced by ``node`` as that node's own join would; return what was done.

    Announcements of nodes already placed, or of a closed run, change nothing.
    """
    if state.closed or node in state.participants:
        return None
    placement = _placement(state, node, settings)
    if placement is not None:
        apply(placement, state, node, settings)
        logger.debug(
            "Folded the join of %s into round %d of the rendezvous '%s': %s",
            node,
            state.round,
            settings.run_id,
            placement.name,
        )
    return placement


def would_fold(state: RendezvousState, announcement: Announcement, settings: RendezvousSettings) -> bool:
    """Whether folding ``announcement`` into ``state`` would change it (``fold_join``/``fold_leave``)."""
    node = announcement.node
    if announcement.kind == "join":
        return not state.closed and node not in state.participants and _placement(state, node, settings) is not None
    return state.round == announcement.round and node in state.participants
