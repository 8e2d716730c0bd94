"""One benchmark run: one backend, one scenario, one N, in fresh worker processes.

Scenarios:

* ``join``: N nodes with ``min_nodes = max_nodes = N`` call ``next_rendezvous`` at one start
  time; the figure is the time from that start until the last call returned.
* ``rejoin``: N nodes with ``min_nodes = N - 1, max_nodes = N`` first form a round of N; then one
  node dies (its keep-alives stop) and the N - 1 survivors call ``next_rendezvous`` again at one
  start time; the figure is from that start until the last survivor returned. It includes noticing
  the dead node (``keep_alive_interval * keep_alive_max_attempt``) and the last call wait.
* ``exit``: as ``rejoin``, but the leaver leaves the way a process that exits on SIGTERM does
  (torchrun does not call ``shutdown()`` then): its keep-alives stop and, where the handler has an
  at-exit hook (ours: ``_abandoned``, which ends its liveness at once), that hook runs, as at
  interpreter exit. torch's handlers have none, so for them ``exit`` is the same as ``rejoin``.

Every phase is capped: nodes still blocked at the cap are abandoned and their processes killed.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .servers import etcd_counters, host_tcp_store

REPO = Path(__file__).resolve().parent.parent
START_LEAD_SECONDS = 0.5   # commands go out this long before the common start
COMMAND_GRACE_SECONDS = 15.0  # a worker silent this long past the cap is killed
LEAVE_SCENARIOS = {"rejoin": "crash", "exit": "exit"}  # scenario -> how its leaver leaves
SCENARIOS = ("join", *LEAVE_SCENARIOS)


@dataclass
class Settings:
    cap: float = 60.0
    procs: int = 1
    last_call: float = 1.0        # rejoin/exit only: last_call_timeout
    keep_alive: float = 1.0       # rejoin/exit only: keep_alive_interval
    keep_alive_attempts: int = 3  # rejoin/exit only: keep_alive_max_attempt
    setup_timeout: float = 120.0
    extra_conf: dict = field(default_factory=dict)


def node_conf(scenario: str, s: Settings) -> dict:
    timeout = int(s.cap + 60)  # handlers must never give up before the harness does
    conf = {"join_timeout": timeout, "read_timeout": timeout, "last_call_timeout": 1}
    if scenario in LEAVE_SCENARIOS:
        conf.update(
            last_call_timeout=s.last_call,
            keep_alive_interval=s.keep_alive,
            keep_alive_max_attempt=s.keep_alive_attempts,
        )
    conf.update(s.extra_conf)
    return conf


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """``(first, count)`` for each of ``parts`` near-equal shares of ``range(n)``."""
    parts = max(1, min(parts, n))
    base, extra = divmod(n, parts)
    shares, first = [], 0
    for p in range(parts):
        count = base + (1 if p < extra else 0)
        shares.append((first, count))
        first += count
    return shares


class Workers:
    """The worker processes of one run, their replies merged into one queue."""

    def __init__(self, specs: list[dict], log_dir: Path) -> None:
        self.replies: queue.Queue = queue.Queue()
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for i, spec in enumerate(specs):
            log = log_dir / f"worker{i}.log"
            self.logs.append(log)
            with open(log, "wb") as err:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.worker", json.dumps(spec)],
                    cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                    text=True, bufsize=1, start_new_session=True,
                )
            self.procs.append(proc)
            threading.Thread(target=self._read, args=(i, proc), daemon=True).start()

    def _read(self, i: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            if line.startswith("@@ "):
                self.replies.put((i, json.loads(line[3:])))
        self.replies.put((i, None))

    def send(self, message: dict) -> None:
        for proc in self.procs:
            try:
                proc.stdin.write(json.dumps(message) + "\n")
                proc.stdin.flush()
            except OSError:
                pass

    def collect(self, event: str, deadline: float) -> tuple[dict[int, dict], str | None]:
        """One ``event`` reply per worker by ``deadline`` (monotonic); else what came and why not."""
        got: dict[int, dict] = {}
        while len(got) < len(self.procs):
            try:
                i, msg = self.replies.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                return got, f"no '{event}' from {len(self.procs) - len(got)} worker(s) in time"
            if msg is None:
                return got, f"worker {i} exited early; {self.tail(i)}"
            if msg.get("event") == "failed":
                return got, f"worker {i}: {msg.get('error')}"
            if msg.get("event") == event:
                got[i] = msg
        return got, None

    def tail(self, i: int, chars: int = 400) -> str:
        try:
            return self.logs[i].read_text(errors="replace")[-chars:].strip() or "no stderr"
        except OSError:
            return "no stderr"

    def kill(self, grace: float = 0.0) -> None:
        """Kill every worker (and anything it started) still running after ``grace`` seconds."""
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass


def summarize_phase(name: str, at: float, expected: int, replies: dict[int, dict], cap: float) -> dict:
    """Merge the workers' ``phase_done`` replies into one phase record."""
    nodes = [n for r in replies.values() for n in r["nodes"]]
    counters: dict[str, int] = {}
    for r in replies.values():
        for k, v in r["counters"].items():
            counters[k] = counters.get(k, 0) + v
    ok = [n for n in nodes if "error" not in n]
    errors = sorted({n["error"] for n in nodes if "error" in n})
    latencies = sorted(n["end"] - at for n in ok)
    ranks = sorted(n["rank"] for n in ok)
    worlds = sorted({n["world"] for n in ok})
    record = {
        "phase": name,
        "expected": expected,
        "returned": len(ok),
        "failed": len(nodes) - len(ok),
        "pending": expected - len(nodes),
        "errors": errors[:5],
        "counters": counters,
        "core_writes": sum(n.get("core_writes") or 0 for n in ok) if any("core_writes" in n for n in ok) else None,
        "core_lost_writes": (
            sum(n.get("core_lost_writes") or 0 for n in ok) if any("core_lost_writes" in n for n in ok) else None
        ),
        "worlds": worlds,
        "ranks_ok": ranks == list(range(len(ok))) and worlds == [len(ok)],
        "node_p50_s": statistics.median(latencies) if latencies else None,
        "node_max_s": latencies[-1] if latencies else None,
        "leaver_silenced": next((r["leaver_silenced"] for r in replies.values() if r.get("leaver_silenced") is not None), None),
        "leaver_exit_hook": next((r["leaver_exit_hook"] for r in replies.values() if r.get("leaver_exit_hook") is not None), None),
        "leaver_exit_s": next((r["leaver_exit_s"] for r in replies.values() if r.get("leaver_exit_s") is not None), None),
    }
    if len(ok) == expected and record["ranks_ok"]:
        record["status"], record["seconds"] = "ok", latencies[-1]
    elif errors:
        record["status"], record["seconds"] = "error", None
    elif record["pending"]:
        record["status"], record["seconds"] = "timeout", None
    else:
        record["status"], record["seconds"] = "error", None
        record["errors"].append(f"bad ranks/worlds: worlds={worlds}, {len(ok)} returned of {expected}")
    record["cap"] = cap
    return record


