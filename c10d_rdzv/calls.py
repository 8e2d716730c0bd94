"""Store operations with torch's rendezvous errors in place of the store's own."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

from torch.distributed import DistNetworkError, FileStore, Store, TCPStore
from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

from rdzv_common.torch_private import clone_tcp_store

# Never a value this package stores: states start with a hex nonce, logs with a digit or '@',
# heartbeats with a number.
_ABSENT = b"\x00absent"

# How long a new connection to a TCPStore that was reached before may take to be accepted. The
# server is known to have run, so a refusal or silence means it is gone; TCPStore's own connect
# would retry for twice its timeout (read_timeout) first.
RECONNECT_PROBE_SECONDS = 3.0


def host_lost_advice(where: str) -> str:
    """What a lost TCPStore of the c10d rendezvous means, and what to use instead."""
    return (
        f"The c10d rendezvous store ({where}) lives in the process of the agent that hosts it, so "
        "that agent has exited, died or become unreachable; a job on a c10d backend cannot "
        "survive the loss of its hosting agent. Use the etcd backend (--rdzv-backend=etcd-v2 or "
        "etcd_rdzv) for a job that must outlive any one agent."
    )


def brief(exc: BaseException) -> str:
    """``exc``'s message without the C++ backtrace that c10d appends to it."""
    text = str(exc).split("\nException raised from", 1)[0].strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe(store: Store) -> str:
    """Name ``store`` for messages: its kind and where it is."""
    if isinstance(store, TCPStore):
        return f"TCPStore {store.host}:{store.port}"
    if isinstance(store, FileStore):
        return f"FileStore {store.path}"
    return type(store).__name__


class StoreCalls:
    """Runs operations on one store; any store failure surfaces as ``RendezvousConnectionError``."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.where = describe(store)
        # Set once a connection to the TCPStore broke: its server is gone for good (a TCPStore
        # never comes back at the same endpoint within a job).
        self.lost = False

    def __call__(self, op: str, key: str | Sequence[str], *args: Any) -> Any:
        """Return ``store.<op>(key, *args)``.

        Raises:
            RendezvousConnectionError: the store failed; the message names it, ``op`` and ``key``.
        """
        try:
            return getattr(self.store, op)(key, *args)
        except (RuntimeError, TimeoutError) as exc:
            raise self.failure(op, key, exc) from exc

    def failure(self, op: str, key: str | Sequence[str], exc: BaseException) -> RendezvousConnectionError:
        """The error that reports ``exc``, raised by ``op`` on ``key``."""
        subject = key if isinstance(key, str) else ", ".join(key)
        cause = brief(exc)
        message = f"The c10d store ({self.where}) failed to {op} '{subject}': {cause}"
        message += "" if cause.endswith((".", "?", "!")) else "."
        if isinstance(self.store, TCPStore) and isinstance(exc, DistNetworkError):
            # The connection broke (reset, broken pipe, closed): the hosting process is gone.
            self.lost = True
            message += " " + host_lost_advice(self.where)
        return RendezvousConnectionError(message)

    def peek(self, key: str) -> bytes | None:
        """Return the value of ``key``, or ``None`` if it is absent, in one request that never blocks.

        ``get`` would block until the key appears. ``compare_set`` does not: on an absent key with a
        non-empty expected value it writes nothing and echoes that value back, and on a present key
        (which never holds ``_ABSENT``) it writes nothing and returns the value.
        """
        value = self("compare_set", key, _ABSENT, _ABSENT)
        return None if value == _ABSENT else value

    def replace(self, key: str, expected: bytes, desired: bytes) -> tuple[bool, bytes | None]:
        """Set ``key`` to ``desired`` if it holds ``expected``, in one atomic request.

        ``expected`` must be non-empty (an empty one means "create if absent") and differ from
        ``desired``. Returns whether the value was replaced, and the value ``key`` holds now
        (``None`` if it is absent: ``compare_set`` then echoes ``expected``, which a present key
        holding it would have swapped for ``desired``).
        """
        value = self("compare_set", key, expected, desired)
        if value == desired:
            return True, value
        return False, None if value == expected else value

    def clone(self) -> TCPStore:
        """A new connection to the same ``TCPStore``, for blocking calls that must not hold up others.

        Raises:
            RendezvousConnectionError: within seconds once the TCPStore's server is gone.
        """
        self._probe()
        try:
            return clone_tcp_store(self.store)
        except (RuntimeError, TimeoutError) as exc:
            raise self.failure("clone", "the store connection", exc) from exc

    def _probe(self) -> None:
        """Check that the TCPStore's server still accepts connections, within seconds."""
        if not self.lost:
            try:
                with socket.create_connection((self.store.host, self.store.port), RECONNECT_PROBE_SECONDS):
                    return
            except OSError as exc:
                self.lost = True
                problem = f"no new connection is accepted ({exc})"
        else:
            problem = "an earlier connection to it broke"
        raise RendezvousConnectionError(
            f"The c10d store ({self.where}) is gone: {problem}. {host_lost_advice(self.where)}"
        )
