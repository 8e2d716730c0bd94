"""The contract between the rendezvous core and a key-value server.

A backend stores one opaque state value per run and offers three capabilities the core builds on:

* ``get_state``/``set_state``: compare-and-set under a fencing token, the same contract as torch's
  ``torch.distributed.elastic.rendezvous.dynamic_rendezvous.RendezvousBackend``.
* ``wait_for_change``: block until the state moves past a token, so no node polls on a timer.
* ``mailbox`` and ``liveness``: where joins are announced and where nodes prove they are alive, both
  kept off the shared state so that neither grows contention with the number of nodes.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Collection
from typing import Any

Token = Any


class Mailbox(ABC):
    """An append-only log of join announcements, read from a cursor.

    A node that wants to join posts a record; whichever node next wins the compare-and-set folds
    every record after the state's cursor into the state and stores the new cursor with it. Records
    are therefore applied exactly once, in log order, by the winner of one write.
    """

    @abstractmethod
    def post(self, record: bytes) -> None:
        """Append ``record``. It must be visible to every ``read`` that starts after this returns."""

    @abstractmethod
    def read(self, cursor: int) -> tuple[list[bytes], int]:
        """Return the records after ``cursor`` in log order and the cursor that follows them.

        Cursor 0 means the start of the log. The returned cursor never precedes ``cursor``.
        """

    def trim(self, cursor: int) -> None:
        """Tell the mailbox that every record up to ``cursor`` is folded; it may discard them."""


class Liveness(ABC):
    """Per-node proof of life, kept outside the shared state.

    A node calls ``beat`` at least every ``keep_alive_interval``; it counts as dead once ``ttl``
    seconds pass without one. ``forget`` ends a node's liveness at once (graceful exit).
    """

    @abstractmethod
    def beat(self, node_key: str, ttl: float) -> None:
        """Record that ``node_key`` is alive for the next ``ttl`` seconds."""

    @abstractmethod
    def alive(self, node_keys: Collection[str], ttl: float) -> set[str]:
        """Return the subset of ``node_keys`` that beat within the last ``ttl`` seconds."""

    @abstractmethod
    def forget(self, node_key: str) -> None:
        """Drop ``node_key``'s liveness; it is dead from now on."""


class RendezvousBackend(ABC):
    """Holds the shared rendezvous state of one run.

    Fencing-token contract (torch's): ``set_state(state, None)`` writes only if no state exists;
    ``set_state(state, token)`` writes only if the stored state still carries ``token``. Either way
    the current state and its token come back, with ``has_set`` telling whether this call wrote.
    """

    @property
    @abstractmethod
    def name(self) -> str:
        """The backend's name, as torchrun was asked for it."""

    @abstractmethod
    def get_state(self) -> tuple[bytes, Token] | None:
        """Return the state and its fencing token, or ``None`` if the run has no state yet.

        Raises:
            RendezvousConnectionError: the server could not be reached.
            RendezvousStateError: the stored value is not a state this backend wrote.
        """

    @abstractmethod
    def set_state(self, state: bytes, token: Token | None = None) -> tuple[bytes, Token, bool] | None:
        """Compare-and-set ``state`` against ``token``; return ``(state, token, has_set)``.

        Returns ``None`` only when the state vanished between the write and the read-back.
        """

    def wait_for_change(self, token: Token | None, timeout: float) -> None:
        """Return once the stored state no longer carries ``token``, or after ``timeout`` seconds.

        The default is a bounded fallback for servers that cannot notify: it sleeps a short while.
        Spurious early returns are allowed; callers always re-read the state.
        """
        time.sleep(max(0.0, min(timeout, 0.25)))

    @property
    def location(self) -> str:
        """Where the state is kept, for messages (an operator must be able to find the key)."""
        return f"the {self.name} backend"

    @property
    def mailbox(self) -> Mailbox | None:
        """Where joins are announced, or ``None`` to write each join into the state directly."""
        return None

    @property
    @abstractmethod
    def liveness(self) -> Liveness:
        """Where nodes beat. Heartbeats never rewrite the shared state."""

    def close(self) -> None:
        """Release what this backend holds (connections, leases, threads). Idempotent."""
