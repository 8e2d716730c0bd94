"""User/password authentication against a dedicated etcd with auth enabled."""

from __future__ import annotations

import subprocess
import time

import pytest
from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousParameters

from etcd_rdzv.factory import create_backend
from integration_tests.etcd_fixture import find_etcdctl

pytestmark = pytest.mark.timeout(60)

ROOT_PASSWORD = "rootpw"


def _start_with_auth(etcd_server, etcd_binary, extra_args=()):
    etcdctl = find_etcdctl(etcd_binary)
    if etcdctl is None:
        pytest.skip("no etcdctl beside the etcd binary")
    server = etcd_server(extra_args)
    for command in (["user", "add", f"root:{ROOT_PASSWORD}"], ["auth", "enable"]):
        subprocess.run(
            [etcdctl, f"--endpoints={server.endpoint}", *command],
            check=True,
            capture_output=True,
            timeout=20,
            env={"ETCDCTL_API": "3"},
        )
    return server


@pytest.fixture
def auth_etcd(etcd_server, etcd_binary):
    return _start_with_auth(etcd_server, etcd_binary)


def _params(endpoint: str, **config: object) -> RendezvousParameters:
    # Every authentication costs the server a bcrypt hash, and tokens here expire each second:
    # on a busy machine a request plus its re-authentication can outlast a 3 s budget.
    return RendezvousParameters(
        backend="etcd_rdzv", endpoint=endpoint, run_id="auth-run", min_nodes=1, max_nodes=1, read_timeout=10, **config
    )


def test_right_credentials_work(auth_etcd):
    backend, store = create_backend(_params(auth_etcd.endpoint, username="root", password=ROOT_PASSWORD))
    try:
        _, token, _ = backend.set_state(b"authenticated")
        assert backend.get_state() == (b"authenticated", token)
        backend.mailbox.post(b"join")
        assert [r.data for r in backend.mailbox.read(0)] == [b"join"]
        backend.liveness.beat("node", 2)
        assert backend.liveness.alive(["node"], 2) == {"node"}
        store.set("k", "v")
        assert store.get("k") == b"v"
        backend.set_state(b"again", token)
        started = time.monotonic()
        backend.wait_for_change(token, timeout=10)  # the watch is authenticated too
        assert time.monotonic() - started < 5
    finally:
        backend.close()


def test_wrong_password_says_authentication_failed(auth_etcd):
    started = time.monotonic()
    with pytest.raises(RendezvousConnectionError, match="authentication failed for user 'root'"):
        create_backend(_params(auth_etcd.endpoint, username="root", password="wrong"))
    assert time.monotonic() - started < 3  # refused at once, not retried


def test_missing_credentials_say_authentication_is_required(auth_etcd):
    backend, _ = create_backend(_params(auth_etcd.endpoint))
    try:
        with pytest.raises(RendezvousConnectionError, match="requires authentication"):
            backend.get_state()
    finally:
        backend.close()


def test_an_expired_token_is_renewed(etcd_server, etcd_binary):
    server = _start_with_auth(etcd_server, etcd_binary, ["--auth-token-ttl=1"])
    backend, _ = create_backend(_params(server.endpoint, username="root", password=ROOT_PASSWORD))
    try:
        backend.set_state(b"v1")
        time.sleep(2.5)  # the server forgets idle simple tokens after --auth-token-ttl
        assert backend.get_state()[0] == b"v1"
    finally:
        backend.close()
