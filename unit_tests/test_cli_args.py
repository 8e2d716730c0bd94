"""``etcd-rdzv`` without etcd: options and their environment variables, the configuration they
build, one-line usage errors, and the lines ``watch`` prints for state changes."""

from __future__ import annotations

import re

import pytest

from etcd_rdzv.cli.changes import RunWatcher, state_changes
from etcd_rdzv.cli.command_line import build_parser, main
from etcd_rdzv.cli.options import DEFAULT_READ_TIMEOUT, load_config
from etcd_rdzv.cli.runs import RunSnapshot
from etcd_rdzv.keys import RunKeys, parse


def run_of_key(prefix: str, key: str) -> str | None:
    parsed = parse(prefix, key.encode())
    return None if parsed is None else parsed[0]


def run_of_state_key(prefix: str, key: str) -> str | None:
    parsed = parse(prefix, key.encode())
    return parsed[0] if parsed is not None and parsed[1] == "state" else None
from rdzv_common.codec import encode_state
from rdzv_common.state import NodeDesc, RendezvousState

A, B, C = NodeDesc("10.0.0.1", 5, 0), NodeDesc("10.0.0.2", 6, 0), NodeDesc("10.0.0.3", 77, 0)


def config(argv: list[str], environ: dict[str, str] | None = None):
    return load_config(build_parser().parse_args(argv), environ or {})


def test_flags_map_to_the_backend_options_and_win_over_the_environment(tmp_path):
    pem = tmp_path / "x.pem"
    pem.write_text("-")
    environ = {
        "ETCD_RDZV_ENDPOINTS": "env-host:1",
        "ETCD_RDZV_KEY_PREFIX": "/from/env",
        "ETCD_RDZV_USER": "root",
        "ETCD_RDZV_PASSWORD": "secret",
    }
    argv = ["--protocol", "https", "--ca-cert", str(pem), "status", "r", "--endpoints", "a:1,[::1]:2"]
    argv += ["--cert", str(pem), "--key", str(pem), "--read-timeout", "2.5"]
    got = config(argv, environ)
    assert got.endpoints == (("a", 1), ("::1", 2))
    assert (got.protocol, got.ca_cert, got.ssl_cert, got.ssl_cert_key) == ("https", str(pem), str(pem), str(pem))
    assert (got.username, got.password, got.key_prefix, got.read_timeout) == ("root", "secret", "/from/env", 2.5)


def test_defaults_suit_an_operator():
    got = config(["list"], {"ETCD_RDZV_PROTOCOL": ""})
    assert got.endpoints == (("localhost", 2379),)
    assert (got.protocol, got.read_timeout) == ("http", DEFAULT_READ_TIMEOUT)
    assert got.key_prefix == "/torch/elastic/rendezvous"


@pytest.mark.parametrize(
    "argv, environ, words",
    [
        (["status", "r", "--protocol", "ftp"], {}, "'protocol'"),
        (["status", "r"], {"ETCD_RDZV_READ_TIMEOUT": "-1"}, "'read_timeout'"),
        (["status", "r", "--cert", "/no/such.pem"], {}, "'ssl_cert'"),
        (["status", "r", "--user", "u"], {}, "'password'"),
        (["status"], {}, "RUN_ID"),
        (["watch", "r", "--count", "0"], {}, "invalid count"),
        ([], {}, "COMMAND"),
    ],
)
def test_bad_usage_is_one_line_and_exit_2(argv, environ, words, capsys):
    assert main(argv, environ) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("etcd-rdzv: error: ") and words in err


def test_state_changes_read_as_events():
    forming = RendezvousState(round=2, participants={A: 0, B: 0})
    joined = RendezvousState(round=2, participants={A: 0, B: 0, C: 0}, deadline=1e9)
    complete = RendezvousState(round=2, complete=True, participants={A: 0, B: 1, C: 2}, world_size=3)
    left = RendezvousState(round=2, complete=True, participants={B: 1, C: 2}, world_size=3, closed=True)
    assert state_changes(forming, joined)[0] == "round 2: +10.0.0.3_77_0 joined participants"
    assert state_changes(joined, complete) == [
        "round 2 complete: world size 3 (10.0.0.1_5_0=0, 10.0.0.2_6_0=1, 10.0.0.3_77_0=2)",
    ]
    assert state_changes(joined, forming) == [
        "round 2: -10.0.0.3_77_0 left participants",
        "round 2: last call cancelled",
    ]
    assert state_changes(complete, left) == ["round 2: -10.0.0.1_5_0 left participants", "closed"]
    assert state_changes(None, forming) == [
        "state created: round 2 forming; 2 participant(s), 0 waiting, 0 redundant",
        "round 2: +10.0.0.1_5_0 joined participants",
        "round 2: +10.0.0.2_6_0 joined participants",
    ]
    assert state_changes(forming, RendezvousState(round=2, participants={A: 0, B: 0}, cursor=9)) == [
        "round 2: state rewritten, nothing visible changed (join cursor 9)"
    ]


