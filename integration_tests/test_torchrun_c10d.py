"""Real torchrun agents rendezvousing through ``--rdzv-backend=c10d_rdzv``."""

import socket
import uuid

import pytest

from integration_tests.agents import AgentGroup


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def c10d_job(tmp_path):
    group = AgentGroup(
        workdir=tmp_path,
        backend="c10d_rdzv",
        endpoint=f"127.0.0.1:{free_port()}",
        run_id=f"c10d-{uuid.uuid4().hex[:8]}",
        nnodes="2",
        conf={"join_timeout": "60", "read_timeout": "30"},
    )
    yield group
    group.close()


def test_two_agents_all_reduce(c10d_job):
    c10d_job.start(conf={"is_host": "1"})
    c10d_job.start(conf={"is_host": "0"})
    assert c10d_job.wait(timeout=120) == [0, 0], c10d_job.logs()
    results = c10d_job.results()
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert {r["world_size"] for r in results} == {2}
    assert {r["sum"] for r in results} == {3.0}
    assert len({r["master"] for r in results}) == 1
