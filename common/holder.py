"""The local copy of the shared state, and the protocol that keeps it in step with the backend.

The protocol, all of it here: a node *announces* its join or leave in the backend's mailbox; the
poster of the oldest pending announcement *folds* every pending one into the state with one
compare-and-set (others step in after a delay that grows with their place in line); the same write
drops dead nodes and then applies the *completion rule* (``ops.settle``); a write that won *trims*
the records it folded. A node that stops standing by an announcement it posted *withdraws* it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import tenacity

from .backend import Record, RendezvousBackend, Token
from .codec import decode_announcement, decode_state, encode_join, encode_leave, encode_rejoin, encode_state, peek_state
from .events import record_step, record_write
from .node import NodeDesc
from .ops import Action, fold, settle, would_fold
from .settings import RendezvousSettings
from .state import RendezvousState

logger = logging.getLogger(__name__)

# How long (seconds) a node whose announcement is k-th in line waits for the ones ahead of it to fold
# before it folds the batch itself: FOLD_FALLBACK_FIRST + FOLD_FALLBACK_STEP * min(k, FOLD_FALLBACK_RANKS),
# with a little jitter. Staggering by place in line keeps a slow (or dead) oldest poster from setting
# off a write by every waiting node at once; the nearest in line steps in first.
FOLD_FALLBACK_FIRST = 0.5
FOLD_FALLBACK_STEP = 0.25
FOLD_FALLBACK_RANKS = 16

# How long a node waits before it posts an announcement again once the last one of the same round
# and action was consumed without placing it (it lapsed with its poster's session, the node was
# dropped as dead, or the state is broken): the first repeat goes at once, the k-th about
# 0.1 * 2**(k-2) seconds after the one before, at most 5 s. An announcement is a write, and a node
# that re-posts in a tight loop hurts every job on a shared etcd.
_REPOST_WAIT = tenacity.wait_exponential_jitter(multiplier=0.1, max=5.0, jitter=0.05)


def repost_delay(repeat: int) -> float:
    """Seconds between the ``repeat``-th re-post of an announcement and the post before it."""
    if repeat <= 1:
        return 0.0
    attempt = tenacity.RetryCallState(None, None, (), {})
    attempt.attempt_number = repeat - 1
    return _REPOST_WAIT(attempt)


@dataclass(frozen=True)
class _Pending:
    """An announcement this node posted that no write it has seen folded yet."""

    round: int
    action: Action
    record: Record
    posted_at: float  # on the holder's clock
    jitter: float  # scales this node's fold fallback delay, so that equals in line do not collide


class StateHolder:
    """Holds this node's view of the run's state and writes its changes back.

    Every write first folds the announcements waiting in the backend's mailbox and drops nodes
    whose liveness lapsed, then settles the round, so one successful compare-and-set admits every
    pending join. The holder's own ``node`` is never dropped: it knows it is alive, and dropping
    itself from a round it was admitted to would split that round's group. A failed write leaves
    the holder with the state that won; the caller decides again from it.

    Args:
        wall_clock: UNIX time, for the state's last-call deadline (shared between machines).
        clock: monotonic time: how old the last read and the last liveness answer are, and how
            long a node waits for the ones ahead of it to fold.
        topology: the node's topology label, sent with its joins.
        on_dropped: called with the nodes a write that won dropped as dead (after the write).
    """

    def __init__(
        self,
        backend: RendezvousBackend,
        settings: RendezvousSettings,
        node: NodeDesc | None = None,
        wall_clock: Callable[[], float] = time.time,
        topology: str | None = None,
        on_dropped: Callable[[list[NodeDesc]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backend = backend
        self._node = node
        self._topology = topology
        self._on_dropped = on_dropped
        self._settings = settings
        self._wall_clock = wall_clock
        self._clock = clock
        self._state = RendezvousState()
        self._token: Token | None = None
        self._dirty = False
        # Whether ``_state`` may differ from anything stored (a write prepared it, then failed).
        self._stale = False
        # When (on ``clock``) this holder last took the stored state (``read_if_older_than``).
        self._last_read = float("-inf")
        # When (on ``clock``) this holder last saw the stored state change: the line of waiting
        # posters moved then, and each one's turn to fold counts from it (``await_fold``).
        self._changed_at = float("-inf")
        # (round, complete, closed) of the state last read or written: what a write that wins changed.
        self._stored = (0, False, False)
        # Dead nodes removed from the local state after the last read, which the next write stores.
        self._dropped_unwritten: list[NodeDesc] = []
        self._pending: _Pending | None = None
        # The (round, action) of the last announcement posted, how many posts of it in a row were
        # consumed without placing the node, and when (on ``clock``) the next may go out.
        self._posted: tuple[tuple[int, Action], int, float] | None = None
        # The nodes the backend last confirmed alive, and when (``_alive``).
        self._confirmed: frozenset[NodeDesc] = frozenset()
        self._confirmed_at = float("-inf")
        self._where = f"the mailbox of run '{settings.run_id}'"
        self._state_where = f"{backend.location} (run '{settings.run_id}')"
        self.writes = 0
        self.failed_writes = 0

    @property
    def state(self) -> RendezvousState:
        return self._state

    @property
    def token(self) -> Token | None:
        return self._token

    def mark_dirty(self) -> None:
        """Have the next ``write`` store the local state (as changed by the caller)."""
        self._dirty = True

    @property
    def has_changes(self) -> bool:
        """Whether ``write`` has something to store: changes marked on the state last read. A
        change made on a state that a failed write left behind is never written: it is dropped
        by the next read, and its caller decides again from what that read returns."""
        return self._dirty and not self._stale

    def write(self) -> bool:
        """Store the local state (``has_changes``), after folding the pending announcements into
        it, dropping the nodes whose liveness lapsed and settling its round; then hold the state
        stored, whether this write won or another one did.

        Returns:
            Whether the compare-and-set won.

        Raises:
            RendezvousStateError: the stored state does not decode.
            RendezvousConnectionError: the backend is unreachable.
            LivenessLapsed: a write that makes or keeps this node a member did not land: its
                liveness lapsed. The next read takes the stored state.
        """
        assert self.has_changes, "write() stores changes marked (mark_dirty) on the state last read"
        self._dirty = False
        # Until a response replaces it, the local state holds a fold and a completion that
        # were never stored: if the write fails, no later write may start from it.
        self._stale = True
        folded = self._fold_mailbox(self._state)
        dropped = self._drop_dead(self._state)
        wall = self._wall_clock()
        if self._completes(wall):
            # The group is about to be formed: its members are checked on the server itself,
            # not on answers up to ``keep_alive_interval`` old from a copy that may trail it.
            dropped += self._drop_dead(self._state, current=True)
        settle(self._state, self._settings, wall)
        response = self._backend.set_state(encode_state(self._state), self._token, folded, self._member())
        won = bool(response and response[2])
        self.writes += 1
        self.failed_writes += 0 if won else 1
        if won and folded:
            self._backend.mailbox.trim(self._state.cursor)
        if won and dropped and self._on_dropped is not None:
            self._on_dropped(dropped)
        self._take(response, won, dropped)
        return won

    def read(self, timeout: float | None = None) -> None:
        """Hold the stored state; local changes not written are dropped.

        Args:
            timeout: the read gives up after about this many seconds (``RendezvousBackend.get_state``).

        Raises:
            RendezvousStateError: the stored state does not decode.
            RendezvousConnectionError: the backend is unreachable.
        """
        response = self._backend.get_state() if timeout is None else self._backend.get_state(timeout)
        if response is not None and response[1] == self._token and not self._stale and not self._dropped_unwritten:
            # Unchanged since the last read, which dropped nobody: the local state is the stored
            # one, and only the others' liveness may have changed. A node waiting in a long last
            # call wakes every interval to look at that, and a copy of the state each time would
            # be most of what waiting costs.
            self._dirty = False
            self._dropped_unwritten = self._drop_dead(self._state)
            self._last_read = self._clock()
            return
        self._take(response, False, [])

    def read_if_older_than(self, max_age: float, timeout: float | None = None) -> None:
        """``read``, unless the last read (or write) is younger than ``max_age`` seconds and left
        nothing local to drop: the state it took stands."""
        if self._dirty or self._stale or self._clock() - self._last_read >= max_age:
            self.read(timeout)

    def _take(self, response: tuple | None, won: bool, dropped: list[NodeDesc]) -> None:
        """Hold the stored state that ``response`` (of a read, or of a write that ``won`` or not)
        carries, and what follows from it: whether our announcement was folded, and which of the
        nodes it names are dead (stored by the next write)."""
        self._dirty = False
        token = self._token
        if response is None:
            self._state, self._token = RendezvousState(), None
        else:
            self._state, self._token = decode_state(response[0], self._state_where), response[1]
        if self._token != token:
            self._changed_at = self._clock()
        self._stale = False
        before, self._stored = self._stored, (self._state.round, self._state.complete, self._state.closed)
        if won and self._node is not None:
            record_write(self._settings, self._node, before, self._stored, self._dropped_unwritten + dropped)
        # Only a response that decoded counts as fresh: a corrupt state must fail every caller.
        self._last_read = self._clock()
        if self._is_folded(self._pending) or (won and self._pending and self._pending.record.position is None):
            # A write folded our announcement (one of ours folds every record after the cursor);
            # it placed us unless we were dropped as dead. Either way a later join or leave must
            # announce afresh.
            self._pending = None
        self._dropped_unwritten = self._drop_dead(self._state) if response is not None and not won else []

    def _member(self) -> str | None:
        """The key of this node if the local state, about to be written, makes or keeps it a member
        of a round of an open run: the write is then fenced on its liveness (``set_state``)."""
        state = self._state
        return self._node.key if self._node is not None and self._node in state.participants and not state.closed else None

    def wait_until(self, ends_wait: Callable[[RendezvousState], bool], timeout: float) -> None:
        """Return once a stored state that ``ends_wait`` accepts is there to read, or after
        ``timeout`` seconds; the caller reads next.

        The stored states it passes over are only looked at, on the process's shared parse: no
        copy, no liveness check, and this holder's own state stays as it was. In a re-rendezvous
        of N nodes every node waits through the N leaves that end the round; a full read at each
        one would cost N squared reads of the whole state.
        """
        end = self._clock() + timeout
        token = self._token
        while (remaining := end - self._clock()) > 0:
            self._backend.wait_for_change(token, remaining)
            response = self._backend.get_state()
            if response is None or ends_wait(peek_state(response[0], self._state_where)):
                return
            token = response[1]

    def _is_folded(self, pending: _Pending | None) -> bool:
        position = pending.record.position if pending is not None else None
        return position is not None and self._state.cursor >= position

    def _fold_mailbox(self, state: RendezvousState) -> list[Record]:
        """Fold the pending announcements into ``state``; return them."""
        records = self._backend.mailbox.read(state.cursor)
        for record in records:
            fold(state, decode_announcement(record.data, self._where), self._settings)
        if records:
            state.cursor = records[-1].position
        return records

    def seen_alive(self, nodes: Collection[NodeDesc]) -> dict[str, float]:
        """The time (on ``clock``) each of ``nodes`` was last known alive, by node key; a node the
        backend reports dead is absent."""
        alive = self._alive(set(nodes))
        return {n.key: self._confirmed_at for n in nodes if n in alive}

    def _alive(self, nodes: set[NodeDesc], current: bool = False) -> frozenset[NodeDesc]:
        """The nodes known alive: those the backend confirmed within ``keep_alive_interval``, if
        that covers every one of ``nodes`` and ``current`` is not asked for; else the backend is
        asked about all of them at once. Only a fresh answer ever leaves a node out, and a read
        that needs none costs a set test, not a pass over the nodes (every node of a large run
        reads the state after each write)."""
        now = self._clock()
        if current or now - self._confirmed_at > self._settings.keep_alive_interval or not nodes <= self._confirmed:
            by_key = {n.key: n for n in nodes}
            alive = self._backend.liveness.alive(list(by_key), self._settings.liveness_ttl, current)
            self._confirmed = frozenset(by_key[key] for key in alive if key in by_key)
            self._confirmed_at = now
        return self._confirmed

    def _completes(self, wall: float) -> bool:
        """Whether the write of the local state at UNIX time ``wall`` completes its round."""
        if self._state.complete or self._state.closed:
            return False
        probe = self._state.copy()
        settle(probe, self._settings, wall)
        return probe.complete

    def _drop_dead(self, state: RendezvousState, current: bool = False) -> list[NodeDesc]:
        """Drop the nodes whose liveness lapsed from ``state``; return them. With ``current``,
        ask the backend for the server's own answer (``Liveness.alive``), whatever is known."""
        nodes = state.nodes()
        nodes.discard(self._node)
        if not nodes:
            return []
        dropped = list(nodes - self._alive(nodes, current))
        for node in dropped:
            logger.debug(
                "Detected dead node '%s' in run '%s', removing it from the rendezvous",
                node,
                self._settings.run_id,
            )
            state.remove_node(node)
        return dropped

    def refresh_liveness(self) -> None:
        """Ask the backend afresh about every node at the next read or write (a new rendezvous
        starts)."""
        self._confirmed, self._confirmed_at = frozenset(), float("-inf")

    # Announcements.

    def announce(self, action: Action, decide_in: float = float("inf")) -> bool:
        """Post this node's ``action`` (a join, leaving the participants, or both: ``REJOIN``) for
        the current round, unless that announcement is still pending.

        An announcement of the same round and action as the last one posted, which was consumed
        without placing the node, goes out only after a wait that grows with each such repeat
        (``repost_delay``); meanwhile this waits for the state to change, for ``decide_in``
        seconds at most, and returns False: the caller decides again.

        Returns:
            True if this node's announcement is pending now.
        """
        state = self._state
        key = (state.round, action)
        if self._pending is not None and (self._pending.round, self._pending.action) == key:
            return True
        assert self._node is not None, "only a node's own holder announces"
        repeat = self._posted[1] + 1 if self._posted is not None and self._posted[0] == key else 0
        if repeat:
            wait = self._posted[2] - self._clock()
            if wait > 0:
                self._backend.wait_for_change(self._token, max(0.01, min(wait, decide_in)))
                return False
        if action is Action.REMOVE_FROM_PARTICIPANTS:
            data = encode_leave(self._node, state.round, state.complete)
        elif action is Action.REJOIN:
            data = encode_rejoin(self._node, state.round, self._topology)
        else:
            data = encode_join(self._node, self._topology)
        record = self._backend.mailbox.post(data, poster=self._node.key)
        posted_at = self._clock()
        self._pending = _Pending(state.round, action, record, posted_at, random.uniform(0.9, 1.1))
        self._posted = (key, repeat, posted_at + repost_delay(repeat + 1))
        record_step(self._settings, self._node, action.name, state.round)
        return True

    def await_fold(self, decide_in: float = float("inf")) -> bool:
        """Fold the pending announcements if ours is the oldest; else let the older posters do it.

        One node at a time, the poster of the oldest pending announcement, folds a batch, so
        concurrent joiners do not all race to write the same batch. If the nodes ahead do not act
        in time (dead, or stalled), this node folds anyway, after a wait that grows with its place
        in line (see ``FOLD_FALLBACK_FIRST``).

        While it waits, it only looks at each state stored (on the process's shared parse): a
        write that folds the line ahead of it moves it up, and only the write that folds its own
        announcement, or its turn, ends the wait: a full read and a new decision at each of the
        writes would cost a line of N nodes N squared reads.

        Args:
            decide_in: seconds until the caller must decide afresh (its heartbeat or its deadline
                is due); the wait for its turn ends then, and the turn stands.

        Returns:
            True if the state was read and the caller must decide afresh; False if the caller
            must act: write (the holder has changes) or, if it has none, announce again.
        """
        before = self._token
        state = self._state
        records = self._backend.mailbox.read(state.cursor)
        mine = self._pending_index(records)
        if mine is None:
            # Our announcement is no longer pending, yet the op still asks for it: it was folded by
            # a write we have not read, or folded and undone (we were dropped as dead), or it lapsed.
            self.read()
            if self._token != before:
                return True
            self._pending = None
            return False
        position = records[mine].position
        ahead = records[:mine]
        place = self._place(state, ahead, state.cursor)
        if place > 0:
            # The turn counts from the later of the post and the last change of the state, so it
            # stands across calls: a backend's wait may end early (the etcd one after a second at
            # most), and a node that began its wait afresh then would never step in, while one that
            # stepped in at once would set off a write by every node in line.
            pending = self._pending
            decide_at = self._clock() + decide_in
            token = before
            placed = self._where_placed(state)
            while (remaining := max(self._changed_at, pending.posted_at) + self._fold_wait(place) - self._clock()) > 0:
                if (until_decide := decide_at - self._clock()) <= 0:
                    if token != before:
                        self.read()
                    return True
                self._backend.wait_for_change(token, min(remaining, until_decide))
                response = self._backend.get_state()
                if (response[1] if response is not None else None) == token:
                    continue
                if response is None:  # the run was deleted
                    self.read()
                    return True
                token = response[1]
                self._changed_at = self._clock()
                stored = peek_state(response[0], self._state_where)
                if stored.cursor >= position or self._where_placed(stored) != placed:
                    # Folded, or its op may decide otherwise now: read, and decide afresh.
                    self.read()
                    return True
                place = self._place(stored, ahead, stored.cursor)
                if place == 0:
                    break
            if token != before:
                # Our turn: fold from the state stored now (our own announcement may be in it).
                self.read()
                if self._pending is None:
                    return True
        self.mark_dirty()
        return False

    def _place(self, state: RendezvousState, ahead: list[Record], cursor: int) -> int:
        """How many of the records ``ahead`` of ours, still pending past ``cursor``, would change
        ``state``: a repeated join of a placed node must not hold up the line. Counting stops at
        FOLD_FALLBACK_RANKS, past which the wait stops growing."""
        place = 0
        for record in ahead:
            if place == FOLD_FALLBACK_RANKS:
                break
            if record.position > cursor and would_fold(state, decode_announcement(record.data, self._where), self._settings):
                place += 1
        return place

    def _where_placed(self, state: RendezvousState) -> tuple:
        """What of ``state`` an op decides this node's next step by, besides its own announcement."""
        node = self._node
        return (state.round, state.closed, node in state.participants, node in state.wait_list, node in state.redundancy_list)

    def _fold_wait(self, place: int) -> float:
        """How long the poster at ``place`` in line waits for the ones ahead before it folds."""
        assert self._pending is not None
        return (FOLD_FALLBACK_FIRST + FOLD_FALLBACK_STEP * place) * self._pending.jitter

    def _pending_index(self, records: list[Record]) -> int | None:
        """Where in ``records`` this node's pending announcement is, if it would still change the
        state; matched by content, so a record read back is found even where ``post`` could not
        say its position."""
        if self._pending is None:
            return None
        data = self._pending.record.data
        for index, record in enumerate(records):
            if record.data == data:
                announcement = decode_announcement(record.data, self._where)
                return index if would_fold(self._state, announcement, self._settings) else None
        return None

    def withdraw(self) -> None:
        """Take back this node's announcement if no write it saw has folded it: the node's
        operation ended (it finished, failed or timed out) and no later write may act on it."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._backend.mailbox.withdraw(pending.record.handle)
