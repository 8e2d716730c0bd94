"""Which etcd the integration tests use: ``integration_tests.etcd_fixture.select_source``."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from etcd_rdzv import embedded
from integration_tests.etcd_fixture import EtcdSource, find_etcd_binary, select_source


def test_environment_endpoints_come_first():
    env = {"ETCD_ENDPOINTS": " 10.0.0.1:2379, [::1]:2379 ,"}
    assert select_source(env, True, "/bin/etcd") == EtcdSource("env", endpoints=("10.0.0.1:2379", "[::1]:2379"))


def test_blank_environment_variable_is_ignored():
    assert select_source({"ETCD_ENDPOINTS": " , "}, False, "/bin/etcd") == EtcdSource("binary", binary="/bin/etcd")


def test_docker_before_a_local_binary():
    assert select_source({}, True, "/bin/etcd") == EtcdSource("docker")


def test_local_binary_without_docker():
    assert select_source({}, False, "/bin/etcd") == EtcdSource("binary", binary="/bin/etcd")


def test_nothing_available():
    assert select_source({}, False, None) is None


def test_etcd_binary_variable_skips_docker():
    env = {"ETCD_BINARY": "/opt/etcd-3.4/etcd"}
    assert select_source(env, True, "/opt/etcd-3.4/etcd") == EtcdSource("binary", binary="/opt/etcd-3.4/etcd")


def test_source_variable_forces_binary_or_docker():
    assert select_source({"ETCD_SOURCE": "binary"}, True, "/bin/etcd") == EtcdSource("binary", binary="/bin/etcd")
    assert select_source({"ETCD_SOURCE": "docker"}, True, "/bin/etcd") == EtcdSource("docker")
    # Docker demanded but absent: no etcd at all, never a quiet fallback to the binary.
    assert select_source({"ETCD_SOURCE": "docker"}, False, "/bin/etcd") is None


def test_find_etcd_binary_prefers_the_variable():
    with tempfile.TemporaryDirectory() as scratch:
        etcd = Path(scratch).resolve() / "etcd"
        etcd.write_text("#!/bin/sh\n")
        etcd.chmod(0o755)
        assert find_etcd_binary({"ETCD_BINARY": str(etcd)}) == str(etcd)
    assert find_etcd_binary({}) == embedded.find_etcd_binary()


def test_find_etcd_binary_rejects_a_missing_file():
    with pytest.raises(FileNotFoundError, match="ETCD_BINARY"):
        find_etcd_binary({"ETCD_BINARY": "/nonexistent/etcd"})
