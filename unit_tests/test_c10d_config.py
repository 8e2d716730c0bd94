"""``create_backend``'s options, defaults and host inference, and the torchrun plugin."""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import timedelta

import pytest
from torch.distributed import FileStore, TCPStore
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

import c10d_rdzv.factory as factory
from c10d_rdzv.factory import create_backend


def params(endpoint: str = "", backend: str = "c10d_rdzv", **config) -> RendezvousParameters:
    return RendezvousParameters(backend, endpoint, "run", 1, 2, **config)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeTCPStore:
    """Records how the factory builds a TCPStore; ``fail_as_host`` makes hosting fail."""

    calls: list[dict] = []
    fail_as_host = False

    def __init__(self, host, port, **kwargs):
        FakeTCPStore.calls.append({"host": host, "port": port, **kwargs})
        if kwargs["is_master"] and FakeTCPStore.fail_as_host:
            raise RuntimeError("address in use")


@pytest.fixture
def fake_tcp(monkeypatch):
    FakeTCPStore.calls = []
    FakeTCPStore.fail_as_host = False
    monkeypatch.setattr(factory, "TCPStore", FakeTCPStore)
    return FakeTCPStore


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("touched the network before validating the options")

    for name in ("TCPStore", "FileStore", "matches_machine_hostname"):
        monkeypatch.setattr(factory, name, refuse)


@pytest.mark.parametrize(
    "config, named",
    [
        ({"store_type": "redis"}, r"'store_type' is 'redis'"),
        ({"store_type": ""}, r"'store_type' is ''"),
        ({"read_timeout": "0"}, r"'read_timeout' is '0'"),
        ({"read_timeout": "-5"}, r"'read_timeout' is '-5'"),
        ({"read_timeout": "1.5s"}, r"'read_timeout' is '1\.5s'"),
        ({"read_timeout": "soon"}, r"'read_timeout' is 'soon'"),
        ({"read_timeout": 0}, r"'read_timeout' is 0"),
        ({"read_timeout": True}, r"'read_timeout' is True"),
        ({"is_host": "maybe"}, r"'is_host' is 'maybe'"),
        ({"is_host": 2}, r"'is_host' is 2"),
    ],
)
def test_invalid_option_is_refused_naming_key_and_value(no_network, config, named):
    with pytest.raises(ValueError, match=named):
        create_backend(params("127.0.0.1:1234", **config))


@pytest.mark.parametrize("endpoint", ["host:port", "host:70000", "bad host!:80"])
def test_invalid_endpoint_is_refused_naming_it(no_network, endpoint):
    with pytest.raises(ValueError, match=f"rendezvous endpoint '{endpoint}'"):
        create_backend(params(endpoint))


def test_defaults(fake_tcp):
    backend, store = create_backend(params())
    assert isinstance(store, FakeTCPStore)
    (call,) = fake_tcp.calls
    assert call == {
        "host": "localhost",
        "port": 29400,
        "is_master": True,
        "multi_tenant": True,
        "timeout": timedelta(seconds=60),
    }
    assert backend.name == "c10d_rdzv"


def test_options_are_applied(fake_tcp):
    create_backend(params("10.1.2.3:1234", store_type=" TCP ", read_timeout="7.5", is_host="yes"))
    assert fake_tcp.calls == [
        {
            "host": "10.1.2.3",
            "port": 1234,
            "is_master": True,
            "multi_tenant": True,
            "timeout": timedelta(seconds=7.5),
        }
    ]


@pytest.mark.parametrize("backend_name", ["c10d_rdzv", "my-c10d"])
def test_backend_reports_the_name_it_was_requested_under(fake_tcp, backend_name):
    assert create_backend(params(backend=backend_name))[0].name == backend_name


def test_host_is_inferred_from_the_endpoint(fake_tcp, monkeypatch):
    asked = []
    monkeypatch.setattr(factory, "matches_machine_hostname", lambda host: asked.append(host) or False)
    create_backend(params("trainer-0.cluster:555"))
    assert asked == ["trainer-0.cluster"]
    assert [call["is_master"] for call in fake_tcp.calls] == [False]


def test_explicit_is_host_skips_inference(fake_tcp, monkeypatch):
    monkeypatch.setattr(factory, "matches_machine_hostname", pytest.fail)
    create_backend(params("localhost", is_host="false"))
    create_backend(params("trainer-0.cluster", is_host="1"))
    assert [call["is_master"] for call in fake_tcp.calls] == [False, True]


def test_inferred_host_joins_as_client_when_hosting_fails(fake_tcp):
    fake_tcp.fail_as_host = True
    create_backend(params("127.0.0.1:555"))
    assert [call["is_master"] for call in fake_tcp.calls] == [True, False]


def test_explicit_host_does_not_fall_back(fake_tcp):
    fake_tcp.fail_as_host = True
    with pytest.raises(RendezvousConnectionError, match=r"host the TCPStore at 127\.0\.0\.1:555"):
        create_backend(params("127.0.0.1:555", is_host="true"))
    assert [call["is_master"] for call in fake_tcp.calls] == [True]


def test_local_endpoint_hosts_a_real_store():
    port = free_port()
    backend, store = create_backend(params(f"127.0.0.1:{port}", read_timeout="30"))
    _, token, _ = backend.set_state(b"hosted")
    peer, _ = create_backend(params(f"127.0.0.1:{port}", is_host="false", read_timeout="30"))
    assert peer.get_state() == (b"hosted", token)


def test_inferred_host_connects_to_a_store_hosted_elsewhere():
    # Not multi-tenant, so the factory's own attempt to host the port fails to bind.
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    server.set("probe", "here")
    _, store = create_backend(params(f"127.0.0.1:{server.port}", read_timeout="30"))
    assert store.get("probe") == b"here"


def test_unreachable_store_raises_connection_error_within_read_timeout():
    port = free_port()
    started = time.monotonic()
    with pytest.raises(RendezvousConnectionError, match=rf"connect to the TCPStore at 127\.0\.0\.1:{port}"):
        create_backend(params(f"127.0.0.1:{port}", is_host="false", read_timeout="2"))
    assert time.monotonic() - started < 2 + 5


def test_file_store_at_the_endpoint(tmp_path):
    path = str(tmp_path / "rdzv")
    a, store = create_backend(params(path, store_type=" File "))
    b, _ = create_backend(params(path, store_type="file"))
    assert isinstance(store, FileStore) and store.path == path
    _, token, _ = a.set_state(b"shared")
    assert b.get_state() == (b"shared", token)


def test_file_store_without_endpoint_uses_a_fresh_temporary_file():
    _, first = create_backend(params(store_type="file"))
    _, second = create_backend(params(store_type="file"))
    try:
        assert first.path != second.path
    finally:
        os.remove(first.path)
        os.remove(second.path)


def test_file_path_in_a_missing_directory_is_refused(no_network, tmp_path):
    path = str(tmp_path / "missing-dir" / "rdzv")
    with pytest.raises(ValueError, match=f"rendezvous endpoint '{path}'"):
        create_backend(params(path, store_type="file"))


def test_unknown_keys_are_warned_about_with_the_closest_known_key(caplog):
    from c10d_rdzv.config import config_from_params

    with caplog.at_level(logging.WARNING):
        config_from_params(params("127.0.0.1:29400", store_typ="tcp", last_call_timeout="5", timeout=900))
    [record] = caplog.records
    assert "'store_typ'" in record.getMessage() and "Did you mean 'store_type'?" in record.getMessage()
