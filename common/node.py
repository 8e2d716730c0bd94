"""The identity of a rendezvous node: ``NodeDesc``, and the generator of a process's nodes."""

from __future__ import annotations

import functools
import itertools
import os
import socket
import threading
from typing import NamedTuple


class _NodeFields(NamedTuple):
    addr: str
    pid: int
    local_id: int


class NodeDesc(_NodeFields):
    """One rendezvous participant: a handler in one process on one host.

    Its ordering, (addr, pid, local_id), is torch's rank order (``rank_order=sorted``); the other
    orders are in ``ranks.py``. A tuple, so that hashing and comparing one runs in C: every node of
    a large run puts every node of the state in a set at each read (the liveness checks), and a
    dataclass's Python ``__hash__`` and ``__eq__`` are several times slower.
    """

    @functools.cached_property
    def key(self) -> str:
        """A string naming this node in keys and logs, in torch's format ``addr_pid_localid``
        (kept once made: the liveness checks of a large run ask for it N times per node)."""
        return f"{self.addr}_{self.pid}_{self.local_id}"

    def __str__(self) -> str:
        return self.key


class NodeDescGenerator:
    """Creates distinct ``NodeDesc`` values for the handlers of this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count()

    def generate(self, local_addr: str | None = None) -> NodeDesc:
        """Return a new node for this process, addressed by ``local_addr`` or the host's FQDN."""
        with self._lock:
            local_id = next(self._ids)
        return NodeDesc(local_addr or socket.getfqdn(), os.getpid(), local_id)
