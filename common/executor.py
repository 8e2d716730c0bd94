"""Runs a rendezvous operation to completion against the shared state."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from torch.distributed.elastic.events import NodeState
from torch.distributed.elastic.rendezvous import RendezvousClosedError, RendezvousTimeoutError

from .backend import RendezvousBackend
from .codec import decode_announcement, encode_join, encode_leave
from .events import record_event
from .holder import StateHolder
from .ops import ANNOUNCED_ACTIONS, Action, Context, Op, apply, would_fold
from .settings import RendezvousSettings
from .state import NodeDesc

logger = logging.getLogger(__name__)

# How long (seconds) a node whose announcement is k-th in line waits for the ones ahead of it to fold
# before it folds the batch itself: FOLD_FALLBACK_FIRST + FOLD_FALLBACK_STEP * min(k, FOLD_FALLBACK_RANKS),
# with a little jitter. Staggering by place in line keeps a slow (or dead) oldest poster from setting
# off a write by every waiting node at once; the nearest in line steps in first.
FOLD_FALLBACK_FIRST = 0.5
FOLD_FALLBACK_STEP = 0.25
FOLD_FALLBACK_RANKS = 16


class OpExecutor:
    """Drives one node's operations: sync, decide, act, until the operation finishes.

    Waiting is done on the backend's change notification, never on a fixed sleep. Joins go through
    the mailbox when the backend has one: the node announces itself once and then only helps fold
    announcements in, so concurrent joiners do not each need their own winning write.
    """

    def __init__(
        self,
        node: NodeDesc,
        holder: StateHolder,
        backend: RendezvousBackend,
        settings: RendezvousSettings,
    ) -> None:
        self._node = node
        self._holder = holder
        self._backend = backend
        self._settings = settings
        self._last_beat = float("-inf")
        # The (round, action) this node last announced; it stays pending until a write folds it.
        self._announced: tuple[int, Action] | None = None
        # Monotonic time the current run first saw this node among the participants.
        self.placed_at: float | None = None

    def beat(self) -> None:
        """Send a heartbeat now."""
        self._backend.liveness.beat(self._node.key, self._settings.liveness_ttl)
        self._last_beat = time.monotonic()

    def _keep_alive_due(self) -> bool:
        return time.monotonic() - self._last_beat >= self._settings.keep_alive_interval

    def _describe(self, action: Action) -> str:
        state = self._holder.state
        return (
            f"The node '{self._node}' chose {action.name} in round {state.round} of the "
            f"rendezvous '{self._settings.run_id}' ({len(state.participants)} participants, "
            f"{len(state.wait_list)} waiting, {len(state.redundancy_list)} redundant, "
            f"complete={state.complete}, closed={state.closed})."
        )

    def run(
        self,
        op: Op,
        deadline: float,
        update_deadline: Callable[[float], float] | None = None,
    ) -> None:
        """Run ``op`` until it returns ``FINISH``.

        Args:
            op: the decision function.
            deadline: monotonic time after which the op times out.
            update_deadline: given the join timeout, a new deadline; called when a redundant node
                starts competing for a place again.

        Raises:
            RendezvousClosedError: the run is closed.
            RendezvousTimeoutError: the deadline passed.
        """
        self.placed_at = None
        synced = False
        while True:
            has_set = None if synced else self._holder.sync()
            synced = False
            if has_set:
                # Our own write read the mailbox after our announcement, so it placed us unless we
                # were dropped as dead; either way a later join must announce afresh.
                self._announced = None
            if has_set is not None:
                logger.debug(
                    "The node '%s' %s its changes to round %d of the rendezvous '%s'.",
                    self._node,
                    "synced" if has_set else "lost the race to sync",
                    self._holder.state.round,
                    self._settings.run_id,
                )
            state = self._holder.state
            if self.placed_at is None and self._node in state.participants:
                self.placed_at = time.monotonic()
            ctx = Context(self._node, state, self._settings, self._keep_alive_due())
            action = op(ctx, deadline)
            if action is not Action.SYNC:
                logger.debug(self._describe(action))
            if action is Action.FINISH:
                return
            if action is Action.ERROR_CLOSED:
                raise RendezvousClosedError(f"The rendezvous '{self._settings.run_id}' is closed.")
            if action is Action.ERROR_TIMEOUT:
                raise RendezvousTimeoutError(
                    f"The node '{self._node}' timed out in round {state.round} of the rendezvous "
                    f"'{self._settings.run_id}' with {len(state.participants)} of "
                    f"{self._settings.min_nodes}..{self._settings.max_nodes} nodes."
                )
            if action is Action.SYNC:
                self._wait(deadline)
            elif action is Action.KEEP_ALIVE:
                self.beat()
            elif action in ANNOUNCED_ACTIONS and self._backend.mailbox is not None:
                self._announce(action)
                synced = self._await_fold()
            else:
                if action is Action.MARK_RENDEZVOUS_COMPLETE or action is Action.MARK_RENDEZVOUS_CLOSED:
                    record_event(self._settings, self._node, self._describe(action), NodeState.SUCCEEDED)
                apply(action, state, self._node, self._settings)
                if action is Action.REMOVE_FROM_REDUNDANCY_LIST and update_deadline is not None:
                    deadline = update_deadline(self._settings.join_timeout)
                self._holder.mark_dirty()

    def _announce(self, action: Action) -> None:
        announcement = (self._holder.state.round, action)
        if announcement == self._announced:
            return
        if self._keep_alive_due():
            # A join folded in for a node with no heartbeat would be dropped as dead at once.
            self.beat()
        if action is Action.REMOVE_FROM_PARTICIPANTS:
            record = encode_leave(self._node, self._holder.state.round)
        else:
            record = encode_join(self._node)
        self._backend.mailbox.post(record)
        self._announced = announcement

    def _await_fold(self) -> bool:
        """Fold the pending announcements if ours is the oldest; else let the older posters do it.

        One node at a time, the poster of the oldest pending announcement, folds a batch, so
        concurrent joiners do not all race to write the same batch. If the nodes ahead do not act
        in time (dead, or stalled), this node folds anyway, after a wait that grows with its place
        in line (see ``FOLD_FALLBACK_FIRST``).

        Returns:
            True if the holder was synced and the caller must decide afresh.
        """
        before = self._holder.token
        state = self._holder.state
        records, _ = self._backend.mailbox.read(state.cursor)
        where = f"the mailbox of run '{self._settings.run_id}'"
        # Only announcements that would change the state count: a repeated join of a placed node
        # must not hold up the line.
        announcements = [decode_announcement(record, where) for record in records]
        posters = [a.node for a in announcements if would_fold(state, a, self._settings)]
        if self._node not in posters:
            # Our announcement is no longer pending, yet the op still asks for it: it was folded by
            # a write we have not read, or folded and undone (we were dropped as dead), or it lapsed.
            self._holder.sync()
            if self._holder.token != before:
                return True
            self._announced = None
            return False
        place = posters.index(self._node)
        if place > 0:
            wait = FOLD_FALLBACK_FIRST + FOLD_FALLBACK_STEP * min(place, FOLD_FALLBACK_RANKS)
            self._backend.wait_for_change(before, wait * random.uniform(0.9, 1.1))
            self._holder.sync()
            if self._holder.token != before:
                return True
        self._holder.mark_dirty()
        return False

    def _wait(self, deadline: float) -> None:
        """Block until the state changes, a heartbeat or the last-call deadline is due, or timeout."""
        timeouts = [
            deadline - time.monotonic(),
            self._last_beat + self._settings.keep_alive_interval - time.monotonic(),
        ]
        state = self._holder.state
        if state.deadline is not None and self._node in state.participants:
            timeouts.append(state.deadline - time.time())
        self._backend.wait_for_change(self._holder.token, max(0.01, min(timeouts)))

