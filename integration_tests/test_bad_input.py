"""Bad input: corrupt state in etcd, bad configuration, and other jobs' keys next to ours."""

from __future__ import annotations

import json
import random
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from torch.distributed.elastic.rendezvous import (
    RendezvousConnectionError,
    RendezvousParameters,
    RendezvousStateError,
)

from benchmarks.invariants import InvariantChecker, etcd_client
from etcd_rdzv.keys import RunKeys
from etcd_rdzv.factory import create_backend
from etcd_rdzv.plugin import create_handler
from integration_tests.tools import snapshot
from rdzv_common import codec
from rdzv_common.state import RendezvousState

pytestmark = pytest.mark.timeout(60)

FAST = {"join_timeout": 20, "last_call_timeout": 1, "keep_alive_interval": 1, "keep_alive_max_attempt": 2}


def params_for(endpoint: str, run_id: str, key_prefix: str, min_nodes: int = 1, max_nodes: int = 1, **conf):
    conf = {"key_prefix": key_prefix, "read_timeout": 5, **FAST, **conf}
    return RendezvousParameters("etcd_rdzv", endpoint, run_id, min_nodes, max_nodes, local_addr="127.0.0.1", **conf)


# -- corrupt state ---------------------------------------------------------------------------

_VALID = json.loads(codec.encode_state(RendezvousState(round=2, cursor=5)))

