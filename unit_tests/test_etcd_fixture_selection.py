"""Which etcd the integration tests use: ``integration_tests.etcd_fixture.select_source``."""

from __future__ import annotations

from integration_tests.etcd_fixture import EtcdSource, select_source


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
