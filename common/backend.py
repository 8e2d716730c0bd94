"""The contract between the rendezvous core and a key-value server.

A backend stores one opaque state value per run and offers three capabilities the core builds on:

* ``get_state``/``set_state``: compare-and-set under a fencing token, the same contract as torch's
  ``torch.distributed.elastic.rendezvous.dynamic_rendezvous.RendezvousBackend``.
* ``wait_for_change``: block until the state moves past a token, so no node polls on a timer.
* ``mailbox`` and ``liveness``: where joins and leaves are announced and where nodes prove they are
  alive, both kept off the shared state so that neither grows contention with the number of nodes.
* ``quarantine``: hosts kept out of the run for a cool-down, and the record of liveness lapses
  that quarantines a host (see ``health.py``).

Fencing. No node may be told a round whose group its liveness did not hold through: a node that
lapsed may have been dropped by the others. So a write that makes or keeps its writer a member
names it (``set_state(member=...)``), and a backend that can compare the writer's liveness in the
same transaction does (etcd: its liveness key and lease), refusing the write with
``LivenessLapsed``; and before a node takes an answer, it asks ``Liveness.held_since`` whether its
liveness held from the write of the state it read until now, which every backend can answer.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

Token = Any


class LivenessLapsed(Exception):
    """A write that named its writer as ``member`` did not land: the writer's liveness lapsed (its
    lease expired, its key is gone), so the others may have dropped it. The writer beats (a new
    liveness) and decides again."""


@dataclass(frozen=True)
class Record:
    """One announcement in a mailbox.

    Attributes:
        data: the record as posted.
        position: the cursor just past this record; folding it moves the state's cursor here.
            ``read`` always sets it; ``post`` leaves it ``None`` where the server cannot say.
        handle: the backend's name for the record (``withdraw``, fencing).
    """

    data: bytes
    position: int | None
    handle: Any = None


class Mailbox(ABC):
    """An append-only log of join and leave announcements, read from a cursor.

    A node posts a record; whichever node next wins the compare-and-set folds the records after the
    state's cursor into the state and stores the new cursor with it. Records are therefore applied
    exactly once, in log order, by the winner of one write.
    """

    @abstractmethod
    def post(self, record: bytes, poster: str | None = None) -> Record:
        """Append ``record`` and return it with its handle (and its position, where the server
        says). The poster's own ``read``s that start after this returns see it; other nodes see it
        once it reaches them. ``poster``: the key of the node posting, whose liveness a backend
        may write in the same request (it has beaten before it posts)."""

    @abstractmethod
    def read(self, cursor: int) -> list[Record]:
        """Return the records after ``cursor`` in log order (cursor 0: the start of the log).

        Raises:
            RendezvousStateError: ``cursor`` is past the end of the log: the state that holds it
                is corrupt (a record it claims to have folded was never posted).
        """

    def withdraw(self, handle: Any) -> None:
        """Take back a record its poster no longer stands by, so that no later write folds it.

        Only a backend that fences writes on their folded records (see ``set_state``) can promise
        that; elsewhere this does nothing, and the node's ended liveness removes what was folded.
        """

    def trim(self, cursor: int) -> None:
        """Tell the mailbox that every record up to ``cursor`` is folded; it may discard them."""


class Liveness(ABC):
    """Per-node proof of life, kept outside the shared state.

    A node calls ``beat`` at least every ``keep_alive_interval``; it counts as dead once ``ttl``
    seconds pass without one. ``forget`` ends a node's liveness at once (graceful exit).
    """

    @abstractmethod
    def beat(self, node_key: str, ttl: float, timeout: float | None = None, announcing: bool = False) -> None:
        """Record that ``node_key`` is alive for the next ``ttl`` seconds, giving up (with a
        ``RendezvousConnectionError``) after ``timeout`` seconds if given. ``announcing``: the
        node posts next (``Mailbox.post(..., poster=node_key)``), and a backend may leave the
        record of a node not yet alive to that post (etcd: one transaction for both); the node's
        next beat records it if no post came."""

    @abstractmethod
    def alive(self, node_keys: Collection[str], ttl: float, current: bool = False) -> set[str]:
        """Return the subset of ``node_keys`` that beat within the last ``ttl`` seconds.

        With ``current``, the answer comes from the server as it is now, not from a copy of it
        that may trail other nodes' changes (a write that completes a round asks so)."""

    @abstractmethod
    def forget(self, node_key: str) -> None:
        """Drop ``node_key``'s liveness; it is dead from now on."""

    @abstractmethod
    def held_since(self, node_key: str, token: Token, since: float) -> bool:
        """Whether ``node_key`` (a node this liveness beats for) has been alive, without a break,
        from the write of the stored state that carries ``token`` until now: no other node can
        have seen it dead since that write. A backend whose tokens tell when a write happened
        answers from ``token``; the others from ``since``, a time on the monotonic clock known
        to precede that write (a break after it, or a liveness that is not current, is a no)."""