def test_the_watcher_reports_liveness_and_corruption():
    keys = RunSnapshot(RunKeys("/p", "r"), 10, encode_state(RendezvousState(complete=True, participants={A: 0}, world_size=1)),
                       alive={A.key: 7})
    watcher = RunWatcher(keys)
    assert watcher.on_liveness(A.key, False) == [f"node {A.key} lost liveness (participant, rank 0)"]
    assert watcher.on_liveness(A.key, False) == []
    assert watcher.on_state(b"\x00junk")[0].startswith("state is corrupt: ")
    deleted = watcher.on_snapshot(RunSnapshot(RunKeys("/p", "r"), 20, None))
    assert deleted == ["state deleted (the run was reset, or its keys expired)"]
    assert watcher.revision == 21


@pytest.mark.parametrize(
    "key, run_id",
    [
        ("/p/run/state", "run"),
        ("/p/a%2Fb/state", "a/b"),
        ("/p/run/joins/ab12", None),
        ("/p/run/alive/10.0.0.1_5_0", None),
        ("/p/x/joins/state", None),
        ("/p/run/store/state", None),
        ("/p/state", None),
        ("/other/run/state", None),
    ],
)
def test_list_tells_state_keys_from_a_runs_other_keys(key, run_id):
    assert run_of_state_key("/p", key) == run_id


def test_list_finds_the_run_of_a_key_in_its_directory():
    assert run_of_key("/p", "/p/team%2Frun/alive/10.0.0.1_5_0") == "team/run"
    assert run_of_key("/p", "/p/run/store/torch.rendezvous.run.0/MASTER_ADDR") == "run"
    assert run_of_key("/p", "/p/run") is None


@pytest.mark.parametrize("run_id", ["job", "job/x", "job/alive/n1", "job-2", "job.x", "job%2F", "a b", "ünï"])
def test_every_run_owns_one_directory_no_other_run_reaches(run_id):
    """Bug 5 (issue 10): run ids were not escaped, so run 'job/alive/n1' wrote keys that run 'job'
    read as its own liveness keys, and a reset of 'job' deleted run 'job/x'."""
    keys = RunKeys("/p", run_id)
    assert keys.state.startswith(keys.root) and keys.root.count("/") == 3
    assert run_of_state_key("/p", keys.state) == run_id
    for other in ["job", "job/x", "job/alive/n1", "job-2", "job.x", "job%2F", "a b", "ünï"]:
        if other != run_id:
            root = RunKeys("/p", other).root
            assert not root.startswith(keys.root) and not keys.root.startswith(root)


def test_the_exporter_takes_a_listen_address_and_the_connection_options():
    args = build_parser().parse_args(["exporter", "--listen", "[::1]:0", "--endpoints", "e:1"])
    assert args.listen == ("::1", 0)
    assert config(["exporter"], {"ETCD_RDZV_ENDPOINTS": "env-host:7"}).endpoints == (("env-host", 7),)
    assert build_parser().parse_args(["exporter"]).listen == ("127.0.0.1", 9464)


@pytest.mark.parametrize("listen", ["9464", ":9464", "host:http", "host:70000"])
def test_the_exporter_refuses_a_bad_listen_address_in_one_line(listen, capsys):
    assert main(["exporter", "--listen", listen], environ={}) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HOST:PORT" in err[0]


