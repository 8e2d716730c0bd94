"""Launching real ``torchrun`` agent processes for the integration tests, and cleaning them up."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from torch.distributed.elastic.rendezvous import RendezvousParameters

from etcd_rdzv.factory import create_backend

SCRIPTS = Path(__file__).parent / "scripts"

# ``--rdzv-conf`` for agents of a test: quick to notice a dead node and to end a last call, and
# patient with a busy machine.
FAST_CONF = {
    "join_timeout": "90",
    "last_call_timeout": "2",
    "keep_alive_interval": "1",
    "keep_alive_max_attempt": "2",
    "read_timeout": "20",
}


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``, children first, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # The parent pid is the 2nd field after the parenthesised command name.
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass
class Agent:
    """One torchrun agent in its own process group (so its workers die with it)."""

    proc: subprocess.Popen
    log: Path

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the agent and every process under it, as if its machine died.

        torchrun starts workers in sessions of their own, so the agent's process group alone
        would leave them running.
        """
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class AgentGroup:
    """Agents of one job sharing a result directory; ``close`` kills whatever still runs."""

    workdir: Path
    backend: str
    endpoint: str
    run_id: str
    nnodes: str
    conf: dict[str, str] = field(default_factory=dict)
    max_restarts: int = 0
    env: dict[str, str] = field(default_factory=dict)
    nproc_per_node: int = 1
    start_method: str | None = None  # torchrun's --start-method; None keeps torchrun's default
    agents: list[Agent] = field(default_factory=list)

    @property
    def result_dir(self) -> Path:
        path = self.workdir / "results"
        path.mkdir(exist_ok=True)
        return path

    def start(
        self,
        script: str = "allreduce.py",
        conf: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        local_addr: str = "127.0.0.1",
    ) -> Agent:
        """Start one more agent; ``conf`` adds ``--rdzv-conf`` keys and ``env`` environment
        variables for this agent only. ``local_addr`` is its node's address: any 127.x.y.z is
        loopback, so agents can be distinct hosts on one machine."""
        merged = {**self.conf, **(conf or {})}
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            f"--nnodes={self.nnodes}", f"--nproc-per-node={self.nproc_per_node}",
            f"--rdzv-backend={self.backend}", f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={self.run_id}", f"--max-restarts={self.max_restarts}",
            "--monitor-interval=0.5", f"--local-addr={local_addr}",
        ]
        if self.start_method is not None:
            cmd.append(f"--start-method={self.start_method}")
        if merged:
            cmd.append("--rdzv-conf=" + ",".join(f"{k}={v}" for k, v in merged.items()))
        cmd.append(str(SCRIPTS / script))
        log = self.workdir / f"agent{len(self.agents)}.log"
        env = {**os.environ, "RESULT_DIR": str(self.result_dir), "PYTHONUNBUFFERED": "1", **self.env, **(env or {})}
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        agent = Agent(proc, log)
        self.agents.append(agent)
        return agent

    def wait(self, timeout: float, agents: list[Agent] | None = None) -> list[int]:
        """Wait for ``agents`` (default: all) to exit; return their exit codes.

        Raises:
            AssertionError: with every agent's log, if one is still running at ``timeout``.
        """
        deadline = time.monotonic() + timeout
        codes = []
        for agent in agents or self.agents:
            try:
                codes.append(agent.proc.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"agent still running after {timeout}s\n{self.logs()}") from None
        return codes

    def results(self, kind: str = "rank") -> list[dict]:
        """Finished workers' results (``kind="rank"``) or started workers' markers ("started")."""
        return [json.loads(p.read_text()) for p in sorted(self.result_dir.glob(f"{kind}*.json"))]

    def wait_for_started(self, world_size: int, count: int, timeout: float) -> None:
        """Wait until ``count`` workers run in a world of ``world_size``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(m["world_size"] == world_size for m in self.results("started")) >= count:
                return
            time.sleep(0.2)
        raise AssertionError(f"{count} workers of world size {world_size} did not start\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- agent {i} ---\n{a.output()[-4000:]}" for i, a in enumerate(self.agents))

    def close(self) -> None:
        for agent in self.agents:
            agent.kill()
        for agent in self.agents:
            try:
                agent.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def delete_etcd_run(endpoint: str, run_id: str) -> None:
    """Remove every key that agents of ``run_id`` left on the etcd at ``endpoint``."""
    backend, _ = create_backend(RendezvousParameters("etcd-v2", endpoint, run_id, 1, 1), name="etcd-v2")
    try:
        backend.delete_run()
    finally:
        backend.close()


@contextlib.contextmanager
def etcd_agent_group(workdir: Path, endpoint: str, run_id: str, **options) -> Iterator[AgentGroup]:
    """An ``etcd-v2`` (our etcd v3 backend) ``AgentGroup``; on exit its agents are killed and the
    run's keys deleted."""
    group = AgentGroup(workdir=workdir, backend="etcd-v2", endpoint=endpoint, run_id=run_id, **options)
    try:
        yield group
    finally:
        group.close()
        delete_etcd_run(endpoint, run_id)
