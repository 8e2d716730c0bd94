"""One node's view of a backend outage, and what torchrun's monitoring calls answer meanwhile.

While its workers train, torchrun's agent calls ``num_nodes_waiting()`` every monitor interval, and
an exception from it ends the agent (and its training). A backend whose state outlives an outage
(``RendezvousBackend.survives_outages``: etcd restarted for an upgrade, or all its members down a
while) cannot have changed meanwhile: no node could join, leave or close the run. So while the
backend cannot be reached, the monitoring calls answer from the last state known, the heartbeats
go on trying, and only a new rendezvous needs the backend.

The outage starts with the first call of the node that found the backend unreachable and ends with
the next that reached it (a heartbeat, within a keep-alive interval of the backend's return).
Meanwhile the monitoring calls do not ask the backend at all: each would wait out the backend's own
timeout. A node of a formed group reports an outage once, when it begins: a warning (in place of
the heartbeat's), a torch rendezvous event and the metric ``rdzv.backend.unreachable``; its end
with one line and its length (``rdzv.backend.unreachable.duration.ms``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from torch.distributed.elastic import metrics
from torch.distributed.elastic.events import NodeState

from .events import HANDLER, METRIC_GROUP, record_event
from .node import NodeDesc
from .settings import RendezvousSettings
from .state import RendezvousState

logger = logging.getLogger(__name__)


class Outage:
    """Whether this node's calls find the backend unreachable now.

    Args:
        enabled: whether the backend's state survives an outage; if not, no outage is ever
            ``active`` (a call that fails, fails).
        clock: monotonic time.
    """

    def __init__(
        self,
        settings: RendezvousSettings,
        node: NodeDesc,
        enabled: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._node = node
        self._enabled = enabled
        self._clock = clock
        self._lock = threading.Lock()
        self._since: float | None = None
        self._reported = False

    @property
    def active(self) -> bool:
        """A call found the backend unreachable, and none reached it since."""
        return self._since is not None

    def unreachable(self, method: str, error: Exception, state: RendezvousState | None = None) -> bool:
        """A call of this node, ``method``, could not reach the backend (``error``). ``state``: the
        last state known, where the node is in a formed group (a heartbeat or a monitoring call
        failed); the outage is then reported, once.

        Returns:
            Whether the outage is reported here or was already (its failures need no warning of
            their own).
        """
        if not self._enabled:
            return False
        with self._lock:
            if self._since is None:
                self._since = self._clock()
            report = state is not None and not self._reported
            self._reported = self._reported or report
            reported = self._reported
        if report:
            message = (
                f"The node '{self._node}' cannot reach the backend of the rendezvous "
                f"'{self._settings.run_id}' ({type(error).__name__}: {error}). Until it can, its "
                f"heartbeats go on trying every {self._settings.keep_alive_interval:g}s, "
                f"num_nodes_waiting() and is_closed() answer from the last state known (round "
                f"{state.round}: {len(state.participants)} participants, {len(state.wait_list)} waiting"
                f"{', closed' if state.closed else ''}), and no node can join, leave or close the run: "
                f"training goes on, and only a new rendezvous needs the backend."
            )
            logger.warning(message)
            record_event(self._settings, self._node, f"{HANDLER}.{method}", message, NodeState.RUNNING)
            metrics.put_metric("backend.unreachable", 1, METRIC_GROUP)
        return reported

    def reached(self) -> None:
        """A call of this node reached the backend: the outage, if any, is over."""
        if self._since is None:  # the common case, without the lock
            return
        with self._lock:
            since, reported = self._since, self._reported
            self._since, self._reported = None, False
        if since is None or not reported:
            return
        lasted = self._clock() - since
        metrics.put_metric("backend.unreachable.duration.ms", round(lasted * 1000), METRIC_GROUP)
        logger.info(
            "The node '%s' reaches the backend of the rendezvous '%s' again, after %.1fs.",
            self._node, self._settings.run_id, lasted,
        )
