"""A node's view of a backend outage (``rdzv_common.outage``): what its monitoring calls report,
and when."""

from __future__ import annotations

import logging

from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from rdzv_common.outage import Outage
from rdzv_common.settings import RendezvousSettings
from rdzv_common.state import NodeDesc, RendezvousState
from unit_tests.torch_channels import torch_event_log, torch_metric_log

SETTINGS = RendezvousSettings("run-o", 1, 2)
NODE = NodeDesc("h", 1, 0)


class Clock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


def test_an_outage_is_reported_once_with_a_warning_an_event_and_a_metric(caplog):
    caplog.set_level(logging.INFO, logger="rdzv_common.outage")
    clock = Clock()
    outage = Outage(SETTINGS, NODE, enabled=True, clock=clock)
    state = RendezvousState(round=3)
    error = RendezvousConnectionError("etcd is away")
    with torch_event_log() as events, torch_metric_log() as metric_log:
        # A rendezvous that failed: no group to train on, nothing to report (its error is raised).
        assert outage.unreachable("next_rendezvous", error) is False
        assert outage.active
        assert outage.unreachable("_keep_alive", error, state) is True
        for _ in range(5):
            assert outage.unreachable("num_nodes_waiting", error, state) is True
        clock.now += 42
        outage.reached()
        assert not outage.active
        outage.reached()  # nothing more to tell
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "(RendezvousConnectionError: etcd is away)" in warnings[0] and "round 3: 0 participants, 0 waiting" in warnings[0]
    assert "after 42.0s" in caplog.records[-1].getMessage()
    (event,) = events.events
    assert event["name"] == "dynamic_rendezvous.py:DynamicRendezvousHandler._keep_alive"
    assert metric_log.values("backend.unreachable") == [1]
    assert metric_log.values("backend.unreachable.duration.ms") == [42000]


def test_an_outage_no_formed_node_saw_is_not_reported(caplog):
    """A node whose rendezvous could not reach the backend (at start, say) raises its error; the
    outage only keeps its shutdown from waiting for the backend once more."""
    caplog.set_level(logging.INFO, logger="rdzv_common.outage")
    outage = Outage(SETTINGS, NODE, enabled=True)
    outage.unreachable("next_rendezvous", RendezvousConnectionError("away"))
    outage.reached()
    assert caplog.records == []


def test_a_backend_whose_state_dies_with_its_host_has_no_outages():
    """c10d_rdzv's store lives in the hosting agent: once it is unreachable it is gone, and every
    call must fail (``integration_tests/test_c10d_host_loss.py``)."""
    outage = Outage(SETTINGS, NODE, enabled=False)
    assert outage.unreachable("num_nodes_waiting", RendezvousConnectionError("gone"), RendezvousState()) is False
    assert not outage.active
