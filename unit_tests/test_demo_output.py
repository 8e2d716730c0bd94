"""What the demo makes of the lines it reads: the handler's line for each completed round, and
node ids named as the demo's agents."""

from __future__ import annotations

import logging

import torch.distributed as dist

from etcd_rdzv.demo import AgentNames, rendezvous_time
from rdzv_common.handler import DynamicRendezvousHandler
from rdzv_common.memory import MemoryBackend, MemoryStore


def test_the_handlers_line_for_a_completed_round_reads_as_its_time(caplog):
    backend = MemoryBackend(MemoryStore(), "demo-run")
    handler = DynamicRendezvousHandler.from_backend("demo-run", dist.HashStore(), backend, 1, 1, local_addr="127.0.0.1")
    try:
        with caplog.at_level(logging.INFO, logger="rdzv_common.handler"):
            handler.next_rendezvous()
    finally:
        handler.shutdown()
    said = [rendezvous_time(r.getMessage()) for r in caplog.records]
    [line] = [s for s in said if s is not None]
    assert line.startswith("rendezvous round 0: rank 0 of 1 in ") and "join wait" in line and "last call" in line
    assert rendezvous_time("[rank 0/2] step 3 loss 0.1") is None


def test_node_ids_read_as_the_agents_they_are():
    names = AgentNames()
    assert names.add(41, "agent 1") == "127.0.0.1_41_0"
    names.add(43, "agent 2")
    assert names("round 0 complete: world size 2 (127.0.0.1_41_0=0, 127.0.0.1_43_0=1)") == (
        "round 0 complete: world size 2 (agent 1 as rank 0, agent 2 as rank 1)"
    )
    assert names("node 127.0.0.1_43_0 lost liveness (participant, rank 1)") == "agent 2 lost liveness (participant, rank 1)"
    assert names("round 1: +127.0.0.1_41_0 joined the wait list") == "round 1: +agent 1 joined the wait list"
    assert names("node 127.0.0.1_99_0 is alive") == "node 127.0.0.1_99_0 is alive"  # not one of the demo's