def _phase(workers: Workers, name: str, expected: int, leaver: int | None, cap: float, leave: str | None = None) -> dict:
    at = time.time() + START_LEAD_SECONDS
    workers.send({"cmd": "phase", "name": name, "at": at, "leaver": leaver, "leave": leave})
    replies, problem = workers.collect("phase_done", time.monotonic() + START_LEAD_SECONDS + cap + COMMAND_GRACE_SECONDS)
    record = summarize_phase(name, at, expected, replies, cap)
    if problem:
        record["status"], record["seconds"] = ("timeout" if "in time" in problem else "error"), None
        record["errors"].append(problem)
    return record


def _metered_phase(etcd: str | None, workers: Workers, *phase) -> dict:
    """``_phase``, with what the etcd at ``etcd`` (if any) paid for it: raft entries committed and
    its CPU seconds (the counters of ``servers.ETCD_COUNTERS``)."""
    before = etcd_counters(etcd) if etcd else {}
    record = _phase(workers, *phase)
    if before:
        after = etcd_counters(etcd)
        record["etcd"] = {name: after[name] - before[name] for name in before if name in after}
    return record


def run(backend: str, scenario: str, n: int, endpoint: str | None, s: Settings, trial: int = 0) -> dict:
    """Run one (backend, scenario, N) in fresh processes; return its record (never raises)."""
    run_id = f"bench-{scenario}-{backend}-n{n}-t{trial}-{uuid.uuid4().hex[:8]}"
    min_nodes = n if scenario == "join" else n - 1
    record = {
        "backend": backend, "scenario": scenario, "n": n, "procs": min(s.procs, n), "trial": trial,
        "run_id": run_id, "cap": s.cap, "min_nodes": min_nodes, "max_nodes": n,
        "conf": node_conf(scenario, s), "status": "error", "seconds": None, "phases": [], "errors": [],
    }
    store = None
    workers = None
    log_dir = Path(tempfile.mkdtemp(prefix="bench-run-"))
    try:
        if endpoint is None:  # the c10d backends: this run hosts a fresh TCPStore
            store = host_tcp_store()
            endpoint = f"127.0.0.1:{store.port}"
        specs = [
            {"backend": backend, "endpoint": endpoint, "run_id": run_id, "min_nodes": min_nodes,
             "max_nodes": n, "conf": record["conf"], "cap": s.cap, "first": first, "count": count}
            for first, count in split(n, s.procs)
        ]
        workers = Workers(specs, log_dir)
        t0 = time.monotonic()
        ready, problem = workers.collect("ready", t0 + s.setup_timeout)
        record["build_s"] = time.monotonic() - t0
        if problem:
            record["status"] = "setup_failed"
            record["errors"].append(problem)
            return record
        record["metered"] = next(iter(ready.values()))["metered"]

        if scenario == "join":
            final = _metered_phase(endpoint if store is None else None, workers, "join", n, None, s.cap)
            record["phases"].append(final)
        else:
            first_round = _phase(workers, "initial", n, None, s.cap)
            record["phases"].append(first_round)
            if first_round["status"] != "ok" or first_round["worlds"] != [n]:
                record["status"] = "timeout" if first_round["status"] == "timeout" else "setup_failed"
                record["errors"] += [f"first round of {n}: {e}" for e in first_round["errors"]]
                return record
            final = _metered_phase(endpoint if store is None else None, workers, scenario, n - 1, n - 1, s.cap,
                                   LEAVE_SCENARIOS[scenario])
            record["phases"].append(final)
        record["status"], record["seconds"] = final["status"], final["seconds"]
        record["errors"] += final["errors"]
        if final["status"] == "ok":
            workers.send({"cmd": "shutdown"})
            done, problem = workers.collect("shutdown_done", time.monotonic() + 60)
            record["shutdown_s"] = max((d["seconds"] for d in done.values()), default=None)
            record["shutdown_failed"] = sum(d["failed"] + d["pending"] for d in done.values())
            if problem:
                record["shutdown_problem"] = problem
        return record
    except Exception as e:
        record["status"] = "error"
        record["errors"].append(f"harness: {type(e).__name__}: {e}")
        return record
    finally:
        if workers is not None:
            workers.send({"cmd": "exit"})
            workers.kill(grace=2.0)
        del store
        for f in log_dir.iterdir():
            f.unlink()
        log_dir.rmdir()