def test_the_help_shows_an_example_of_every_command(capsys):
    commands = ["status", "list", "watch", "close", "quarantine", "reset", "exporter"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    top = capsys.readouterr().out
    for command in commands:
        assert re.search(rf"etcd-rdzv --endpoints 10.0.0.5:2379 {command}\b", top), command
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        own = capsys.readouterr().out
        assert "example:" in own and re.search(rf" {command}\b", own.split("example:", 1)[1]), own


def test_status_tells_exited_nodes_of_a_closed_run_from_gone_and_live_ones():
    from etcd_rdzv.cli.status import render_status, status_document

    state = RendezvousState(round=2, complete=True, participants={A: 0, B: 1}, world_size=2)
    keys = RunSnapshot(RunKeys("/p", "r"), 10, encode_state(state), 9, 3, alive={A.key: 0x1F})
    open_run = "\n".join(render_status(status_document("r", keys, state, {0x1F: 7})))
    assert "alive (lease 1f, 7s left)" in open_run and "gone (no liveness key" in open_run
    state.closed = True
    closed = "\n".join(render_status(status_document("r", keys, state, {0x1F: 7})))
    assert "exited (no liveness key; the run is closed)" in closed and "DEAD" not in closed
    state.stop_now = True
    assert "CLOSED (--now" in "\n".join(render_status(status_document("r", keys, state, {})))


def test_close_now_reads_as_its_own_change():
    complete = RendezvousState(round=2, complete=True, participants={A: 0}, world_size=1)
    closed = RendezvousState(round=2, complete=True, participants={A: 0}, world_size=1, closed=True)
    now = RendezvousState(round=2, complete=True, participants={A: 0}, world_size=1, closed=True, stop_now=True)
    assert state_changes(complete, now) == ["closed with --now: the running group's agents stop their workers and exit"]
    assert state_changes(closed, now) == state_changes(complete, now)


def test_list_prints_a_header_and_columns():
    from etcd_rdzv.cli.runs import list_lines

    runs = [
        {"run_id": "a-long-run-id", "round": 12, "complete": True, "closed": False, "participants": 3,
         "alive": 3, "mod_revision": 4711, "error": None},
        {"run_id": "b", "error": "not JSON"},
    ]
    header, first, corrupt = list_lines(runs)
    assert header.split() == ["RUN", "ROUND", "STATE", "OPEN", "PARTICIPANTS", "ALIVE", "REVISION"]
    assert first.split() == ["a-long-run-id", "12", "complete", "open", "3", "3", "4711"]
    assert [header.index(c) for c in ("ROUND", "STATE", "REVISION")] == [first.index(" 12") + 1, first.index("complete"),
                                                                         first.index("4711")]
    assert corrupt.startswith("b  ") and "CORRUPT" in corrupt and "reset b --yes" in corrupt


def test_the_watcher_says_a_closed_runs_nodes_exited_not_lost():
    state = RendezvousState(complete=True, closed=True, participants={A: 0}, world_size=1)
    watcher = RunWatcher(RunSnapshot(RunKeys("/p", "r"), 10, encode_state(state), alive={A.key: 7}))
    assert watcher.on_liveness(A.key, False) == [
        f"node {A.key} exited (participant, rank 0): its liveness key is gone and the run is closed"
    ]
@pytest.mark.timeout(30)
def test_a_ctrl_c_as_the_watch_starts_ends_it(monkeypatch):
    """A Ctrl-C that lands as ``watch`` hands the watch to its worker thread, before the main
    thread waits for it, must still stop it: it left the watch running, and the process waiting
    for it for ever (``integration_tests/test_cli.py::test_watch_exits_cleanly_on_ctrl_c``, on a
    loaded machine)."""
    import argparse
    import threading

    import etcd_rdzv.cli.watch as watch_cli

    stopped = threading.Event()

    def watch_run(etcd, run_id, limits) -> None:
        # Follows the run until stopped; gives up after a while so that a failure cannot hang.
        if limits.stopped.wait(5):
            stopped.set()

    class InterruptedPool(watch_cli.ThreadPoolExecutor):
        def submit(self, *args, **kwargs):
            super().submit(*args, **kwargs)
            raise KeyboardInterrupt  # the signal, acted on as submit returns

    monkeypatch.setattr(watch_cli, "watch_run", watch_run)
    monkeypatch.setattr(watch_cli, "ThreadPoolExecutor", InterruptedPool)
    args = argparse.Namespace(timeout=None, count=None, run_id="run", json=False)
    try:
        code = watch_cli.cmd_watch(None, args)
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C escaped watch after its worker had followed the run to its own end")
    assert code == 0
    assert stopped.is_set(), "the watch ran on after the Ctrl-C"
