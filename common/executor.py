"""Runs a rendezvous operation to completion against the shared state."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection

from torch.distributed.elastic.rendezvous import RendezvousClosedError, RendezvousTimeoutError

from .backend import LivenessLapsed, RendezvousBackend, Token
from .events import record_step
from .holder import StateHolder
from .node import NodeDesc
from .ops import ANNOUNCED_ACTIONS, Action, Context, Op, apply, completion_due, waits_for_members, waits_for_next_round
from .settings import RendezvousSettings
from .state import RendezvousState

logger = logging.getLogger(__name__)


class OpExecutor:
    """Drives one node's operations: read or write, decide, act, until the operation finishes;
    and answers what its handler asks of the state between operations (its ``StateHolder`` is
    reached through this executor only).

    Waiting is done on the backend's change notification, never on a fixed sleep. Joins and leaves
    go through the mailbox (see ``StateHolder``): the node announces itself once and then only
    helps fold announcements in, so concurrent joiners do not each need their own winning write.

    Args:
        clock, wall_clock: monotonic and UNIX time, handed to every decision.
        beats: whether the executor sends the node's heartbeats while an op runs; ``False`` where
            the caller's heartbeat thread sends them (the handler's), so that a node waiting for
            its announcement to fold is not woken at every interval to find its heartbeat sent.
    """

    def __init__(
        self,
        node: NodeDesc,
        holder: StateHolder,
        backend: RendezvousBackend,
        settings: RendezvousSettings,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        beats: bool = True,
    ) -> None:
        self._node = node
        self._beats = beats
        self._holder = holder
        self._backend = backend
        self._settings = settings
        self._clock = clock
        self._wall_clock = wall_clock
        # When (on ``clock``) the last heartbeat that succeeded was sent. Beats of one node never
        # overlap: the handler's heartbeat thread and this executor both send them.
        self._last_beat = float("-inf")
        self._beat_lock = threading.Lock()
        # Monotonic time the current run first saw this node among the participants.
        self.placed_at: float | None = None

    @property
    def node(self) -> NodeDesc:
        return self._node

    @property
    def state(self) -> RendezvousState:
        """The state as last read or written (``StateHolder.state``)."""
        return self._holder.state

    @property
    def token(self) -> Token | None:
        """The fencing token of ``state``."""
        return self._holder.token

    @property
    def writes(self) -> int:
        """Compare-and-set writes made so far."""
        return self._holder.writes

    @property
    def lost_writes(self) -> int:
        """Compare-and-set writes that lost so far."""
        return self._holder.failed_writes

    def read(self, max_age: float = 0.0, timeout: float | None = None) -> None:
        """Read the stored state, unless the last read or write is younger than ``max_age``
        seconds; the read gives up after about ``timeout`` seconds if given.

        Raises:
            RendezvousStateError: the stored state does not decode.
            RendezvousConnectionError: the backend is unreachable.
        """
        self._holder.read_if_older_than(max_age, timeout)

    def group_stands(self, round_: int, leader: NodeDesc) -> bool:
        """Whether ``leader`` is still a live member of the group of ``round_``, as read now (a
        read drops the nodes whose liveness lapsed)."""
        self._holder.read()
        state = self._holder.state
        return state.round == round_ and leader in state.participants

    def held_since(self, token: Token | None, since: float) -> bool:
        """Whether this node's liveness held from the write of the state that carries ``token``
        (``since``: a time on the monotonic clock before that write) until now; see
        ``Liveness.held_since``."""
        return self._backend.liveness.held_since(self._node.key, token, since)

    def refresh_liveness(self) -> None:
        """Have the next read or write ask the backend afresh about every node's liveness."""
        self._holder.refresh_liveness()

    def seen_alive(self, nodes: Collection[NodeDesc]) -> dict[str, float]:
        """When (on ``clock``) each of ``nodes`` was last known alive, by node key; a node the
        backend reports dead is absent (``StateHolder.seen_alive``)."""
        return self._holder.seen_alive(nodes)

    @property
    def last_beat(self) -> float | None:
        """When (on ``clock``) this node last sent a heartbeat; ``None`` before its first."""
        return None if self._last_beat == float("-inf") else self._last_beat

    def beat(self, timeout: float | None = None, if_due: bool = False, announcing: bool = False) -> None:
        """Send a heartbeat now, within ``timeout`` seconds if given; with ``if_due``, only if none
        was sent within ``keep_alive_interval`` (another thread's beat may have ended while this
        one waited for it); ``announcing``: the node posts next (``Liveness.beat``)."""
        with self._beat_lock:
            if if_due and not self._keep_alive_due():
                return
            sent = self._clock()
            self._backend.liveness.beat(self._node.key, self._settings.liveness_ttl, timeout, announcing)
            # The next beat is due an interval after this one was *sent*: the server counts the TTL
            # from when it took the beat, no earlier. Counted from the reply, the interval would
            # grow by the reply's delay, which under load is most of the TTL.
            self._last_beat = sent

    def next_beat_in(self) -> float:
        """Seconds until the next heartbeat is due (at most 0 when one is due now)."""
        return self._last_beat + self._settings.keep_alive_interval - self._clock()

    def _keep_alive_due(self) -> bool:
        return self.next_beat_in() <= 0

    def _decide_in(self, deadline: float) -> float:
        """Seconds until this executor must decide afresh: at its deadline, or when a heartbeat it
        sends itself is due."""
        until = deadline - self._clock()
        return min(until, self.next_beat_in()) if self._beats else until

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
        synced: bool = False,
    ) -> None:
        """Run ``op`` until it returns ``FINISH``. Whatever way it ends, an announcement of this
        node that no write folded yet is withdrawn: the operation that posted it is over.

        Args:
            op: the decision function.
            deadline: monotonic time after which the op times out.
            update_deadline: given the join timeout, a new deadline; called when a redundant node
                starts competing for a place again.
            synced: the holder's state was read just now (the op run before finished on it):
                decide from it first. A decision on a state that moved on since is safe: a write
                loses its compare-and-set, a wait ends at once, an announcement folds into the
                state stored then.

        Raises:
            RendezvousClosedError: the run is closed.
            RendezvousTimeoutError: the deadline passed.
        """
        self.placed_at = None
        try:
            self._run(op, deadline, update_deadline, synced)
        finally:
            self._holder.withdraw()

    def _run(self, op: Op, deadline: float, update_deadline: Callable[[float], float] | None, synced: bool) -> None:
        while True:
            won: bool | None = None  # whether a write of this node's changes won; None: no write
            try:
                if not synced and self._holder.has_changes:
                    won = self._holder.write()
                elif not synced:
                    self._holder.read()
            except LivenessLapsed as lapse:
                # The others may have dropped this node: it must be alive again before it writes
                # itself into a group (and the answer it then gets is checked by its caller).
                # The message, not the error: a log record kept (by a test's log capture, say) must
                # not hold the error's frames, and with them this node's backend.
                logger.warning("The node '%s' beats again before it writes: %s.", self._node, str(lapse))
                self.beat()
                synced = False
                continue
            synced = False
            if won is not None:
                logger.debug(
                    "The node '%s' %s its changes to round %d of the rendezvous '%s'.",
                    self._node,
                    "wrote" if won else "lost the race to write",
                    self._holder.state.round,
                    self._settings.run_id,
                )
            state = self._holder.state
            now = self._clock()
            if self.placed_at is None and self._node in state.participants:
                self.placed_at = now
            ctx = Context(self._node, state, self._settings, now, self._wall_clock(), self._beats and self._keep_alive_due())
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
                self.beat(if_due=True)
            elif action in ANNOUNCED_ACTIONS:
                if self._beats and self._keep_alive_due():
                    # A join folded in for a node with no heartbeat would be dropped as dead at once.
                    self.beat(if_due=True)
                if self._holder.announce(action, self._decide_in(deadline)):
                    synced = self._holder.await_fold(self._decide_in(deadline))
            else:
                # Completing and closing are recorded by the write that does them (``StateHolder``).
                record_step(self._settings, self._node, action.name, state.round)
                apply(action, state, self._node)
                if action is Action.REMOVE_FROM_REDUNDANCY_LIST and update_deadline is not None:
                    deadline = update_deadline(self._settings.join_timeout)
                self._holder.mark_dirty()

    def _wait(self, deadline: float) -> None:
        """Block until the state changes, this executor must decide afresh (``_decide_in``), or
        this node's turn to complete the round is due, and for a ``keep_alive_interval`` at most:
        the others' liveness is looked at between waits, and a dead member is dropped only by a
        node that looks. Past the deadline (an op that waits on, as a redundant node does for a
        free place), bounded by the interval alone: bounded by a deadline already passed, the wait
        would be a poll every 10 ms. A node whose decision only a few kinds of write can change (it
        waits for the next round, or for members) only looks at the others, on the process's
        shared parse (``StateHolder.wait_until``)."""
        passed = deadline <= self._clock()
        timeouts = [self._settings.keep_alive_interval, self._decide_in(float("inf") if passed else deadline)]
        state = self._holder.state
        due = completion_due(state, self._node)
        if due is not None and self._node in state.participants:
            timeouts.append(due - self._wall_clock())
        timeout = max(0.01, min(timeouts))
        node, round_ = self._node, state.round
        for waits in (waits_for_next_round, waits_for_members):
            if waits(state, node):
                self._holder.wait_until(lambda stored: stored.round != round_ or not waits(stored, node), timeout)
                return
        self._backend.wait_for_change(self._holder.token, timeout)
