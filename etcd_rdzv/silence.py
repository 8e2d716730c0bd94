"""Telling a silent connection from a slow etcd, so that the client can leave the one for a new one.

A half-open connection (a NAT or firewall dropped its state, a middlebox holds its bytes) looks like
a quiet one: gRPC keeps the channel READY, and every call on it, the lease keep-alive streams, the
run view's watch and plain requests alike, waits for replies that never come. Measured with the
package defaults, a node's liveness lapsed 14.5 s into the silence, and gRPC's own keepalive pings
took 72 s to give up on the connection. So the client keeps, for each endpoint, when it last heard
anything on its channel (a keep-alive reply, a watch reply, a request's answer). A lease renewal that
gets no reply for ``silent_after(ttl)`` seconds on a channel that heard nothing else either is the
signal: a busy etcd is slow but not silent (the run view alone asks it for progress every second),
so the connection is abandoned and a new one dialled (``FailoverClient.redial``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# How long a renewal waits for its reply, on a channel that hears nothing else meanwhile, before
# the connection counts as silent: a fifth of the lease's TTL, so that the renewal is sent again on
# a new connection with most of the TTL left, and never less than this many seconds, so that a
# slow reply on a quiet channel is not taken for silence.
SILENT_FRACTION_OF_TTL = 0.2
MIN_SILENT_SECONDS = 2.0


def silent_after(ttl: float | None, limit: float) -> float:
    """Seconds without a word after which a channel that owes a renewal of a lease of ``ttl``
    seconds counts as silent; at most ``limit`` (a request attempt's timeout). ``None``: no TTL
    known, ``limit``."""
    if ttl is None:
        return limit
    return min(limit, max(MIN_SILENT_SECONDS, ttl * SILENT_FRACTION_OF_TTL))


class Hearing:
    """When each endpoint's channel last heard from etcd, on ``clock``. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._heard_at: dict[str, float] = {}

    def heard(self, label: str) -> None:
        """Something came in on the channel of endpoint ``label`` (or it was just dialled)."""
        now = self._clock()
        with self._lock:
            self._heard_at[label] = now

    def quiet_for(self, label: str) -> float:
        """Seconds since the channel of ``label`` last heard anything (infinite if never)."""
        with self._lock:
            heard_at = self._heard_at.get(label, float("-inf"))
        return self._clock() - heard_at
