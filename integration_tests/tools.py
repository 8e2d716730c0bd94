"""Tools for the integration tests: rendezvous nodes in subprocesses driven over stdin/stdout,
key-space snapshots, and polling for a condition. (The invariant checker and the answer checker,
which the soak benchmark uses too, live in ``benchmarks.invariants`` and ``benchmarks.answers``.)"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable

import etcd3
import etcd3.utils

from benchmarks.answers import Answer
from rdzv_common.state import NodeDesc


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05, what: str = "") -> object:
    """Poll ``predicate`` until it returns something true; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what or predicate}")
        time.sleep(interval)


def snapshot(client: etcd3.MultiEndpointEtcd3Client, *prefixes: str) -> dict[bytes, tuple]:
    """Every key under ``prefixes`` with (value, create_revision, mod_revision, version, lease)."""
    found: dict[bytes, tuple] = {}
    for prefix in prefixes:
        raw = prefix.encode()
        response = client.get_range_response(raw, etcd3.utils.prefix_range_end(raw))
        for kv in response.kvs:
            found[kv.key] = (kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)
    return found


# -- rendezvous nodes in subprocesses -----------------------------------------------------------

# One handler in its own process. Commands on stdin, one a line: ``next`` (next_rendezvous),
# ``waiting`` (num_nodes_waiting), ``shutdown``, ``exit``. Each command but ``exit`` runs in a
# thread of its own, so a blocked ``next`` leaves the process responsive; results are JSON lines.
NODE_PROGRAM = textwrap.dedent(
    """
    import json, os, sys, threading
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from etcd_rdzv.plugin import create_handler

    args = json.loads(sys.argv[1])
    params = RendezvousParameters(
        backend="etcd_rdzv", endpoint=args["endpoint"], run_id=args["run_id"],
        min_nodes=args["min_nodes"], max_nodes=args["max_nodes"], local_addr="127.0.0.1",
        **args["conf"],
    )
    handler = create_handler(params)
    lock = threading.Lock()

    def emit(**message):
        with lock:
            sys.stdout.write(json.dumps(message) + "\\n")
            sys.stdout.flush()

    def run(cmd):
        try:
            if cmd == "next":
                info = handler.next_rendezvous()
                store = info.bootstrap_store_info
                emit(event="rdzv", rank=info.rank, world=info.world_size, round=handler.last_timings.round,
                     store=f"{store.master_addr}:{store.master_port}")
            elif cmd == "waiting":
                emit(event="waiting", count=handler.num_nodes_waiting())
            elif cmd == "shutdown":
                emit(event="shutdown", ok=handler.shutdown())
            else:
                emit(event="error", cmd=cmd, type="ValueError", message="unknown command")
        except BaseException as exc:
            emit(event="error", cmd=cmd, type=type(exc).__name__, message=str(exc))

    emit(event="ready", node=handler.node.key, pid=os.getpid())
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "exit":
            break
        if cmd:
            threading.Thread(target=run, args=(cmd,), daemon=True).start()
    os._exit(0)
    """
)


class NodeProcess:
    """One rendezvous handler in a subprocess (see ``NODE_PROGRAM``), in its own session."""

    def __init__(self, endpoint: str, run_id: str, min_nodes: int, max_nodes: int, conf: dict[str, object]) -> None:
        args = {"endpoint": endpoint, "run_id": run_id, "min_nodes": min_nodes, "max_nodes": max_nodes, "conf": conf}
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", NODE_PROGRAM, json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.messages: queue.Queue[dict] = queue.Queue()
        self.stderr: list[str] = []
        self.node: str | None = None
        self.answers: list[Answer] = []  # what it was told, for ``answers.check``
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            try:
                self.messages.put(json.loads(line))
            except ValueError:
                self.stderr.append(line)

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)
            del self.stderr[:-200]

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def expect(self, event: str, timeout: float) -> dict:
        """The next message, which must be ``event``; fails on an error message or a timeout."""
        try:
            message = self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"node {self.node} sent no '{event}' within {timeout:g}s; stderr:\n{''.join(self.stderr[-40:])}"
            ) from None
        if message.get("event") != event:
            raise AssertionError(f"node {self.node} sent {message}, expected '{event}'")
        if event == "rdzv":
            self.answers.append(
                Answer(self.node, message["round"], message["rank"], message["world"], message["store"], time.monotonic())
            )
        return message

    def ready(self, timeout: float = 60.0) -> NodeProcess:
        self.node = self.expect("ready", timeout)["node"]
        return self

    def idle(self, seconds: float) -> bool:
        """Whether the node sends nothing for ``seconds``."""
        try:
            message = self.messages.get(timeout=seconds)
        except queue.Empty:
            return True
        self.messages.put(message)
        return False

    @property
    def desc(self) -> NodeDesc:
        addr, pid, local_id = self.node.rsplit("_", 2)
        return NodeDesc(addr, int(pid), int(local_id))

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def close(self) -> None:
        """End the process: ``exit``, then SIGKILL; a stopped process is continued first."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
                self.send("exit")
                self.proc.wait(timeout=3)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.proc.kill()
                self.proc.wait(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except OSError:
                pass
