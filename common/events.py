"""Recording rendezvous events through torch's elastic event system, as torch's handler does."""

from __future__ import annotations

from torch.distributed.elastic.events import NodeState, construct_and_record_rdzv_event

from .settings import RendezvousSettings
from .state import NodeDesc


def record_event(
    settings: RendezvousSettings,
    node: NodeDesc,
    message: str,
    node_state: NodeState = NodeState.RUNNING,
    rank: int | None = None,
    name: str = "DynamicRendezvousHandler",
) -> None:
    """Record one rendezvous event for ``node`` of ``settings.run_id``."""
    construct_and_record_rdzv_event(
        name=name,
        run_id=settings.run_id,
        message=message,
        node_state=node_state,
        hostname=node.addr,
        pid=node.pid,
        local_id=node.local_id,
        rank=rank,
    )