CORRUPT = {
    "random-bytes": (random.Random(7).randbytes(256), "not UTF-8 JSON"),
    "json-list": (b"[1, 2, 3]", "not an object"),
    "json-other-format": (json.dumps({"round": 1}).encode(), "format is None"),
    "json-missing-field": (json.dumps({k: v for k, v in _VALID.items() if k != "participants"}).encode(), "'participants' is missing"),
    "json-wrong-type": (json.dumps({**_VALID, "round": "3"}).encode(), "field 'round' has str"),
    "json-bad-ranks": (
        json.dumps({**_VALID, "complete": True, "world_size": 2, "participants": [
            {"addr": "h", "pid": 1, "local_id": 0, "rank": 0}, {"addr": "h", "pid": 2, "local_id": 0, "rank": 0},
        ]}).encode(),
        "do not fit a complete group",
    ),
    "unknown-version": (json.dumps({**_VALID, "version": 4}).encode(), "format version 4 is not supported"),
    "empty": (b"", "not UTF-8 JSON"),
    "deeply-nested": (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply"),
}


def run_snapshot(admin, key_prefix: str) -> dict:
    return snapshot(admin, key_prefix + "/")


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_state_raises_state_error_and_touches_nothing(etcd_run, case):
    value, problem = CORRUPT[case]
    admin = etcd_client(etcd_run.endpoint)
    key = RunKeys(etcd_run.key_prefix, etcd_run.run_id).state
    handler = None
    try:
        admin.put(key, value)
        before = run_snapshot(admin, etcd_run.key_prefix)
        handler = create_handler(params_for(etcd_run.endpoint, etcd_run.run_id, etcd_run.key_prefix))
        with pytest.raises(RendezvousStateError) as failure:
            handler.next_rendezvous()
        message = str(failure.value)
        assert etcd_run.run_id in message and problem in message, message
        after = run_snapshot(admin, etcd_run.key_prefix)
        assert after == before, f"keys changed: {sorted(set(after) ^ set(before)) or 'values/revisions'}"
    finally:
        if handler is not None:
            handler.shutdown()
        admin.close()


def test_a_deeply_nested_record_fails_the_call_and_shutdown_with_a_state_error(etcd_run):
    """A record nested past Python's recursion limit (another client's bug, or a hostile writer)
    raised RecursionError out of next_rendezvous() and shutdown(); shutdown() must return False."""
    admin = etcd_client(etcd_run.endpoint)
    keys = RunKeys(etcd_run.key_prefix, etcd_run.run_id)
    handler = None
    try:
        admin.put(keys.state, codec.encode_state(RendezvousState()))
        admin.put(keys.joins + "hostile", b"[" * 100_000 + b"]" * 100_000)
        handler = create_handler(params_for(etcd_run.endpoint, etcd_run.run_id, etcd_run.key_prefix))
        with pytest.raises(RendezvousStateError, match="nested too deeply") as failure:
            handler.next_rendezvous()
        assert keys.joins in str(failure.value) or etcd_run.run_id in str(failure.value)
        assert handler.shutdown() is False
        handler = None
    finally:
        if handler is not None:
            handler.shutdown()
        admin.close()


def test_a_state_whose_cursor_is_far_ahead_fails_clearly_without_a_write_storm(etcd_run):
    """A cursor far past the mailbox made every node re-post its join in a tight loop (6,656
    announcements in 12 s from 3 agents): its records all looked folded, none was."""
    admin = etcd_client(etcd_run.endpoint)
    key = RunKeys(etcd_run.key_prefix, etcd_run.run_id).state
    handlers = [
        create_handler(params_for(etcd_run.endpoint, etcd_run.run_id, etcd_run.key_prefix, 3, 3, join_timeout=6))
        for _ in range(3)
    ]
    pool = ThreadPoolExecutor(3)
    try:
        admin.put(key, codec.encode_state(RendezvousState(cursor=10**15)))
        before = admin.get_response(key).header.revision

        def attempt(handler) -> BaseException | None:
            try:
                handler.next_rendezvous()
            except BaseException as exc:  # noqa: BLE001 - judged below
                return exc
            return None

        failures = list(pool.map(attempt, handlers))
        writes = admin.get_response(key).header.revision - before
        for failure in failures:
            assert isinstance(failure, RendezvousStateError), failure
            assert "cursor" in str(failure) and str(10**15) in str(failure) and "Reset the run" in str(failure)
        # Each node beats (a lease and a key) and may post once; never a storm.
        assert writes <= 6 * len(handlers), f"{writes} writes to etcd"
    finally:
        for handler in handlers:
            handler.shutdown()
        pool.shutdown()
        admin.close()


def test_a_liveness_key_that_is_not_utf8_is_skipped(etcd_run, caplog):
    admin = etcd_client(etcd_run.endpoint)
    keys = RunKeys(etcd_run.key_prefix, etcd_run.run_id)
    pool = ThreadPoolExecutor(2)
    handlers = [
        create_handler(params_for(etcd_run.endpoint, etcd_run.run_id, etcd_run.key_prefix, 2, 2)) for _ in range(2)
    ]
    try:
        admin.put(keys.alive.encode() + b"\xff\xfe-not-utf8", b"x")
        with caplog.at_level("WARNING"):
            infos = list(pool.map(lambda h: h.next_rendezvous(), handlers))
        assert sorted(i.rank for i in infos) == [0, 1]
        assert {i.world_size for i in infos} == {2}
        assert any("not UTF-8" in r.getMessage() for r in caplog.records)
    finally:
        for handler in handlers:
            handler.shutdown()
        pool.shutdown()
        admin.close()


def test_monitoring_calls_report_a_corrupt_state_too(etcd_run):
    """torchrun's monitor loop calls num_nodes_waiting/is_closed; on a corrupt state they raise, also
    right after a next_rendezvous that failed on it (a failed read is no fresh view to cache)."""
    admin = etcd_client(etcd_run.endpoint)
    handler = None
    try:
        admin.put(RunKeys(etcd_run.key_prefix, etcd_run.run_id).state, b"[]")
        handler = create_handler(params_for(etcd_run.endpoint, etcd_run.run_id, etcd_run.key_prefix))
        with pytest.raises(RendezvousStateError):
            handler.next_rendezvous()
        with pytest.raises(RendezvousStateError):
            handler.num_nodes_waiting()
        with pytest.raises(RendezvousStateError):
            handler.is_closed()
    finally:
        if handler is not None:
            handler.shutdown()
        admin.close()


def test_oversized_state_raises_state_error(etcd_server):
    # etcd refuses requests over --max-request-bytes (1.5 MiB by default); this server takes more.
    server = etcd_server(["--max-request-bytes=20971520"])
    run_id, prefix = "oversized", "/rdzv-oversized"
    admin = etcd_client(server.endpoint)
    handler = None
    try:
        admin.put(RunKeys(prefix, run_id).state, b" " * (codec.MAX_STATE_BYTES + 1))
        before = run_snapshot(admin, prefix)
        handler = create_handler(params_for(server.endpoint, run_id, prefix))
        with pytest.raises(RendezvousStateError) as failure:
            handler.next_rendezvous()
        assert f"over the {codec.MAX_STATE_BYTES} byte limit" in str(failure.value)
        assert run_id in str(failure.value)
        assert run_snapshot(admin, prefix) == before
    finally:
        if handler is not None:
            handler.shutdown()
        admin.close()


def test_oversized_state_is_refused_by_the_codec():
    with pytest.raises(RendezvousStateError, match="over the .* byte limit") as failure:
        codec.decode_state(b" " * (codec.MAX_STATE_BYTES + 1), "the key '/x/run'")
    assert "'/x/run'" in str(failure.value)


# -- bad configuration -----------------------------------------------------------------------


class CountingListener:
    """A plain TCP listener on loopback that counts the connections it accepts."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[CountingListener]:
    counting = CountingListener()
    yield counting
    counting.close()


# (endpoint template, conf, the text the ValueError must contain); {ep} is the listener.
BAD_CONFIG = {
    "endpoint-bad-host": ("{ep},bad host:2379", {}, "entry 'bad host:2379'"),
    "endpoint-url-scheme": ("http://{ep}", {}, "URL scheme"),
    "endpoint-bare-ipv6": ("{ep},::1:2379", {}, "bare IPv6"),
    "endpoint-empty-entry": ("{ep},,", {}, "is empty"),
    "port-zero": ("127.0.0.1:0", {}, "port '0'"),
    "port-too-big": ("{ep},127.0.0.1:65536", {}, "port '65536'"),
    "port-negative": ("127.0.0.1:-1", {}, "port '-1'"),
    "port-not-number": ("127.0.0.1:http", {}, "port 'http'"),
    "protocol-unknown": ("{ep}", {"protocol": "gopher"}, "'protocol'"),
    "read-timeout-zero": ("{ep}", {"read_timeout": 0}, "'read_timeout'"),
    "read-timeout-negative": ("{ep}", {"read_timeout": -5}, "'read_timeout'"),
    "read-timeout-nan": ("{ep}", {"read_timeout": "nan"}, "'read_timeout'"),
    "ttl-zero": ("{ep}", {"ttl": 0}, "'ttl'"),
    "join-timeout-zero": ("{ep}", {"join_timeout": 0}, "'join_timeout'"),
    "last-call-negative": ("{ep}", {"last_call_timeout": -1}, "'last_call_timeout'"),
    "keep-alive-zero": ("{ep}", {"keep_alive_interval": 0}, "'keep_alive_interval'"),
    "keep-alive-attempts-fraction": ("{ep}", {"keep_alive_max_attempt": 1.5}, "'keep_alive_max_attempt'"),
    "heartbeat-timeout-text": ("{ep}", {"heartbeat_timeout": "soon"}, "'heartbeat_timeout'"),
    "ca-cert-missing": ("{ep}", {"protocol": "https", "ca_cert": "/nonexistent/ca.pem"}, "'ca_cert'"),
    "ssl-cert-missing": (
        "{ep}", {"protocol": "https", "ssl_cert": "/nonexistent/c.pem", "ssl_cert_key": "/nonexistent/k.pem"}, "'ssl_cert'",
    ),
    "key-prefix-relative": ("{ep}", {"key_prefix": "relative/path"}, "'key_prefix'"),
    "username-without-password": ("{ep}", {"username": "root"}, "'username'"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIG))
def test_bad_configuration_is_a_value_error_before_any_traffic(listener, case):
    template, conf, expected = BAD_CONFIG[case]
    endpoint = template.format(ep=f"127.0.0.1:{listener.port}")
    conf = {"key_prefix": "/rdzv-bad-config", **conf}
    params = RendezvousParameters("etcd_rdzv", endpoint, "bad-config", 1, 2, local_addr="127.0.0.1", **conf)
    # The backend alone checks its own options; the handler (what torchrun builds) checks all.
    core = case.split("-")[0] in ("join", "last", "keep", "heartbeat")
    if not core:
        with pytest.raises(ValueError) as failure:
            create_backend(params, "etcd_rdzv")
        assert expected in str(failure.value), str(failure.value)
    with pytest.raises(ValueError) as failure:
        create_handler(params)
    assert expected in str(failure.value), str(failure.value)
    assert listener.accepted == 0


def test_min_nodes_above_max_nodes_is_a_value_error_before_any_traffic(listener):
    endpoint = f"127.0.0.1:{listener.port}"
    # torch's RendezvousParameters refuses it already; a caller that bypasses it meets the core's check.
    with pytest.raises(ValueError, match="minimum number of rendezvous nodes"):
        RendezvousParameters("etcd_rdzv", endpoint, "bad-config", 3, 2)
    params = RendezvousParameters("etcd_rdzv", endpoint, "bad-config", 2, 2, local_addr="127.0.0.1")
    params.min_nodes = 3
    with pytest.raises(ValueError, match="max_nodes .* min_nodes"):
        create_handler(params)
    assert listener.accepted == 0


def test_the_listener_does_see_a_client_that_connects(listener):
    # Control for the tests above: a valid configuration does reach the listener.
    params = RendezvousParameters(
        "etcd_rdzv", f"127.0.0.1:{listener.port}", "control", 1, 1, read_timeout=1, key_prefix="/rdzv-control"
    )
    backend, _ = create_backend(params, "etcd_rdzv")
    try:
        with pytest.raises(RendezvousConnectionError):
            backend.get_state()
    finally:
        backend.close()
    assert listener.accepted > 0


# -- other jobs' keys ------------------------------------------------------------------------


def test_other_jobs_keys_are_never_read_or_written(etcd_run):
    """Run A ("…job10" under ".../a") next to other jobs whose names overlap as strings: "…job1"
    and "…job100" under the same prefix, and "…job10" itself under the prefix ".../ab"."""
    base, prefix = etcd_run.run_id, etcd_run.key_prefix
    run_a, prefix_a = f"{base}-job10", f"{prefix}/a"
    others = [(f"{base}-job1", prefix_a), (f"{base}-job100", prefix_a), (run_a, f"{prefix}/ab")]
    admin = etcd_client(etcd_run.endpoint)
    pool = ThreadPoolExecutor(4)
    handlers = []
    try:
        for run_id, key_prefix in others:
            handler = create_handler(params_for(etcd_run.endpoint, run_id, key_prefix))
            handlers.append(handler)
            handler.next_rendezvous()
        prefixes = [f"{prefix}/"]  # every job of this test, stores included, lives below it
        before = snapshot(admin, *prefixes)
        # Each other job published its round's trainer store (MASTER_ADDR/MASTER_PORT) in its store.
        assert sum(k.endswith(b"/MASTER_ADDR") for k in before) == len(others), sorted(before)

        key_a = RunKeys(prefix_a, run_a).state
        runs_a = [create_handler(params_for(etcd_run.endpoint, run_a, prefix_a, 2, 2)) for _ in range(2)]
        handlers.extend(runs_a)
        with InvariantChecker(etcd_run.endpoint, key_a, 2, 2):
            for _ in range(2):
                infos = list(pool.map(lambda h: h.next_rendezvous(), runs_a))
                assert sorted(i.rank for i in infos) == [0, 1]
                infos[0].store.set("payload", "A")
                assert infos[1].store.get("payload") == b"A"
        backend_a, _ = create_backend(params_for(etcd_run.endpoint, run_a, prefix_a), "etcd_rdzv")
        try:
            backend_a.delete_run()
        finally:
            backend_a.close()

        after = snapshot(admin, *prefixes)
        changed = sorted(k.decode() for k in before if after.get(k) != before[k])
        assert not changed, f"run A changed or deleted other jobs' keys: {changed}"
        own = (key_a.encode(), f"{key_a}/".encode())
        leftover = sorted(k.decode() for k in set(after) - set(before) if not k.startswith(own))
        assert not leftover, f"run A wrote outside its own keys: {leftover}"
    finally:
        for handler in handlers:
            handler.shutdown()
        pool.shutdown()
        admin.close()
