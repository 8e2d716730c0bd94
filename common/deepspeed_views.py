"""Read-only views of torch's private handler attributes that third-party agents read.

DeepSpeed's elastic agent (``deepspeed/elasticity/elastic_agent.py``, ``DSElasticAgent._invoke_run``)
reaches into torch's ``DynamicRendezvousHandler``::

    rdzv_handler._state_holder.state.participants          # node -> rank
    rdzv_handler._state_holder.state.last_heartbeats       # node -> datetime
    rdzv_handler._settings.keep_alive_interval             # timedelta
    rdzv_handler._settings.keep_alive_max_attempt          # int

and computes ``datetime.utcnow() - keep_alive_interval * keep_alive_max_attempt`` to compare with
the heartbeats. Our handler keeps none of these (liveness lives in the backend, not in the state),
so it offers them as views with torch's types: ``_settings`` is torch's own ``RendezvousSettings``,
``_state_holder.state`` a snapshot with the fields of torch's ``_RendezvousState``. This is a
compatibility surface, not an API: the views are rebuilt on each read and writing to them changes
nothing.

``last_heartbeats`` comes from our liveness: for this node, its last heartbeat; for every other node
of the state, the last time the backend confirmed it alive (asked afresh once that is older than
``keep_alive_interval``); a node the backend reports dead has no entry. Times are naive UTC, as
``datetime.utcnow()`` gives and DeepSpeed compares them with (torch 2.13 itself stores aware ones,
which that comparison would refuse).

Here the package offers torch's private names to another agent; where the package itself reaches
past torch's public API, and what differs between torch versions, is ``torch_private.py``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from torch.distributed.elastic.rendezvous.dynamic_rendezvous import RendezvousSettings as TorchSettings
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import RendezvousTimeout

from .node import NodeDesc
from .settings import RendezvousSettings

if TYPE_CHECKING:
    from .executor import OpExecutor


def torch_settings(settings: RendezvousSettings) -> TorchSettings:
    """``settings`` as torch's ``RendezvousSettings`` (timedeltas where torch has them)."""
    return TorchSettings(
        run_id=settings.run_id,
        min_nodes=settings.min_nodes,
        max_nodes=settings.max_nodes,
        timeout=RendezvousTimeout(
            join=timedelta(seconds=settings.join_timeout),
            last_call=timedelta(seconds=settings.last_call_timeout),
            close=timedelta(seconds=settings.close_timeout),
            heartbeat=timedelta(seconds=settings.heartbeat_timeout),
        ),
        keep_alive_interval=timedelta(seconds=settings.keep_alive_interval),
        keep_alive_max_attempt=settings.keep_alive_max_attempt,
    )


@dataclass(frozen=True)
class TorchStateView:
    """A snapshot with the fields of torch's ``_RendezvousState``."""

    round: int
    complete: bool
    deadline: datetime | None
    closed: bool
    participants: dict[NodeDesc, int]
    wait_list: set[NodeDesc]
    redundancy_list: set[NodeDesc]
    last_heartbeats: dict[NodeDesc, datetime]


class TorchStateHolderView:
    """torch's ``_state_holder``, read-only: ``state`` is a fresh ``TorchStateView`` per read."""

    def __init__(self, executor: OpExecutor, lock: threading.Lock) -> None:
        self._executor = executor
        self._lock = lock

    @property
    def state(self) -> TorchStateView:
        with self._lock:
            state = self._executor.state
            node = self._executor.node
            others = state.nodes() - {node}
            seen = self._executor.seen_alive(others) if others else {}
            if node in state.nodes() and self._executor.last_beat is not None:
                seen[node.key] = self._executor.last_beat
            now_mono, now_utc = time.monotonic(), datetime.now(timezone.utc).replace(tzinfo=None)
            heartbeats = {
                n: now_utc - timedelta(seconds=now_mono - seen[n.key]) for n in state.nodes() if n.key in seen
            }
            deadline = None if state.deadline is None else datetime.fromtimestamp(state.deadline, timezone.utc)
            return TorchStateView(
                round=state.round,
                complete=state.complete,
                deadline=deadline,
                closed=state.closed,
                participants=dict(state.participants),
                wait_list=set(state.wait_list),
                redundancy_list=set(state.redundancy_list),
                last_heartbeats=heartbeats,
            )
