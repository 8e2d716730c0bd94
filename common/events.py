"""Rendezvous events and metrics on torch's own elastic channels, named as torch's handler names them.

Events. torch's ``DynamicRendezvousHandler`` records each step through
``construct_and_record_rdzv_event``, which names an event after the file that calls it and the
caller's class and method: ``dynamic_rendezvous.py:DynamicRendezvousHandler.next_rendezvous``.
Called from here it would name ours ``events.py:...``, and an event handler that picks torch's
events by name would miss ours. So ``record_event`` builds torch's ``RdzvEvent`` itself, under
torch's names (``HANDLER``, ``EXECUTOR``, ``STATE_HOLDER`` and the method), and records it through
torch's ``record_rdzv_event``: same destination (the ``dynamic_rendezvous`` events logger), same
fields, same messages, and like torch's function it costs nothing while no handler is installed.

Metrics. Each rendezvous reports its timings through ``torch.distributed.elastic.metrics`` in the
metric group ``rdzv`` (``report_timings``); a ``metrics.configure(handler, "rdzv")`` receives them.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass

from torch.distributed.elastic import metrics
from torch.distributed.elastic.events import NodeState, RdzvEvent, record_rdzv_event
from torch.distributed.elastic.events.handlers import get_logging_handler

from .node import NodeDesc
from .settings import RendezvousSettings

# torch's names for the source of an event: its file and the classes whose methods record them.
TORCH_SOURCE = "dynamic_rendezvous.py"
HANDLER = "DynamicRendezvousHandler"
EXECUTOR = "_DistributedRendezvousOpExecutor"
STATE_HOLDER = "_BackendRendezvousStateHolder"
EVENTS_DESTINATION = "dynamic_rendezvous"

METRIC_GROUP = "rdzv"


def record_event(
    settings: RendezvousSettings,
    node: NodeDesc,
    where: str,
    message: str,
    node_state: NodeState = NodeState.RUNNING,
    rank: int | None = None,
) -> None:
    """Record one rendezvous event of ``node`` as torch's ``where`` (``Class.method``) records it.

    A ``FAILED`` event carries the traceback of the exception being handled, as torch's do.
    """
    if isinstance(get_logging_handler(EVENTS_DESTINATION), logging.NullHandler):
        return
    record_rdzv_event(
        RdzvEvent(
            name=f"{TORCH_SOURCE}:{where}",
            run_id=settings.run_id,
            message=message,
            hostname=node.addr,
            pid=node.pid,
            node_state=node_state,
            rank=rank,
            local_id=node.local_id,
            error_trace=traceback.format_exc() if node_state == NodeState.FAILED else "",
        )
    )


@dataclass(frozen=True)
class RendezvousTimings:
    """How one ``next_rendezvous`` call spent its time (seconds) and its writes.

    ``join_wait``: until this node was a participant; ``last_call_wait``: from then until the round
    completed; ``writes``/``lost_writes``: compare-and-set attempts made and lost.
    """

    round: int
    join_wait: float
    last_call_wait: float
    total: float
    writes: int
    lost_writes: int


def report_timings(timings: RendezvousTimings) -> None:
    """Put one completed rendezvous's timings (milliseconds, as torch's ``prof`` reports
    durations) and compare-and-set writes into the metric group ``rdzv``."""
    for name, value in (
        ("next_rendezvous.success", 1),
        ("next_rendezvous.duration.ms", round(timings.total * 1000)),
        ("next_rendezvous.join_wait.ms", round(timings.join_wait * 1000)),
        ("next_rendezvous.last_call_wait.ms", round(timings.last_call_wait * 1000)),
        ("next_rendezvous.writes", timings.writes),
        ("next_rendezvous.lost_writes", timings.lost_writes),
    ):
        metrics.put_metric(name, value, METRIC_GROUP)


def report_failure() -> None:
    """Count a ``next_rendezvous`` that raised, in the metric group ``rdzv``."""
    metrics.put_metric("next_rendezvous.failure", 1, METRIC_GROUP)


# torch's executor method and message for each step a node takes itself, ``{round}`` being the
# round it acts on (torch names the next round for the wait and redundancy lists).
_STEPS = {
    "ADD_TO_PARTICIPANTS": ("_add_to_participants", "added itself to the participants of round {round}", 0),
    "ADD_TO_WAIT_LIST": ("_add_to_wait_list", "added itself to the wait list of round {round}", 1),
    "ADD_TO_REDUNDANCY_LIST": ("_add_to_redundancy_list", "added itself to the redundancy list of round {round}", 1),
    "REMOVE_FROM_PARTICIPANTS": ("_remove_from_participants", "removed itself from the participants of round {round}", 0),
    # torch has no such step: it leaves, then joins; the join's place is decided by the write that folds it.
    "REJOIN": ("_remove_from_participants", "removed itself from the participants of round {round} to join the next", 0),
    "REMOVE_FROM_WAIT_LIST": ("_remove_from_wait_list", "removed itself from the wait list of round {round}", 1),
    "REMOVE_FROM_REDUNDANCY_LIST": ("_remove_from_redundancy_list", "removed itself from the redundant list of round {round}", 1),
}


def record_step(settings: RendezvousSettings, node: NodeDesc, action_name: str, round_: int) -> None:
    """Record ``node`` taking the step ``action_name`` (an ``ops.Action`` name) in round ``round_``,
    if torch's executor records that step."""
    if action_name not in _STEPS:
        return
    method, what, ahead = _STEPS[action_name]
    message = (
        f"The node '{node}' {what.format(round=round_ + ahead)} of the rendezvous '{settings.run_id}'. Pending sync."
    )
    record_event(settings, node, f"{EXECUTOR}.{method}", message)


def record_write(
    settings: RendezvousSettings,
    node: NodeDesc,
    before: tuple[int, bool, bool],
    after: tuple[int, bool, bool],
    dropped: list[NodeDesc],
) -> None:
    """Record what a compare-and-set of ``node`` that won did: it dropped dead nodes, completed a
    round or closed the run (``before``/``after``: round, complete, closed of the stored state)."""
    run_id = settings.run_id
    if dropped:
        names = ", ".join(f"'{n}'" for n in dropped)
        message = (
            f"As part of the sync operation the node(s) {names} have been removed from the rendezvous "
            f"'{run_id}' since they had no heartbeat."
        )
        record_event(settings, node, f"{STATE_HOLDER}.sync", message)
    if after[1] and before[:2] != (after[0], True):
        message = f"The node '{node}' marked round {after[0]} of the rendezvous '{run_id}' as complete. Pending sync."
        record_event(settings, node, f"{EXECUTOR}._mark_rendezvous_complete", message, NodeState.SUCCEEDED)
    if after[2] and not before[2]:
        message = f"The node '{node}' marked the rendezvous '{run_id}' as closed. Pending sync."
        record_event(settings, node, f"{EXECUTOR}._mark_rendezvous_closed", message, NodeState.SUCCEEDED)
