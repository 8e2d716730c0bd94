"""Real torchrun agents rendezvousing through ``--rdzv-backend=etcd-v2`` (our etcd v3 backend)."""

import os
import re
import uuid

import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters

from benchmarks.answers import check_worker_results
from etcd_rdzv.factory import create_backend
from integration_tests.agents import FAST_CONF, AgentGroup, etcd_agent_group
from rdzv_common.codec import decode_state

@pytest.fixture
def etcd_job(tmp_path, etcd_endpoints):
    with etcd_agent_group(
        tmp_path, etcd_endpoints[0], f"etcd-{uuid.uuid4().hex[:8]}", nnodes="2", conf=dict(FAST_CONF)
    ) as group:
        yield group


def read_state(job: AgentGroup):
    backend, _ = create_backend(RendezvousParameters("etcd-v2", job.endpoint, job.run_id, 1, 1), name="etcd-v2")
    try:
        value = backend.get_state()
        return decode_state(value[0]) if value else None
    finally:
        backend.close()


def test_two_agents_all_reduce_over_etcd_v2(etcd_job):
    etcd_job.start()
    etcd_job.start()
    assert etcd_job.wait(timeout=120) == [0, 0], etcd_job.logs()
    results = etcd_job.results()
    assert check_worker_results(results) == [], results
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert {r["world_size"] for r in results} == {2}
    assert {r["sum"] for r in results} == {3.0}
    # torchrun shows no INFO line of torch's handler, nor of any logger it did not make; ours is
    # one line per completed round, at torchrun's default log level.
    assert "LOGLEVEL" not in os.environ, "the test checks torchrun's default log level"
    for agent in etcd_job.agents:
        joined = re.findall(
            rf"has joined round 0 of the rendezvous '{etcd_job.run_id}' as rank [01] in a world of size 2 "
            r"\(total \d+\.\d+s", agent.output()
        )
        assert len(joined) == 1, agent.output()


def test_scale_up_restarts_workers_with_world_size_three(etcd_job):
    etcd_job.nnodes = "2:3"
    etcd_job.env = {"EXPECT_WORLD": "3"}
    etcd_job.start()
    etcd_job.start()
    etcd_job.wait_for_started(world_size=2, count=2, timeout=90)
    etcd_job.start()
    assert etcd_job.wait(timeout=150) == [0, 0, 0], etcd_job.logs()
    results = etcd_job.results()
    assert check_worker_results(results) == [], results
    assert sorted(r["rank"] for r in results) == [0, 1, 2]
    assert {r["world_size"] for r in results} == {3}
    assert {r["sum"] for r in results} == {6.0}
    # The late node joined in a later round and still found the round's trainer store.
    assert len({r["master"] for r in results}) == 1


def test_a_failed_worker_restarts_every_worker_in_a_new_round(etcd_job):
    etcd_job.max_restarts = 1
    etcd_job.env = {"FAIL_FIRST_RUN_RANK": "1"}
    etcd_job.start()
    etcd_job.start()
    assert etcd_job.wait(timeout=150) == [0, 0], etcd_job.logs()
    results = etcd_job.results()
    assert check_worker_results(results) == [], results
    # Both agents restarted their workers through a new rendezvous round, whose trainer store
    # the restarted workers met on.
    assert sorted((r["rank"], r["restart"]) for r in results) == [(0, 1), (1, 1)]
    assert {r["sum"] for r in results} == {3.0}
    assert len({r["master"] for r in results}) == 1
    assert read_state(etcd_job).round >= 1


def test_node_loss_survivors_re_rendezvous_and_dead_node_leaves_state(etcd_job):
    etcd_job.nnodes = "2:3"
    etcd_job.max_restarts = 3
    etcd_job.env = {"EXPECT_WORLD": "2"}
    agents = [etcd_job.start() for _ in range(3)]
    etcd_job.wait_for_started(world_size=3, count=3, timeout=90)
    victim = agents[2]
    victim.kill()
    assert etcd_job.wait(timeout=150, agents=agents[:2]) == [0, 0], etcd_job.logs()
    results = etcd_job.results()
    assert check_worker_results(results) == [], results
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert {r["world_size"] for r in results} == {2}
    # Survivors shut down (closing the run); the killed agent is in no list of the final state.
    state = read_state(etcd_job)
    assert state is not None and state.closed
    assert victim.proc.pid not in {n.pid for n in state.nodes()}
