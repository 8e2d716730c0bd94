"""Whole rendezvous over etcd: handlers from the plugin in threads, and real torchrun agents."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters

from benchmarks.answers import AnswerLog, check, record_rendezvous
from etcd_rdzv.plugin import create_handler

pytestmark = pytest.mark.timeout(90)


def test_handlers_form_a_group_and_report_their_backend_name(etcd_run):
    params = RendezvousParameters(
        backend="etcd-v2",
        endpoint=etcd_run.endpoint,
        run_id=etcd_run.run_id,
        min_nodes=3,
        max_nodes=3,
        key_prefix=etcd_run.key_prefix,
        read_timeout=10,
        join_timeout=30,
        last_call_timeout=1,
    )
    handlers = [create_handler(params) for _ in range(3)]
    answers = AnswerLog()
    try:
        assert {h.get_backend() for h in handlers} == {"etcd-v2"}
        with ThreadPoolExecutor(3) as pool:
            infos = list(pool.map(lambda h: record_rendezvous(h, answers), handlers))
        assert sorted(info.rank for info in infos) == [0, 1, 2]
        assert {info.world_size for info in infos} == {3}
        assert check(answers) == [], answers.describe()
        # The agents' store is shared: what rank 0 writes, every rank reads.
        infos[0].store.set("hello", "world")
        assert all(info.store.get("hello") == b"world" for info in infos)
    finally:
        for handler in handlers:
            handler.shutdown()


TRAINER = textwrap.dedent(
    """
    import os
    import torch.distributed as dist
    dist.init_process_group("gloo")
    dist.barrier()
    print(f"trainer rank={dist.get_rank()} world={dist.get_world_size()}", flush=True)
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_torchrun_agents_rendezvous_over_etcd_v2(etcd_run, scratch_dir):
    script = scratch_dir / "trainer.py"
    script.write_text(TRAINER)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=etcd-v2",
        f"--rdzv-endpoint={etcd_run.endpoint}",
        f"--rdzv-id={etcd_run.run_id}",
        f"--rdzv-conf=key_prefix={etcd_run.key_prefix},read_timeout=10,last_call_timeout=1",
        "--local-addr=127.0.0.1",
        "--max-restarts=0",
        "--monitor-interval=0.5",
        str(script),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
    env.pop("TORCH_RDZV_ETCD_V2_OVERRIDE", None)
    agents = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for _ in range(2)
    ]
    outputs = []
    try:
        for agent in agents:
            output, _ = agent.communicate(timeout=75)
            outputs.append(output)
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait(timeout=10)
    for agent, output in zip(agents, outputs):
        assert agent.returncode == 0, output[-4000:]
    lines = sorted(line for output in outputs for line in output.splitlines() if line.startswith("trainer "))
    assert lines == ["trainer rank=0 world=2", "trainer rank=1 world=2"], outputs
