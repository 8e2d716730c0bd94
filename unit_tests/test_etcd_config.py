"""``etcd_rdzv.config``: every option's rejection, before any network traffic, and the plugin
registration."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile

import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters

from etcd_rdzv.config import DEFAULT_KEY_PREFIX, EtcdConfig, config_from_params, parse_endpoints
from etcd_rdzv.plugin import OVERRIDE_ENV


def _params(endpoint: str = "localhost:2379", **config: object) -> RendezvousParameters:
    return RendezvousParameters(backend="etcd-v2", endpoint=endpoint, run_id="run", min_nodes=1, max_nodes=2, **config)


@pytest.fixture
def pem():
    with tempfile.NamedTemporaryFile(suffix=".pem") as f:
        yield f.name


def test_defaults():
    config = config_from_params(_params(""))
    assert config == EtcdConfig(endpoints=(("localhost", 2379),))
    assert config.protocol == "http"
    assert config.key_prefix == DEFAULT_KEY_PREFIX
    assert (config.read_timeout, config.ttl) == (60, 7200)


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("etcd", (("etcd", 2379),)),
        ("etcd:1234", (("etcd", 1234),)),
        ("10.0.0.1:2379, 10.0.0.2", (("10.0.0.1", 2379), ("10.0.0.2", 2379))),
        ("[::1]:2380", (("::1", 2380),)),
        ("[fe80::1]", (("fe80::1", 2379),)),
        ("etcd-0.etcd.svc:2379,etcd-1.etcd.svc:2379", (("etcd-0.etcd.svc", 2379), ("etcd-1.etcd.svc", 2379))),
    ],
)
def test_endpoints_parse(endpoint, expected):
    assert parse_endpoints(endpoint) == expected


@pytest.mark.parametrize(
    ("endpoint", "problem"),
    [
        ("etcd:0", "1..65535"),
        ("etcd:65536", "1..65535"),
        ("etcd:port", "1..65535"),
        ("etcd:", "1..65535"),
        ("etcd:2379,", "is empty"),
        (",etcd", "is empty"),
        ("http://etcd:2379", "URL scheme"),
        ("::1", "in brackets"),
        ("[::1", "closing"),
        ("[not-v6]:2379", "no IPv6 address"),
        ("[::1]x", "not ':PORT'"),
        ("bad host:2379", "hostname"),
        ("-etcd:2379", "invalid host name"),
    ],
)
def test_malformed_endpoints_are_rejected(endpoint, problem):
    with pytest.raises(ValueError, match="rendezvous endpoint") as info:
        config_from_params(_params(endpoint))
    assert problem in str(info.value)
    assert endpoint in str(info.value)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"protocol": "ftp"}, "'protocol' is 'ftp'"),
        ({"protocol": 7}, "'protocol' is 7"),
        ({"protocol": "https", "ca_cert": "/no/such/ca.pem"}, "'ca_cert' is '/no/such/ca.pem'"),
        ({"read_timeout": 0}, "'read_timeout' is 0"),
        ({"read_timeout": "-1"}, "'read_timeout' is '-1'"),
        ({"read_timeout": "soon"}, "'read_timeout' is 'soon'"),
        ({"read_timeout": True}, "'read_timeout' is True"),
        ({"read_timeout": "nan"}, "'read_timeout' is 'nan'"),
        ({"ttl": 0}, "'ttl' is 0"),
        ({"ttl": "-5"}, "'ttl' is '-5'"),
        ({"key_prefix": "torch/rdzv"}, "'key_prefix' is 'torch/rdzv'"),
        ({"key_prefix": "/"}, "'key_prefix' is '/'"),
        ({"username": "root"}, "'username' is set but 'password' is not"),
        ({"password": "secret"}, "'password' is set but 'username' is not"),
    ],
)
def test_invalid_options_are_rejected(config, match):
    with pytest.raises(ValueError, match=match):
        config_from_params(_params(**config))


def test_client_certificate_needs_its_key(pem):
    with pytest.raises(ValueError, match="'ssl_cert' is set but 'ssl_cert_key' is not"):
        config_from_params(_params(protocol="https", ssl_cert=pem))
    with pytest.raises(ValueError, match="'ssl_cert_key' is set but 'ssl_cert' is not"):
        config_from_params(_params(protocol="https", ssl_cert_key=pem))


def test_missing_certificate_file_is_rejected(pem):
    with pytest.raises(ValueError, match="'ssl_cert_key' is '/missing/key.pem'"):
        config_from_params(_params(protocol="https", ssl_cert=pem, ssl_cert_key="/missing/key.pem"))


def test_tls_files_need_https(pem):
    with pytest.raises(ValueError, match="set protocol=https"):
        config_from_params(_params(ca_cert=pem))


def test_full_tls_and_auth_configuration(pem):
    config = config_from_params(
        _params(
            "[::1]:2379,etcd:2380",
            protocol="HTTPS",
            ca_cert=pem,
            ssl_cert=pem,
            ssl_cert_key=pem,
            username="root",
            password="Sekr1t-Passw0rd",
            read_timeout="2.5",
            ttl=30,
            key_prefix="/custom/prefix/",
        )
    )
    assert config.endpoints == (("::1", 2379), ("etcd", 2380))
    assert config.describe_endpoints() == "[::1]:2379,etcd:2380"
    assert (config.protocol, config.ca_cert, config.ssl_cert, config.ssl_cert_key) == ("https", pem, pem, pem)
    assert (config.username, config.password) == ("root", "Sekr1t-Passw0rd")
    assert "Sekr1t-Passw0rd" not in repr(config)
    assert (config.read_timeout, config.ttl, config.key_prefix) == (2.5, 30, "/custom/prefix")


def test_unknown_keys_are_warned_about_and_known_ones_are_not(caplog):
    known = {
        "join_timeout": "600",
        "last_call_timeout": "30",
        "close_timeout": "30",
        "heartbeat_timeout": "5",
        "keep_alive_interval": "5",
        "keep_alive_max_attempt": "3",
        "timeout": 900,
        "rank": 0,
        "is_host": "false",
        "read_timeout": "60",
        "ttl": "100",
    }
    with caplog.at_level(logging.WARNING, logger="rdzv_common.settings"):
        config_from_params(_params(**known))
        assert caplog.records == []
        config_from_params(_params(**known, cacert="/etc/ca.pem", read_timout="5"))
    warned = sorted(r.getMessage().split("'")[1] for r in caplog.records)
    assert warned == ["cacert", "read_timout"]


def test_an_unknown_key_is_told_the_known_key_it_is_closest_to(caplog):
    with caplog.at_level(logging.WARNING):
        config_from_params(_params(cacert="/etc/ca.pem", read_timout="5", join_timeuot="60", colour="blue"))
    said = {r.getMessage().split("'")[1]: r.getMessage() for r in caplog.records}
    assert "Did you mean 'ca_cert'?" in said["cacert"]
    assert "Did you mean 'read_timeout'?" in said["read_timout"]
    assert "Did you mean 'join_timeout'?" in said["join_timeuot"]  # a core key, read by the handler
    assert "Did you mean" not in said["colour"] and "ignored" in said["colour"]


def test_rejection_happens_before_any_network_traffic(monkeypatch):
    import etcd_rdzv.factory

    def no_client(*args):
        raise AssertionError("a client was built for an invalid configuration")

    monkeypatch.setattr(etcd_rdzv.factory.run, "acquire", no_client)
    with pytest.raises(ValueError, match="'ttl'"):
        etcd_rdzv.factory.create_backend(_params(ttl=-1))


def test_plugin_overrides_torch_etcd_v2():
    if os.environ.get(OVERRIDE_ENV) == "0":
        pytest.skip(f"{OVERRIDE_ENV}=0 is set")
    import torch.distributed.elastic.rendezvous  # noqa: F401 (loads the plugins)

    from etcd_rdzv import plugin
    from rdzv_common.torch_private import registered_creator

    assert registered_creator("etcd-v2") is plugin.create_handler
    assert registered_creator("etcd_rdzv") is plugin.create_handler


def test_plugin_override_can_be_turned_off():
    code = (
        "import torch.distributed.elastic.rendezvous\n"
        "from rdzv_common.torch_private import registered_creator as c\n"
        "print(c('etcd-v2').__module__, c('etcd_rdzv').__module__)\n"
    )
    env = {**os.environ, OVERRIDE_ENV: "0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, check=True)
    assert result.stdout.split() == ["torch.distributed.elastic.rendezvous.registry", "etcd_rdzv.plugin"]
