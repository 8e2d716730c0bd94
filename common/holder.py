"""The local copy of the shared state, kept in step with the backend by compare-and-set."""

from __future__ import annotations

import logging
import time

from .backend import RendezvousBackend, Token
from .codec import decode_announcement, decode_state, encode_state
from .ops import fold_join, fold_leave
from .settings import RendezvousSettings
from .state import NodeDesc, RendezvousState

logger = logging.getLogger(__name__)


class StateHolder:
    """Holds this node's view of the run's state and writes its changes back.

    Every write first folds the join announcements waiting in the backend's mailbox and drops
    nodes whose liveness lapsed, so one successful compare-and-set admits every pending join.
    The holder's own ``node`` is never dropped: it knows it is alive, and dropping itself from a
    round it was admitted to would split that round's group.
    A failed write leaves the holder with the state that won; the caller decides again from it.
    """

    def __init__(
        self, backend: RendezvousBackend, settings: RendezvousSettings, node: NodeDesc | None = None
    ) -> None:
        self._backend = backend
        self._node = node
        self._settings = settings
        self._state = RendezvousState()
        self._token: Token | None = None
        self._dirty = False
        self._last_sync = float("-inf")
        # The round that was already complete in the last stored state we saw, if any.
        self._completed_round: int | None = None
        # node key -> monotonic time it was last seen alive; only positive answers are cached, so a
        # node is never declared dead from a stale answer.
        self._seen_alive: dict[str, float] = {}
        self.writes = 0
        self.failed_writes = 0

    @property
    def state(self) -> RendezvousState:
        return self._state

    @property
    def token(self) -> Token | None:
        return self._token

    def mark_dirty(self) -> None:
        """Have the next ``sync`` write the local state (as changed by the caller) back."""
        self._dirty = True

    def sync(self, max_age: float = 0.0) -> bool | None:
        """Read the shared state, or write the local one if it is dirty.

        Args:
            max_age: a clean read may be skipped if the last sync is younger than this.

        Returns:
            ``None`` for a read, else whether the write won.

        Raises:
            RendezvousStateError: the stored state does not decode.
            RendezvousConnectionError: the backend is unreachable.
        """
        where = f"{self._backend.location} (run '{self._settings.run_id}')"
        has_set: bool | None = None
        if self._dirty:
            cursor = self._fold_mailbox()
            self._drop_dead(self._state)
            if self._state.complete and self._completed_round != self._state.round:
                # This write completes the round and nobody has seen its ranks yet: if folding or
                # liveness just removed participants, ranks stay dense (0..n-1), and a round left
                # below min_nodes is not completed at all.
                if len(self._state.participants) < self._settings.min_nodes:
                    self._state.reopen()
                else:
                    self._state.assign_ranks()
            response = self._backend.set_state(encode_state(self._state), self._token)
            has_set = bool(response and response[2])
            self.writes += 1
            self.failed_writes += 0 if has_set else 1
            if has_set and cursor is not None:
                self._backend.mailbox.trim(cursor)
        elif time.monotonic() - self._last_sync < max_age:
            return None
        else:
            response = self._backend.get_state()

        self._dirty = False
        if response is None:
            self._state, self._token = RendezvousState(), None
        else:
            self._state, self._token = decode_state(response[0], where), response[1]
        # Only a read that decoded counts as fresh: a corrupt state must fail every caller.
        self._last_sync = time.monotonic()
        self._completed_round = self._state.round if self._state.complete else None
        if response is not None and not has_set:
            self._drop_dead(self._state)
        return has_set

    def _fold_mailbox(self) -> int | None:
        """Fold every announcement into the local state; return the new cursor if it moved."""
        mailbox = self._backend.mailbox
        if mailbox is None:
            return None
        records, cursor = mailbox.read(self._state.cursor)
        where = f"the mailbox of run '{self._settings.run_id}'"
        for record in records:
            announcement = decode_announcement(record, where)
            if announcement.kind == "join":
                fold_join(self._state, announcement.node, self._settings)
            else:
                fold_leave(self._state, announcement.node, announcement.round, self._settings)
        moved = cursor != self._state.cursor
        self._state.cursor = cursor
        return cursor if moved else None

    def _drop_dead(self, state: RendezvousState) -> None:
        nodes = state.nodes() - {self._node} if self._node else state.nodes()
        if not nodes:
            return
        now = time.monotonic()
        fresh_for = self._settings.keep_alive_interval
        if all(now - self._seen_alive.get(n.key, float("-inf")) <= fresh_for for n in nodes):
            return
        # Ask about every node at once: one request answers for all, and the answers stay fresh.
        by_key = {n.key: n for n in nodes}
        alive = self._backend.liveness.alive(list(by_key), self._settings.liveness_ttl)
        for key in alive:
            self._seen_alive[key] = now
        for key, node in by_key.items():
            if key not in alive:
                self._seen_alive.pop(key, None)
                logger.debug(
                    "Detected dead node '%s' in run '%s', removing it from the rendezvous",
                    node,
                    self._settings.run_id,
                )
                state.remove_node(node, self._settings.min_nodes)

    def refresh_liveness(self) -> None:
        """Ask the backend afresh about every node at the next sync (a new rendezvous starts)."""
        self._seen_alive.clear()
