"""Real torchrun agents on both backends: a failing health check keeps a node out while the others
form the group; a quarantined host rejoins after its cool-down; stable ranks (in topology order)
survive a node's replacement by a spare. Each agent is a host of its own on loopback (127.0.0.N)."""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path

import pytest

from integration_tests.agents import FAST_CONF, AgentGroup, delete_etcd_run

pytestmark = pytest.mark.timeout(240)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["etcd-v2", "c10d_rdzv"])
def job(request, tmp_path):
    """An agent group on either backend; ``first`` holds the extra conf of the first agent (the
    c10d store's host)."""
    backend = request.param
    if backend == "etcd-v2":
        endpoint = request.getfixturevalue("etcd_endpoints")[0]
    else:
        endpoint = f"127.0.0.1:{free_port()}"
    group = AgentGroup(
        workdir=tmp_path, backend=backend, endpoint=endpoint, run_id=f"ranks-{uuid.uuid4().hex[:8]}",
        nnodes="2", conf=dict(FAST_CONF), env={"WORKER_PATIENCE": "120"},
    )
    yield group
    group.close()
    if backend == "etcd-v2":
        delete_etcd_run(endpoint, group.run_id)


def host_conf(job: AgentGroup, index: int) -> dict[str, str]:
    """The c10d store is hosted by the first agent only."""
    return {"is_host": "1" if index == 0 else "0"} if job.backend == "c10d_rdzv" else {}


def check_script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def started(job: AgentGroup, world_size: int, count: int, timeout: float, after: float = 0.0) -> dict[str, dict]:
    """Wait for ``count`` report.py workers in a world of ``world_size`` that started after the UNIX
    time ``after``; return them by tag."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {
            m["tag"]: m for m in job.results("started") if m["world_size"] == world_size and m["t"] > after
        }
        if len(found) >= count:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{count} workers of world size {world_size} did not start\n{job.logs()}")


def release(job: AgentGroup) -> None:
    (job.result_dir / "release").touch()


def test_a_failing_health_check_keeps_its_node_out_while_the_others_form_the_group(job, tmp_path):
    job.nnodes = "2:3"
    failing = check_script(tmp_path / "gpu_check.sh", "echo 'checking GPUs'\necho 'expected 8 GPUs, found 7' >&2\nexit 1\n")
    job.start("report.py", conf=host_conf(job, 0), env={"NODE_TAG": "a"}, local_addr="127.0.0.1")
    job.start("report.py", conf=host_conf(job, 1), env={"NODE_TAG": "b"}, local_addr="127.0.0.2")
    sick = job.start(
        "report.py", conf={**host_conf(job, 2), "join_timeout": "8", "health_cooldown": "1"},
        env={"NODE_TAG": "sick", "TORCH_RDZV_HEALTH_CHECK": failing}, local_addr="127.0.0.3",
    )
    group = started(job, world_size=2, count=2, timeout=90)
    assert set(group) == {"a", "b"} and sorted(m["group_rank"] for m in group.values()) == [0, 1]
    assert job.wait(timeout=60, agents=[sick]) != [0]
    log = sick.output()
    assert "gpu_check.sh" in log and "expected 8 GPUs, found 7" in log
    assert "its health check" in log and "kept failing" in log
    release(job)
    assert job.wait(timeout=60, agents=job.agents[:2]) == [0, 0], job.logs()
    assert not any(m["tag"] == "sick" for m in job.results("started"))


def test_a_quarantined_host_rejoins_after_its_cooldown(job, tmp_path):
    job.nnodes = "3"
    flag = tmp_path / "failed-once"
    # Fails the first time (a transient fault), passes from then on.
    flaky = check_script(tmp_path / "flaky.sh", f"if [ ! -e {flag} ]; then touch {flag}; echo 'disk full'; exit 1; fi\n")
    job.start("report.py", conf=host_conf(job, 0), env={"NODE_TAG": "a"}, local_addr="127.0.0.1")
    job.start("report.py", conf=host_conf(job, 1), env={"NODE_TAG": "b"}, local_addr="127.0.0.2")
    began = time.monotonic()
    flaky_agent = job.start(
        "report.py", conf={**host_conf(job, 2), "health_check": flaky, "health_cooldown": "4"},
        env={"NODE_TAG": "flaky"}, local_addr="127.0.0.3",
    )
    group = started(job, world_size=3, count=3, timeout=120)
    assert set(group) == {"a", "b", "flaky"}
    # The group could form only once the flaky host's cool-down had passed.
    assert time.monotonic() - began >= 4
    assert "quarantined for 4s" in flaky_agent.output() and "disk full" in flaky_agent.output()
    release(job)
    assert job.wait(timeout=60) == [0, 0, 0], job.logs()


def test_stable_ranks_in_topology_order_survive_a_replacement_by_a_spare(job):
    job.nnodes = "3"
    job.max_restarts = 3
    job.conf["rank_order"] = "topology"
    nodes = [("a", "127.0.0.1", "z2/r1"), ("b", "127.0.0.2", "z1/r1"), ("c", "127.0.0.3", "z1/r2")]
    agents = {}
    for index, (tag, addr, topology) in enumerate(nodes):
        env = {"NODE_TAG": tag, "TORCH_RDZV_TOPOLOGY": topology}
        agents[tag] = job.start("report.py", conf=host_conf(job, index), env=env, local_addr=addr)
    first = started(job, world_size=3, count=3, timeout=120)
    # Topology order: zone z1 (b, then c's rack) before z2 (a).
    assert {t: m["group_rank"] for t, m in first.items()} == {"b": 0, "c": 1, "a": 2}
    assert {t: m["topology"] for t, m in first.items()} == {"a": "z2/r1", "b": "z1/r1", "c": "z1/r2"}

    killed = time.time()
    agents["b"].kill()
    job.start(
        "report.py", conf=host_conf(job, 3), env={"NODE_TAG": "spare", "TORCH_RDZV_TOPOLOGY": "z2/r2"},
        local_addr="127.0.0.4",
    )
    # The survivors restart when their collective fails or, first, when the spare waits for the
    # place (torchrun's monitor path); either way in a new round.
    second = started(job, world_size=3, count=3, timeout=120, after=killed)
    # Fresh topology order would be c, a, spare; stable ranks keep c at 1 and a at 2 and give the
    # spare the free rank 0.
    assert {t: m["group_rank"] for t, m in second.items()} == {"spare": 0, "c": 1, "a": 2}, job.logs()
    release(job)
    survivors = [agents["a"], agents["c"], job.agents[-1]]
    assert job.wait(timeout=60, agents=survivors) == [0, 0, 0], job.logs()
