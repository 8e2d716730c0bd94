"""Reads of etcd that the nodes of one process share while its run view cannot answer them.

A process of many nodes reads the run from its view (``view.py``); while the view cannot vouch for
a read (it trails a burst, or reloads after its stream went silent) each node asked etcd itself. At
N = 4,096 over 16 processes that turned one slow view into hundreds of reads of the whole mailbox
per process (23,341 in all, 925 MB), on an etcd already behind, which slowed it and the views
further. Here readers of the same thing board one *flight*: the first to arrive leads it, the ones
that come while it boards ride along, and it takes off once the flight before it has landed. So at
most one request per kind of read is in the air, and it serves every reader that boarded.

Every reader is answered by a request sent after it arrived, so a shared answer is as fresh as one
of its own: it holds every write the reader made or saw before it asked (``run.py``'s rule).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Hashable
from typing import Any


def _own_copy(error: BaseException) -> BaseException:
    """A copy of ``error`` for one reader: one exception object raised in many threads would gather
    all their tracebacks. An error whose class cannot be rebuilt from its arguments is shared."""
    try:
        return copy.copy(error)
    except Exception:
        return error


class _Flight:
    """One request, and its answer (or failure) for every reader aboard."""

    def __init__(self) -> None:
        self.landed = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class SharedReads:
    """Flights of reads: per kind, at most one boarding and one in the air."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._boarding: dict[Hashable, _Flight] = {}
        self._flying: dict[Hashable, _Flight] = {}

    def read(self, kind: Hashable, request: Callable[[], Any]) -> Any:
        """``request()``'s answer, shared with the readers of the same ``kind`` that board with
        this one. ``request`` must not depend on who calls it; ``kind`` names all it reads.

        Raises:
            whatever ``request`` raised, to every reader aboard (each gets a copy).
        """
        with self._lock:
            flight = self._boarding.get(kind)
            leads = flight is None
            if leads:
                flight = self._boarding[kind] = _Flight()
                ahead = self._flying.get(kind)
        if not leads:
            flight.landed.wait()
            if flight.error is not None:
                raise _own_copy(flight.error) from flight.error
            return flight.result
        if ahead is not None:
            ahead.landed.wait()
        with self._lock:
            # Boarding ends: a reader that comes from now on waits for the next flight, whose
            # request goes out after it arrived.
            del self._boarding[kind]
            self._flying[kind] = flight
        try:
            flight.result = request()
            return flight.result
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                del self._flying[kind]
            flight.landed.set()
