"""Waiting for a ``TCPStore`` key with a timeout, without ``TCPStore``'s own wait timeout.

A ``TCPStore.wait`` that times out cancels itself with one more round trip, and when several
clients time out at about the same time that round trip takes up to 5 s (torch 2.13, both
server implementations). Rendezvous waits time out all the time (every keep-alive interval), so
here one background call per key waits with a long timeout, on a connection of its own, and every
caller waiting for that key waits for the call's end with its own timeout, locally.
"""

from __future__ import annotations

import threading
from datetime import timedelta

from torch.distributed import DistNetworkError, Store
from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

from .calls import StoreCalls

# How long one background wait lasts before it gives up (and the next caller starts another).
BACKGROUND_WAIT_SECONDS = 60.0


class _Wait:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: RendezvousConnectionError | None = None


class KeyWaiter:
    """Waits for keys of ``calls.store``, a ``TCPStore``, on connections it opens (one at once).

    Raises:
        RendezvousConnectionError: the first connection could not be opened.
    """

    def __init__(self, calls: StoreCalls) -> None:
        self._calls = calls
        self._lock = threading.Lock()
        self._idle: list[Store] = [calls.clone()]
        self._waits: dict[str, _Wait] = {}
        self._closed = False

    def wait(self, key: str, timeout: float) -> None:
        """Return once ``key`` exists or ``timeout`` seconds passed, whichever is first.

        Raises:
            RendezvousConnectionError: the connection the wait ran on failed.
        """
        with self._lock:
            wait = self._waits.get(key)
            if wait is None:
                wait = self._waits[key] = _Wait()
                threading.Thread(
                    target=self._wait_in_background, args=(key, wait), name=f"c10d-rdzv-wait {key}", daemon=True
                ).start()
        if wait.done.wait(timeout) and wait.error is not None:
            raise wait.error

    def _wait_in_background(self, key: str, wait: _Wait) -> None:
        store: Store | None = None
        try:
            with self._lock:
                store = self._idle.pop() if self._idle else None
            if store is None:
                store = self._calls.clone()
            store.wait([key], timedelta(seconds=BACKGROUND_WAIT_SECONDS))
        except DistNetworkError as exc:
            wait.error = self._calls.failure("wait", key, exc)
            store = None  # a broken connection is not reused
        except RendezvousConnectionError as exc:
            wait.error = exc
        except RuntimeError:
            pass  # the long wait timed out; the next caller starts another
        finally:
            with self._lock:
                self._waits.pop(key, None)
                if store is not None and not self._closed:
                    self._idle.append(store)
            wait.done.set()

    def close(self) -> None:
        """Drop the idle connections; a wait still in progress drops its own when it ends."""
        with self._lock:
            self._closed = True
            self._idle = []
