"""``exporter``: serve Prometheus metrics of every run under the key prefix at ``/metrics``, from
one watch of the prefix (``etcd_rdzv/exporter.py``), until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import threading

from ..run import EtcdClient
from .options import CliError
from .output import emit

DEFAULT_LISTEN = "127.0.0.1:9464"


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6) as a host and a port; port 0 picks a free one.

    Raises:
        argparse.ArgumentTypeError: naming the text and the expected form.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"invalid address {text!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host.strip("[]"), int(port)


def _stop_on_sigterm() -> None:
    # A service manager stops the exporter with SIGTERM: leave through the same path as Ctrl-C,
    # which closes the watch and the server.
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def cmd_exporter(etcd: EtcdClient, args: argparse.Namespace) -> int:
    """Serve the metrics until interrupted (exit 0)."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server

        from ..exporter import RunsCollector, RunsMirror
    except ImportError as exc:
        raise CliError(f"the exporter needs prometheus_client ({exc}): pip install 'torch-rdzv-etcd3[exporter]'") from None
    host, port = args.listen
    mirror = RunsMirror(etcd)
    registry = CollectorRegistry()
    registry.register(RunsCollector(mirror))
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise CliError(f"cannot listen on {host}:{port}: {exc}") from None
    mirror.start()
    emit(
        f"serving metrics of the runs under {etcd.config.key_prefix} (etcd at "
        f"{etcd.config.describe_endpoints()}) on http://{host}:{server.server_port}/metrics"
    )
    _stop_on_sigterm()
    try:
        # Short waits: a signal that lands on one of gRPC's threads is acted on only once this
        # thread runs Python code again.
        idle = threading.Event()
        while not idle.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
        mirror.close()
    return 0
