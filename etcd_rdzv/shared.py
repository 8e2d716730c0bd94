"""Objects that the backends of one process share, one per key (a cluster, a run), kept while used."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Shared(Generic[K, V]):
    """``acquire(key)`` returns the one object for ``key``, made by ``make(key)`` on first use;
    ``release(key)`` once per ``acquire``, and the last release closes it with ``close(obj)``."""

    def __init__(self, make: Callable[[K], V], close: Callable[[V], None]) -> None:
        self._make = make
        self._close = close
        self._lock = threading.Lock()
        self._objects: dict[K, tuple[V, int]] = {}

    def acquire(self, key: K) -> V:
        with self._lock:
            if key in self._objects:
                obj, users = self._objects[key]
            else:
                obj, users = self._make(key), 0
            self._objects[key] = (obj, users + 1)
            return obj

    def release(self, key: K) -> None:
        with self._lock:
            obj, users = self._objects.pop(key)
            if users > 1:
                self._objects[key] = (obj, users - 1)
                return
        self._close(obj)
