"""``C10dRendezvousBackend``: the rendezvous backend contract over a c10d ``Store``.

Key layout; every key of run ``R`` sits under ``torch.rendezvous.c10d_rdzv/<R>/``, with ``R``
percent-quoted (so it holds no ``/``):

=====================  ===========================================================================
``state``              a 16-hex-digit write nonce followed by the state bytes; the fencing token
                       is this whole stored value
``generation``         a counter (``Store.add``) bumped once per successful ``set_state``
``changed/<g>``        set by the write that bumped ``generation`` to ``g``; waiters block on it
``log``                the join mailbox: records appended as ``<length>:<record>,``; once trimmed,
                       it starts with ``@<base>,``, the absolute offset of its first kept byte
                       (see ``mailbox.py``)
``hb/<node_key>``      the node's last beat, ``time.time()`` as decimal text; ``0`` once forgotten
``quarantine/<host>``  the host's quarantine entry, JSON with its expiry time (``until``); see
                       ``quarantine.py``, which also owns ``quarantined`` and ``lapses/<host>``
=====================  ===========================================================================

The nonce makes every write's stored value unique, so ``has_set`` is exact (torch's c10d backend
compares state bytes, which two writers of equal states share) and a token can never match again
after the state moves on and back (no ABA). It also keeps stored values non-empty, which
``compare_set`` needs: an empty expected value means "create if absent".
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from datetime import timedelta

from torch.distributed import Store, TCPStore
from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError, RendezvousStateError

from rdzv_common.backend import Liveness, Mailbox, Quarantine, Record, RendezvousBackend, Token

from .calls import StoreCalls, describe
from .keywait import KeyWaiter
from .keys import RunKeys
from .liveness import C10dLiveness
from .mailbox import C10dMailbox
from .quarantine import C10dQuarantine

logger = logging.getLogger(__name__)

_NONCE_BYTES = 8
_HEADER = 2 * _NONCE_BYTES
_HEX = frozenset(b"0123456789abcdef")

# Each write deletes the wake key this many generations back, bounding the store's memory. A waiter
# misses its wake-up (and sleeps to its timeout) only if this many writes complete between its
# reading the state and its call to ``wait``.
WAKE_KEYS_KEPT = 1024


class C10dRendezvousBackend(RendezvousBackend):
    """A backend over ``store`` for ``run_id`` that reports itself as ``name``.

    On a ``TCPStore`` the backend opens one more connection, at once, for ``wait_for_change`` (see
    ``keywait.py``). It does not own ``store``: ``close`` leaves it open for the agents that share it.

    Raises:
        ValueError: ``run_id`` is empty.
        RendezvousConnectionError: the wait connection could not be opened.
    """

    def __init__(self, store: Store, run_id: str, name: str = "c10d_rdzv") -> None:
        if not run_id:
            raise ValueError("The run id must be a non-empty string.")
        self._calls = StoreCalls(store)
        self._keys = RunKeys.for_run(run_id)
        self._store_name = describe(store)
        self._name = name
        self._mailbox = C10dMailbox(self._calls, self._keys.log)
        self._liveness = C10dLiveness(self._calls, self._keys)
        self._quarantine = C10dQuarantine(self._calls, self._keys)
        # A TCPStore connection serves one request at a time, so a wait on the shared connection
        # would stall this node's heartbeats (and the agents' store calls) for the whole wait.
        # Connecting now also spares the many nodes of a large run from all connecting at the
        # moment they start to wait.
        self._key_waiter = KeyWaiter(self._calls) if isinstance(store, TCPStore) else None

    @property
    def name(self) -> str:
        return self._name

    @property
    def location(self) -> str:
        return f"key '{self._keys.state}' of the {self._store_name}"

    @property
    def mailbox(self) -> Mailbox:
        return self._mailbox

    @property
    def liveness(self) -> Liveness:
        return self._liveness

    @property
    def quarantine(self) -> Quarantine:
        return self._quarantine

    def get_state(self, timeout: float | None = None) -> tuple[bytes, Token] | None:
        # ``timeout`` is not needed: the store's calls fail within seconds once it is gone.
        stored = self._calls.peek(self._keys.state)
        return None if stored is None else (self._decode(stored), stored)

    def set_state(
        self, state: bytes, token: Token | None = None, fence: Sequence[Record] = (), member: str | None = None
    ) -> tuple[bytes, Token, bool] | None:
        # Neither ``fence`` nor ``member`` is checked: a store compare-and-sets one key only (see
        # ``C10dMailbox``); a member's answer is checked by ``C10dLiveness.held_since`` instead.
        if token is not None and not isinstance(token, bytes):
            # Not a token this backend handed out, so it cannot match the stored one.
            current = self.get_state()
            return None if current is None else (*current, False)
        expected = b"" if token is None else token
        desired = os.urandom(_NONCE_BYTES).hex().encode() + bytes(state)
        stored = self._calls("compare_set", self._keys.state, expected, desired)
        if stored == desired:
            self._announce_change()
            return bytes(state), desired, True
        if stored == expected:
            # ``compare_set`` echoes a non-empty expected value when the key is absent.
            return None
        return self._decode(stored), stored, False

    def wait_for_change(self, token: Token | None, timeout: float) -> None:
        """Block on the wake key of the next generation; return early if the state already moved.

        No write can be missed: a write is ``compare_set`` (W1), then ``add(generation)`` (W2),
        then setting ``changed/<g>`` (W3); this reads ``generation`` as ``g0`` (R1), then the state
        (R2), then waits on ``changed/<g0+1>``. If W1 precedes R2, R2 sees the new state and this
        returns. Otherwise W2 follows R1, so that write's ``g`` exceeds ``g0``; generations are
        handed out one by one, so some write holds ``g0 + 1`` and sets its wake key, before or
        after the wait starts. A writer that dies between W1 and W3 only delays waiters to their
        timeout. ``FileStore`` checks its timeout once a second, so a wait there may overrun it by
        up to a second.
        """
        if timeout <= 0:
            return
        g0 = int(self._calls("add", self._keys.generation, 0))
        if self._calls.peek(self._keys.state) != token:
            return
        key = self._keys.changed(g0 + 1)
        if self._key_waiter is not None:
            self._key_waiter.wait(key, timeout)
            return
        try:
            self._calls.store.wait([key], timedelta(seconds=max(timeout, 0.001)))
        except RuntimeError:
            pass  # The wait timed out: FileStore raises a RuntimeError.

    def close(self) -> None:
        """Drop the connections opened for waiting; ``store`` itself stays open."""
        if self._key_waiter is not None:
            self._key_waiter.close()

    def _announce_change(self) -> None:
        try:
            generation = int(self._calls("add", self._keys.generation, 1))
            self._calls("set", self._keys.changed(generation), b"1")
            if generation > WAKE_KEYS_KEPT:
                self._calls("delete_key", self._keys.changed(generation - WAKE_KEYS_KEPT))
        except RendezvousConnectionError as exc:
            # The state is written; failing the call would misreport that to the caller.
            logger.warning("Waiters on '%s' will wake only at their timeout: %s", self._keys.state, exc)

    def _decode(self, stored: bytes) -> bytes:
        if len(stored) < _HEADER or not _HEX.issuperset(stored[:_HEADER]):
            raise RendezvousStateError(
                f"The rendezvous state '{self._keys.state}' in the c10d store ({self._calls.where}) "
                "was not written by this backend."
            )
        return stored[_HEADER:]
