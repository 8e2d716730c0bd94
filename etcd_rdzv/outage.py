"""Telling the operator that etcd does not answer: one warning a few seconds into an outage, one
line when it answers again.

A request retries for up to its budget (``read_timeout``, 60 s by default) before it fails, and a
rendezvous handler's next step waits for that: an endpoint that refuses every connection (a
mistyped port, etcd down) was first reported 124 s after the start, by the third request that gave
up. The client notes each attempt that found no endpoint answering, and warns once when that has
gone on for ``WARN_AFTER_SECONDS`` with no answer between; the requests themselves go on trying.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

# Long enough for a leader election or a restart to pass unreported, short enough that a node
# that cannot reach etcd at all says so long before its first request gives up.
WARN_AFTER_SECONDS = 3.0


class Unanswered:
    """The current stretch of attempts that found no endpoint answering, for one client.

    Args:
        where: the endpoints, for messages (``etcd at http://host:2379``).
        budget: what the requests retry for, for the warning.
        clock: monotonic time.
    """

    def __init__(self, where: str, budget: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._where = where
        self._budget = budget
        self._clock = clock
        self._lock = threading.Lock()
        self._since: float | None = None
        self._warned = False

    def failed(self, cause: str) -> None:
        """An attempt found no endpoint answering; ``cause`` is its error, for the warning."""
        now = self._clock()
        with self._lock:
            if self._since is None:
                self._since = now
            warn = not self._warned and now - self._since >= WARN_AFTER_SECONDS
            self._warned = self._warned or warn
            since = self._since
        if warn:
            logger.warning(
                "%s has served no request for %.0fs (last error %s); requests go on trying, each for up to %s.",
                self._where, now - since, cause, self._budget,
            )

    def answered(self) -> None:
        """A request got its answer: the stretch, if any, is over."""
        if self._since is None:  # the common case, without the lock
            return
        now = self._clock()
        with self._lock:
            since, warned = self._since, self._warned
            self._since, self._warned = None, False
        if since is not None and warned:
            logger.info("%s answers again, after %.1fs.", self._where, now - since)
