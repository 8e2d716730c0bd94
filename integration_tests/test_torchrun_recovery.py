"""Elastic recovery the way torchrun drives it: real agents whose workers never fail.

torchrun's agent calls ``next_rendezvous()`` once, then, while its workers train, polls
``num_nodes_waiting()`` every monitor interval and restarts its workers as soon as it is above 0.
That is the only way a hot spare replaces a dead node before the workers' collectives time out
(NCCL's default is 10 minutes), so the workers here run no collective at all: nothing but the
monitor path can restart them. Both backends; each test checks what every worker was told
(world size, its rank, the trainers' store) by its agent, generation after generation.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

from integration_tests.agents import FAST_CONF, AgentGroup, delete_etcd_run

pytestmark = pytest.mark.timeout(240)

SCRIPT = "train_until_stopped.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["etcd-v2", "c10d_rdzv"])
def job(request, tmp_path: Path, etcd_endpoints):
    backend = request.param
    run_id = f"recovery-{uuid.uuid4().hex[:8]}"
    endpoint = etcd_endpoints[0] if backend == "etcd-v2" else f"127.0.0.1:{free_port()}"
    conf = {**FAST_CONF, "last_call_timeout": "2"}
    group = AgentGroup(workdir=tmp_path, backend=backend, endpoint=endpoint, run_id=run_id, nnodes="2", conf=conf)
    try:
        yield group
    finally:
        group.close()
        if backend == "etcd-v2":
            delete_etcd_run(endpoint, run_id)


def start(job: AgentGroup, name: str, first: bool = False):
    """Start agent ``name``; on c10d the first agent hosts the store (and is never killed)."""
    conf = {"is_host": "1" if first else "0"} if job.backend == "c10d_rdzv" else None
    return job.start(SCRIPT, conf=conf, env={"AGENT": name})


def generations(job: AgentGroup) -> list[list[dict]]:
    """The workers' starts grouped by the trainers' store they were handed (one per round), in
    the order the rounds started."""
    by_store: dict[str, list[dict]] = defaultdict(list)
    for started in job.results("started"):
        by_store[started["master"]].append(started)
    return sorted(by_store.values(), key=lambda g: min(s["t"] for s in g))


def wait_for_generation(job: AgentGroup, agents: set[str], timeout: float) -> list[dict]:
    """The newest generation once it holds a worker of exactly ``agents``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = generations(job)
        if found and {s["agent"] for s in found[-1]} == agents:
            return found[-1]
        time.sleep(0.2)
    raise AssertionError(f"no round of {sorted(agents)} started; rounds: {generations(job)}\n{job.logs()}")


def check_told(generation: list[dict]) -> dict[str, int]:
    """Every worker of a round was told the same world, and ranks 0..n-1 once each; returns each
    agent's group rank."""
    sizes = {s["world_size"] for s in generation}
    assert len(sizes) == 1, generation
    (size,) = sizes
    assert sorted(s["group_rank"] for s in generation) == list(range(size)), generation
    assert {s["group_world_size"] for s in generation} == {size}
    return {s["agent"]: s["group_rank"] for s in generation}


def finish(job: AgentGroup, agents: list) -> None:
    (job.result_dir / "stop").touch()
    assert job.wait(timeout=90, agents=agents) == [0] * len(agents), job.logs()


def test_a_spare_replaces_a_dead_participant_through_the_monitor_path(job):
    a, b = start(job, "a", first=True), start(job, "b")
    first = check_told(wait_for_generation(job, {"a", "b"}, 90))
    spare = start(job, "spare")  # min = max = 2: it waits for a free place
    time.sleep(3)
    assert len(generations(job)) == 1, "the spare restarted a full group"
    b.kill()
    second = check_told(wait_for_generation(job, {"a", "spare"}, 60))
    assert second["a"] == first["a"]  # the survivor keeps its rank
    assert second["spare"] == first["b"]  # the spare takes the dead node's place
    finish(job, [a, spare])


def test_a_dead_node_then_a_newcomer_re_forms_the_group(job):
    job.nnodes = "2:3"
    a, b, c = start(job, "a", first=True), start(job, "b"), start(job, "c")
    first = check_told(wait_for_generation(job, {"a", "b", "c"}, 90))
    c.kill()
    time.sleep(4)  # the dead node's liveness lapses; the survivors train on
    assert len(generations(job)) == 1, "a group that lost a member with nobody waiting restarted"
    late = start(job, "late")
    second = check_told(wait_for_generation(job, {"a", "b", "late"}, 60))
    assert (second["a"], second["b"]) == (first["a"], first["b"])  # stable ranks
    assert second["late"] == first["c"]
    finish(job, [a, b, late])
