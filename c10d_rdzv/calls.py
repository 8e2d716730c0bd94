"""Store operations with torch's rendezvous errors in place of the store's own."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.distributed import FileStore, Store, TCPStore
from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

# Never a value this package stores: states start with a hex nonce, logs with a digit, heartbeats
# with a number.
_ABSENT = b"\x00absent"


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
        return RendezvousConnectionError(f"The c10d store ({self.where}) failed to {op} '{subject}': {exc}")

    def peek(self, key: str) -> bytes | None:
        """Return the value of ``key``, or ``None`` if it is absent, in one request that never blocks.

        ``get`` would block until the key appears. ``compare_set`` does not: on an absent key with a
        non-empty expected value it writes nothing and echoes that value back, and on a present key
        (which never holds ``_ABSENT``) it writes nothing and returns the value.
        """
        value = self("compare_set", key, _ABSENT, _ABSENT)
        return None if value == _ABSENT else value

    def clone(self) -> Store:
        """A new connection to the same store, for blocking calls that must not hold up others."""
        try:
            return self.store.clone()
        except (RuntimeError, TimeoutError) as exc:
            raise RendezvousConnectionError(f"The c10d store ({self.where}) failed to clone: {exc}") from exc
