"""``etcd-rdzv`` against a real etcd, with live rendezvous handlers in this process and the
command run as a separate process (``python -m etcd_rdzv``) to check its output and exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import etcd3
import etcd3.utils
import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters

from etcd_rdzv.cli import main
from etcd_rdzv.demo import TRAINER
from etcd_rdzv.factory import create_backend
from etcd_rdzv.keys import RunKeys
from integration_tests.agents import FAST_CONF, etcd_agent_group
from integration_tests.etcd_fixture import free_port
from rdzv_common.codec import encode_state
from rdzv_common.handler import DynamicRendezvousHandler, create_handler
from rdzv_common.state import RendezvousState

# Each command starts a Python that imports torch: seconds apiece on a busy two-core machine, and a
# test runs up to six of them.
pytestmark = pytest.mark.timeout(180)

COMMAND_TIMEOUT = 60


def _clean_env(extra: Mapping[str, str] = {}) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_RDZV_")}
    return {**env, **extra}


def _connection(space) -> list[str]:
    return ["--endpoints", space.endpoint, "--key-prefix", space.key_prefix, "--read-timeout", "5"]


def cli(*args: str, env: Mapping[str, str] = {}) -> subprocess.CompletedProcess:
    """Run ``python -m etcd_rdzv ARGS`` to completion, bounded by ``COMMAND_TIMEOUT``."""
    return subprocess.run(
        [sys.executable, "-m", "etcd_rdzv", *args],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        env=_clean_env(env),
    )


def assert_one_line_error(result: subprocess.CompletedProcess, code: int) -> str:
    """The command failed with ``code`` and said why in exactly one line; return that line."""
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("etcd-rdzv: error: "), result.stderr
    return lines[0]


@contextlib.contextmanager
def live_run(space, run_id: str) -> Iterator[list[DynamicRendezvousHandler]]:
    """Two handlers that completed round 0 of ``run_id``; shut down on exit."""
    params = RendezvousParameters(
        backend="etcd_rdzv",
        endpoint=space.endpoint,
        run_id=run_id,
        min_nodes=2,
        max_nodes=2,
        local_addr="127.0.0.1",
        keep_alive_interval=1,
        keep_alive_max_attempt=3,
        key_prefix=space.key_prefix,
        read_timeout=10,
    )
    handlers = []
    try:
        for _ in range(2):
            backend, store = create_backend(params, name="etcd_rdzv")
            handlers.append(create_handler(store, backend, params))
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda h: h.next_rendezvous(), handlers))
        yield handlers
    finally:
        for handler in handlers:
            handler.shutdown()


def run_keys(admin: etcd3.MultiEndpointEtcd3Client, space, run_id: str) -> set[str]:
    """Every key of ``run_id``: the keys of its directory."""
    root = RunKeys(space.key_prefix, run_id).root
    return {m.key.decode() for _, m in admin.get_prefix(root, keys_only=True)}


def test_status_and_list_show_a_live_run(etcd_run, etcd_admin):
    with live_run(etcd_run, etcd_run.run_id) as handlers:
        result = cli("status", etcd_run.run_id, "--json", *_connection(etcd_run))
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        assert (doc["run_id"], doc["round"], doc["complete"], doc["closed"], doc["world_size"]) == (
            etcd_run.run_id, 0, True, False, 2
        )
        assert sorted(p["rank"] for p in doc["participants"]) == [0, 1]
        assert {p["node"] for p in doc["participants"]} == {h.node.key for h in handlers}
        assert all(p["alive"] and p["lease_ttl"] > 0 and p["addr"] == "127.0.0.1" for p in doc["participants"])
        # Lease ids are 64-bit: as JSON numbers jq would round them. Hex strings, as etcdctl takes them.
        layout = RunKeys(etcd_run.key_prefix, etcd_run.run_id)
        for p in doc["participants"]:
            assert isinstance(p["lease_id"], str), p
            assert int(p["lease_id"], 16) == etcd_admin.get(layout.alive_key(p["node"]))[1].lease_id
        assert doc["wait_list"] == doc["redundancy_list"] == []
        assert doc["pending_joins"] == 0 and doc["mod_revision"] > 0

        text = cli("status", etcd_run.run_id, *_connection(etcd_run))
        assert text.returncode == 0, text.stderr
        assert "0, complete, open, world size 2" in text.stdout
        for handler in handlers:
            assert f"{handler.node.key}  addr=127.0.0.1" in text.stdout
        assert text.stdout.count("alive (lease") == 2

        listed = cli("list", *_connection(etcd_run))
        assert listed.returncode == 0, listed.stderr
        header, line = listed.stdout.splitlines()
        assert header.split() == ["RUN", "ROUND", "STATE", "OPEN", "PARTICIPANTS", "ALIVE", "REVISION"]
        assert line.split()[:6] == [etcd_run.run_id, "0", "complete", "open", "2", "2"]
        assert header.index("ROUND") == line.index(" 0 ") + 1  # in columns
        runs = json.loads(cli("list", "--json", *_connection(etcd_run)).stdout)["runs"]
        assert [(r["run_id"], r["participants"], r["complete"], r["error"]) for r in runs] == [
            (etcd_run.run_id, 2, True, None)
        ]


def _start_watch(space, *args: str) -> subprocess.Popen:
    """Start ``watch`` and return once it printed its first line (it is watching from then on)."""
    watch = subprocess.Popen(
        [sys.executable, "-m", "etcd_rdzv", "watch", space.run_id, *args, *_connection(space)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_clean_env(),
    )
    with ThreadPoolExecutor(1) as pool:
        header = pool.submit(watch.stdout.readline).result(timeout=COMMAND_TIMEOUT)
    assert f"watching run '{space.run_id}': round 0 complete, world size 2" in header, header
    return watch


def test_watch_reports_close_and_close_ends_the_run(etcd_run):
    with live_run(etcd_run, etcd_run.run_id) as handlers:
        watch = _start_watch(etcd_run, "--count", "1", "--timeout", "20")
        try:
            closed = cli("close", etcd_run.run_id, *_connection(etcd_run))
            assert closed.returncode == 0, closed.stderr
            # What close does to a running group: nothing until its workers exit (an agent polls
            # only num_nodes_waiting while they are healthy); the way to stop it now is named.
            assert "closed at round 0" in closed.stdout
            assert "A running group trains on until its workers exit" in closed.stdout
            assert f"etcd-rdzv close {etcd_run.run_id} --now" in closed.stdout
            out, err = watch.communicate(timeout=COMMAND_TIMEOUT)
        finally:
            watch.kill()
        assert watch.returncode == 0, err
        assert out.strip().endswith("] closed"), out

        deadline = time.monotonic() + 10
        while not all(h.is_closed() for h in handlers):
            assert time.monotonic() < deadline, "the handlers never saw the run closed"
            time.sleep(0.2)
        again = cli("close", etcd_run.run_id, *_connection(etcd_run))
        assert again.returncode == 0 and "already closed" in again.stdout


def test_watch_json_prints_one_object_a_line_with_the_state_after_each_change(etcd_run):
    with live_run(etcd_run, etcd_run.run_id) as handlers:
        watch = subprocess.Popen(
            [sys.executable, "-m", "etcd_rdzv", "watch", etcd_run.run_id, "--json", "--count", "1", "--timeout", "30",
             *_connection(etcd_run)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_clean_env(),
        )
        try:
            with ThreadPoolExecutor(1) as pool:
                first = json.loads(pool.submit(watch.stdout.readline).result(timeout=COMMAND_TIMEOUT))
            assert cli("close", etcd_run.run_id, "--now", *_connection(etcd_run)).returncode == 0
            out, err = watch.communicate(timeout=COMMAND_TIMEOUT)
        finally:
            watch.kill()
    assert watch.returncode == 0, err
    assert first["run_id"] == etcd_run.run_id and first["change"].startswith("watching run")
    assert first["state"]["complete"] and first["state"]["world_size"] == 2
    assert set(first["state"]["participants"]) == {h.node.key for h in handlers}
    assert sorted(first["state"]["participants"].values()) == [0, 1]
    assert sorted(first["alive"]) == sorted(h.node.key for h in handlers)
    [change] = [json.loads(line) for line in out.splitlines()]
    assert change["change"].startswith("closed with --now")
    assert change["state"]["closed"] and change["state"]["stop_now"] and change["revision"] > first["revision"]


def test_reset_refuses_a_run_with_live_nodes_unless_forced(etcd_run, etcd_admin):
    """Bug: `reset --yes` deleted a run whose agents were alive, without a word, and they wrote it
    again at their next step."""
    with live_run(etcd_run, etcd_run.run_id):
        before = run_keys(etcd_admin, etcd_run, etcd_run.run_id)
        refused = cli("reset", etcd_run.run_id, "--yes", *_connection(etcd_run))
        line = assert_one_line_error(refused, 2)
        assert "2 of its nodes are alive" in line and "--force" in line and "close" in line and "--now" in line
        assert run_keys(etcd_admin, etcd_run, etcd_run.run_id) >= {k for k in before if "/joins/" not in k}
        forced = cli("reset", etcd_run.run_id, "--yes", "--force", *_connection(etcd_run))
        assert forced.returncode == 0, forced.stderr
        assert "2 live node(s)" in forced.stdout
        assert RunKeys(etcd_run.key_prefix, etcd_run.run_id).state not in run_keys(etcd_admin, etcd_run, etcd_run.run_id)


def test_watch_exits_cleanly_on_ctrl_c(etcd_run):
    with live_run(etcd_run, etcd_run.run_id):
        watch = _start_watch(etcd_run)
        try:
            watch.send_signal(signal.SIGINT)
            _, err = watch.communicate(timeout=COMMAND_TIMEOUT)
        finally:
            watch.kill()
        assert watch.returncode == 0 and err == ""


def test_reset_deletes_every_key_of_its_run_and_nothing_else(etcd_run, etcd_admin):
    other = etcd_run.run_id + "2"  # its id starts with this run's id
    try:
        with live_run(etcd_run, other):
            with live_run(etcd_run, etcd_run.run_id):
                pass
            mine = run_keys(etcd_admin, etcd_run, etcd_run.run_id)
            assert RunKeys(etcd_run.key_prefix, etcd_run.run_id).state in mine
            assert any(k.startswith(RunKeys(etcd_run.key_prefix, etcd_run.run_id).store) for k in mine)
            theirs = {k for k in run_keys(etcd_admin, etcd_run, other) if "/joins/" not in k}

            refused = cli("reset", etcd_run.run_id, *_connection(etcd_run))
            assert "--yes" in assert_one_line_error(refused, 2)
            assert f"state key {RunKeys(etcd_run.key_prefix, etcd_run.run_id).state} (present)" in refused.stdout
            assert run_keys(etcd_admin, etcd_run, etcd_run.run_id) == mine

            done = cli("reset", etcd_run.run_id, "--yes", *_connection(etcd_run))
            assert done.returncode == 0, done.stderr
            assert run_keys(etcd_admin, etcd_run, etcd_run.run_id) == set()
            assert theirs <= run_keys(etcd_admin, etcd_run, other)
            assert_one_line_error(cli("reset", etcd_run.run_id, "--yes", *_connection(etcd_run)), 3)
    finally:
        etcd_admin.delete_prefix(RunKeys(etcd_run.key_prefix, other).root)


def test_a_corrupt_state_is_one_line_that_says_to_reset(etcd_run, etcd_admin):
    etcd_admin.put(RunKeys(etcd_run.key_prefix, etcd_run.run_id).state, os.urandom(64))
    line = assert_one_line_error(cli("status", etcd_run.run_id, *_connection(etcd_run)), 1)
    assert "corrupt" in line and f"etcd-rdzv reset {etcd_run.run_id} --yes" in line
    listed = cli("list", *_connection(etcd_run))
    assert listed.returncode == 0 and f"{etcd_run.run_id}  CORRUPT" in listed.stdout


def test_an_unknown_run_exits_3(etcd_run):
    line = assert_one_line_error(cli("status", "no-such-run", *_connection(etcd_run)), 3)
    assert "not found" in line


def test_an_unreachable_etcd_fails_fast_in_one_line(capsys):
    argv = ["status", "any", "--endpoints", f"127.0.0.1:{free_port()}", "--read-timeout", "2"]
    assert "could not be reached" in assert_one_line_error(cli(*argv), 1)
    # Timed in this process, so that the interpreter's start and torch's import are not counted:
    # the command gives up after its read timeout, not after retrying on.
    started = time.monotonic()
    assert main(argv, environ={}) == 1
    assert time.monotonic() - started < 2 + 3
    assert "could not be reached" in capsys.readouterr().err


def test_an_invalid_option_exits_2_in_one_line():
    assert "'protocol'" in assert_one_line_error(cli("status", "r", "--protocol", "ftp"), 2)


def test_environment_configures_the_connection_and_flags_win(etcd_run, etcd_admin):
    etcd_admin.put(RunKeys(etcd_run.key_prefix, etcd_run.run_id).state, encode_state(RendezvousState(round=4)))
    env = {"ETCD_RDZV_ENDPOINTS": etcd_run.endpoint, "ETCD_RDZV_KEY_PREFIX": etcd_run.key_prefix}
    from_env = cli("status", etcd_run.run_id, "--json", env=env)
    assert from_env.returncode == 0, from_env.stderr
    assert json.loads(from_env.stdout)["round"] == 4

    wrong = {**env, "ETCD_RDZV_ENDPOINTS": f"127.0.0.1:{free_port()}", "ETCD_RDZV_READ_TIMEOUT": "2"}
    flag_wins = cli("--endpoints", etcd_run.endpoint, "status", etcd_run.run_id, env=wrong)
    assert flag_wins.returncode == 0, flag_wins.stderr
    assert_one_line_error(cli("status", etcd_run.run_id, env=wrong), 1)


def test_quarantine_add_shows_in_status_and_remove_ends_it(etcd_run):
    with live_run(etcd_run, etcd_run.run_id):
        started = time.monotonic()
        added = cli("quarantine", etcd_run.run_id, "--add", "10.0.0.7", "--for", "10m", *_connection(etcd_run))
        assert added.returncode == 0, added.stderr
        assert "host 10.0.0.7 quarantined" in added.stdout

        doc = json.loads(cli("status", etcd_run.run_id, "--json", *_connection(etcd_run)).stdout)
        elapsed = time.monotonic() - started
        [entry] = doc["quarantined"]
        assert entry["host"] == "10.0.0.7" and 600 - elapsed - 1 <= entry["seconds_left"] <= 600
        assert "operator" in entry["reason"]
        text = cli("status", etcd_run.run_id, *_connection(etcd_run)).stdout
        assert "quarantined:      1" in text and "10.0.0.7  " in text and "s left" in text

        listed = cli("quarantine", etcd_run.run_id, *_connection(etcd_run))
        assert listed.returncode == 0 and listed.stdout.startswith("10.0.0.7  "), listed

        removed = cli("quarantine", etcd_run.run_id, "--remove", "10.0.0.7", *_connection(etcd_run))
        assert removed.returncode == 0, removed.stderr
        doc = json.loads(cli("status", etcd_run.run_id, "--json", *_connection(etcd_run)).stdout)
        assert doc["quarantined"] == []


def test_quarantine_rejects_a_bad_duration_in_one_line(etcd_run):
    result = cli("quarantine", etcd_run.run_id, "--add", "h", "--for", "ten", *_connection(etcd_run))
    assert "invalid duration 'ten'" in assert_one_line_error(result, 2)
    result = cli("quarantine", etcd_run.run_id, "--add", "h", *_connection(etcd_run))
    assert "--add needs --for" in assert_one_line_error(result, 2)


def _steps(agent) -> int:
    return len(re.findall(r"\] step \d+ ", agent.output()))


def test_close_leaves_a_running_group_training_and_close_now_ends_it(tmp_path, etcd_endpoints):
    """Under real torchrun: after `close` the group trains on (an agent asks only
    num_nodes_waiting while its workers are healthy); after `close --now` every agent stops its
    workers within seconds and exits with status 1 on RendezvousClosedError."""
    run_id = f"close-{uuid.uuid4().hex[:8]}"
    endpoint = etcd_endpoints[0]
    env = {"DEMO_STOP_FILE": str(tmp_path / "never"), "DEMO_STEP_SECONDS": "0.2"}
    with etcd_agent_group(tmp_path, endpoint, run_id, nnodes="2", conf=dict(FAST_CONF), max_restarts=3, env=env) as job:
        agents = [job.start(str(TRAINER)) for _ in range(2)]
        deadline = time.monotonic() + 120
        while not all(_steps(a) >= 3 for a in agents):
            assert time.monotonic() < deadline, job.logs()
            assert all(a.proc.poll() is None for a in agents), job.logs()
            time.sleep(0.5)

        closed = cli("close", run_id, "--endpoints", endpoint)
        assert closed.returncode == 0 and "trains on" in closed.stdout, closed
        before = [_steps(a) for a in agents]
        time.sleep(3)
        assert all(a.proc.poll() is None for a in agents), job.logs()
        assert all(_steps(a) > n for a, n in zip(agents, before)), job.logs()

        now = cli("close", run_id, "--now", "--endpoints", endpoint)
        assert now.returncode == 0 and "with --now" in now.stdout, now
        assert job.wait(timeout=60) == [1, 1], job.logs()
        for agent in agents:
            out = agent.output()
            assert "was closed with `close --now`" in out and "RendezvousClosedError" in out, out
        status = cli("status", run_id, "--json", "--endpoints", endpoint)
        doc = json.loads(status.stdout)
        assert doc["closed"] and doc["stop_now"] and doc["participants"] == [], doc

