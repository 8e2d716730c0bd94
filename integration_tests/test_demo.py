"""`make demo` and `make demo-quick` (``python -m etcd_rdzv.demo``) as a new user runs them: each
starts its own etcd and torchrun agents, exits 0 and says what happened in terms a reader can
follow (agents by name, each rendezvous's time, expected failures labelled, exited agents as
exited)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(300)


def demo(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_RDZV_")}
    result = subprocess.run(
        [sys.executable, "-m", "etcd_rdzv.demo", *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_demo_quick_names_its_agents_and_times_each_rendezvous():
    out = demo("--quick", timeout=240).stdout
    nodes = dict(re.findall(r"agent (\d) is node (127\.0\.0\.1_\d+_0)", out))
    assert sorted(nodes) == ["1", "2"], out
    ranks = sorted(re.findall(r"agent [12]: rendezvous round 0: rank (\d) of 2 in \d+\.\d\ds", out))
    assert ranks == ["0", "1"], out
    assert "Agents exited with status 0, 0" in out
    for number, node in nodes.items():
        assert re.search(rf"rank [01]: node {node} \(agent {number}\)", out), out
    assert "etcd stopped and its data directory removed." in out


@pytest.mark.slow
def test_demo_scales_up_loses_a_node_and_says_so_plainly():
    out = demo(timeout=280).stdout
    assert re.search(r"starting agent 1 \(node 127\.0\.0\.1_\d+_0\) and agent 2 \(node 127\.0\.0\.1_\d+_0\)", out), out
    assert "round 1 complete: world size 3 (agent 1 as rank 0, agent 2 as rank 1, agent 3 as rank 2)" in out, out
    # The survivors' trainers fail when their peer dies (and a trainer may when torchrun stops its
    # peers for the scale-up): said to be expected, where they do.
    errors = [line for line in out.splitlines() if "Error" in line]
    assert errors and all("<- expected: " in line for line in errors), errors
    assert any("<- expected: agent 2 was killed; torchrun restarts these workers" in line for line in errors), errors
    assert "agent 2 lost liveness" in out
    assert re.search(r"round 2 complete: world size 2 \(agent \d as rank 0, agent \d as rank 1\)", out), out
    assert "agents exited: agent 1 with status 0, agent 2 with status -9 (SIGKILL), agent 3 with status 0" in out
    final = out.split("Final status", 1)[1]
    assert "DEAD" not in final and final.count("exited (no liveness key; the run is closed)") == 2, final
    assert re.search(r"scale-up to 3 nodes +round complete after \d+\.\ds", out), out
    assert re.search(r"loss of a node \(SIGKILL\) +round complete after \d+\.\ds", out), out
