"""The TCPStore servers this process hosts, and why a forked child never destroys one.

A hosting ``TCPStore`` serves from a thread of the process that made it. ``fork()`` copies only the
forking thread, and glibc hands the vanished threads' descriptors to the child's next threads; so
destroying an inherited server in a child (when its garbage collector frees what only a parent's
thread kept alive, such as a handler nobody shut down) joins a thread that is gone or is now
another one: the child aborts ("std::system_error: Invalid argument") or hangs for ever. torch's
own agent tests fork agents from such a process.

So every server this package hosts (rank 0's trainer store, the c10d rendezvous store) is added to
``hosted``, which tracks it weakly, and a forked child keeps every server it inherited referenced
for the rest of its life: it is the parent's, and the parent still serves and ends it.
``hosted`` is the core's only process-wide mutable state (the etcd backend has its own registry).
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any


class HostedServers:
    """The live ``TCPStore`` servers of this process, weakly; in a forked child, those inherited."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: weakref.WeakSet[Any] = weakref.WeakSet()
        self._inherited: list[Any] = []

    def add(self, server: Any) -> Any:
        """Track ``server`` (a ``TCPStore`` made with ``is_master=True``) and return it."""
        with self._lock:
            self._live.add(server)
        return server

    def _after_fork_in_child(self) -> None:
        # A parent thread may have held the lock at the fork, and no thread here will release it.
        self._lock = threading.Lock()
        self._inherited.extend(self._live)
        self._live = weakref.WeakSet()


hosted = HostedServers()
os.register_at_fork(after_in_child=hosted._after_fork_in_child)