@dataclass(frozen=True)
class QuarantineEntry:
    """A host kept out of a run: no node of it joins before ``until`` (UNIX time).

    Attributes:
        reason: why, for operators (a failed check's last output lines, lapses, an operator).
        strikes: consecutive failures that led here; the next cool-down doubles from it.
    """

    host: str
    until: float
    reason: str
    strikes: int = 1


class Quarantine(ABC):
    """Per-run quarantine of hosts, kept off the shared state. An entry ends by itself at its
    ``until`` (an etcd lease, an expiry time); ``get`` and ``entries`` never return an ended one."""

    @abstractmethod
    def put(self, entry: QuarantineEntry) -> None:
        """Quarantine ``entry.host`` until ``entry.until``, replacing any entry it had."""

    @abstractmethod
    def get(self, host: str) -> QuarantineEntry | None:
        """The host's entry, or ``None`` when it is not quarantined. A change made through
        another backend may take a moment to show (a process's watch-fed view, say); one made
        through this backend shows at once."""

    @abstractmethod
    def remove(self, host: str) -> None:
        """End the host's quarantine now."""

    @abstractmethod
    def entries(self) -> list[QuarantineEntry]:
        """Every quarantined host of the run, by host."""

    @abstractmethod
    def note_lapse(self, host: str, window: float) -> int:
        """Record that a node of ``host`` lost its liveness now; return how many lapses of the host
        (this one included) the run recorded within the last ``window`` seconds."""


class RendezvousBackend(ABC):
    """Holds the shared rendezvous state of one run.

    Fencing-token contract (torch's): ``set_state(state, None)`` writes only if no state exists;
    ``set_state(state, token)`` writes only if the stored state still carries ``token``. Either way
    the current state and its token come back, with ``has_set`` telling whether this call wrote.
    """

    # Whether the run's state outlives a time when the server cannot be reached (etcd, all of its
    # members down a while): torchrun's monitoring calls then answer from the last state known
    # until it is back (``outage.py``). A store that dies with its host never comes back.
    survives_outages = False

    @property
    @abstractmethod
    def name(self) -> str:
        """The backend's name, as torchrun was asked for it."""

    @abstractmethod
    def get_state(self, timeout: float | None = None) -> tuple[bytes, Token] | None:
        """Return the state and its fencing token, or ``None`` if the run has no state yet.

        Args:
            timeout: give up after about this many seconds, where the server is slow to answer
                (torchrun's monitoring calls, which poll); ``None``: the backend's own timeout.
                A backend whose calls fail within seconds anyway may ignore it.

        Raises:
            RendezvousConnectionError: the server could not be reached.
            RendezvousStateError: the stored value is not a state this backend wrote.
        """

    @abstractmethod
    def set_state(
        self,
        state: bytes,
        token: Token | None = None,
        fence: Sequence[Record] = (),
        member: str | None = None,
    ) -> tuple[bytes, Token, bool] | None:
        """Compare-and-set ``state`` against ``token``; return ``(state, token, has_set)``.

        ``fence`` holds the mailbox records (as ``read`` returned them) folded into ``state``; a
        backend that can withdraw records writes only if none of them was withdrawn (else
        ``has_set`` is false). ``member`` is the key of the writing node when ``state`` makes or
        keeps it a member: a backend that can check that node's liveness in the same write does.
        Returns ``None`` only when the state vanished between the write and the read-back.

        Raises:
            LivenessLapsed: the write did not land because ``member``'s liveness lapsed.
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
    @abstractmethod
    def mailbox(self) -> Mailbox:
        """Where joins and leaves are announced."""

    @property
    @abstractmethod
    def liveness(self) -> Liveness:
        """Where nodes beat. Heartbeats never rewrite the shared state."""

    @property
    @abstractmethod
    def quarantine(self) -> Quarantine:
        """The run's quarantined hosts."""

    def close(self) -> None:
        """Release what this backend holds (connections, leases, threads). Idempotent."""
