"""etcd faults: the leader of a 3-member cluster killed mid-rendezvous, a single etcd restarted
from its data directory mid-run, one that stays down, every member down while a formed group
trains (handlers, and real torchrun agents), and an etcd that was never there. Handlers run in
threads, each with its own backend; ``InvariantChecker`` watches the state throughout."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from benchmarks.invariants import etcd_client
from etcd_rdzv.embedded import EtcdCluster, free_port
from etcd_rdzv.keys import RunKeys
from integration_tests.agents import FAST_CONF, AgentGroup, etcd_agent_group
from integration_tests.faultrun import FAST, STEP, Run, assert_group, ordered_endpoint, wait_for_participants
from integration_tests.tools import wait_until
from rdzv_common.codec import decode_state
from unit_tests.torch_channels import torch_event_log, torch_metric_log

pytestmark = pytest.mark.timeout(90)

@pytest.fixture
def cluster(etcd_binary) -> Iterator[EtcdCluster]:
    with EtcdCluster(etcd_binary) as c:
        yield c


def test_cluster_leader_killed_mid_rendezvous_fails_over_and_loses_nothing(cluster):
    leader = cluster.leader()
    run = Run(ordered_endpoint(leader, cluster.members), 3, 3)
    try:
        handlers = [run.handler() for _ in range(3)]
        with run.checker() as checker:
            early = run.next(handlers[:2])
            wait_for_participants(checker, 2)
            leader.kill()
            late = run.next(handlers[2:])
            infos = [f.result(timeout=STEP) for f in early + late]
            round_ = assert_group(infos, checker, handlers, run)
            assert cluster.leader() is not leader

            # The member comes back with its data and catches up: the group is intact on it alone.
            leader.start()
            solo = etcd_client(leader.endpoint)
            try:
                def read_solo():
                    try:
                        return solo.get(run.key)[0]
                    except Exception:  # noqa: BLE001 - still catching up
                        return None

                value = wait_until(read_solo, STEP, 0.1, "the state on the restarted member")
                state = decode_state(value)
            finally:
                solo.close()
            assert state.round == round_ and state.complete
            assert {n.key: r for n, r in state.participants.items()} == checker.group(round_).ranks

            # And the run goes on: another round over all three members.
            infos = [f.result(timeout=STEP) for f in run.next(handlers)]
            assert assert_group(infos, checker, handlers, run) > round_
    finally:
        run.close()


def test_single_etcd_restarted_mid_run_is_ridden_out(etcd_server):
    server = etcd_server()
    run = Run(server.endpoint, 2, 2, read_timeout=10)
    try:
        handlers = [run.handler() for _ in range(2)]
        with run.checker() as checker:
            infos = [f.result(timeout=STEP) for f in run.next(handlers)]
            first = assert_group(infos, checker, handlers, run)
            server.stop()
            started = time.monotonic()
            pending = run.next(handlers)
            time.sleep(2)
            server.start()
            infos = [f.result(timeout=STEP) for f in pending]
            # Within read_timeout of the outage's start, plus one last call.
            assert time.monotonic() - started < run.read_timeout + FAST["last_call_timeout"] + 2
            assert assert_group(infos, checker, handlers, run) > first
    finally:
        run.close()


def test_single_etcd_that_stays_down_fails_with_connection_error_within_read_timeout(etcd_server):
    server = etcd_server()
    # Enough for several attempts of a request (one takes at least 2 s) on a busy machine, where a
    # fresh server's first writes can each take seconds.
    run = Run(server.endpoint, 1, 1, read_timeout=10)
    try:
        (handler,) = [run.handler()]
        with run.checker() as checker:
            run.next([handler])[0].result(timeout=STEP)
            checker.sync()
            before = checker.states[-1]
        server.stop()
        started = time.monotonic()
        with pytest.raises(RendezvousConnectionError) as failure:
            handler.next_rendezvous()
        elapsed = time.monotonic() - started
        # One read_timeout for its own request, plus at most one for a heartbeat already in flight
        # (it holds the handler's lock until its request gives up).
        assert elapsed < 2 * 10 + 1.5, f"took {elapsed:.1f}s with read_timeout=10"
        assert server.endpoint in str(failure.value)
        assert "read_timeout=10" in str(failure.value)
        # Back up: the run's state is as the outage found it, and the handler still works.
        server.start()
        admin = etcd_client(server.endpoint)
        try:
            assert decode_state(admin.get(run.key)[0]) == before[1]
        finally:
            admin.close()
        info = handler.next_rendezvous()
        assert (info.rank, info.world_size) == (0, 1)
    finally:
        run.close()


def _monitor(handler, stop, log: list) -> None:
    """torchrun's agent while its workers train: ``num_nodes_waiting()`` (and here ``is_closed()``)
    every monitor interval; what each call answered, or raised, goes to ``log``."""
    while not stop.wait(0.2):
        try:
            log.append((handler.num_nodes_waiting(), handler.is_closed()))
        except Exception as exc:  # noqa: BLE001 - what would end torchrun's agent
            log.append(exc)


def test_a_formed_group_trains_through_an_etcd_outage_longer_than_read_timeout(etcd_server, caplog):
    """Every etcd member down (killed, its data kept) for longer than read_timeout while the group
    trains: the monitoring calls answer from the last state known, reported once per node, the
    heartbeats keep trying, and once etcd is back the leases and the run go on, and a late node
    scales the group up as usual."""
    server = etcd_server()
    run = Run(server.endpoint, 2, 3, read_timeout=4)
    admin = None
    try:
        members = [run.handler() for _ in range(2)]
        with run.checker() as checker, torch_event_log() as events, torch_metric_log() as metric_log:
            first = assert_group([f.result(timeout=STEP) for f in run.next(members)], checker, members, run)
            keys = RunKeys(run.key_prefix, run.run_id)
            stop, logs = threading.Event(), [[], []]
            monitors = [threading.Thread(target=_monitor, args=(h, stop, log)) for h, log in zip(members, logs)]
            caplog.set_level(logging.WARNING, logger="rdzv_common")
            for monitor in monitors:
                monitor.start()
            try:
                time.sleep(1)
                server.kill()
                killed_at = time.monotonic()
                time.sleep(run.read_timeout + 3)  # longer than read_timeout and than the liveness TTL
                server.start()
                outage = time.monotonic() - killed_at
                admin = etcd_client(server.endpoint)
                # The heartbeats went on trying: within a TTL of etcd's return (the leases got a
                # fresh TTL from the restarted leader), each node has renewed its lease.
                time.sleep(3 * FAST["keep_alive_interval"] * FAST["keep_alive_max_attempt"])
                assert all(admin.get(keys.alive_key(h.node.key))[0] is not None for h in members)
            finally:
                stop.set()
                for monitor in monitors:
                    monitor.join(STEP)
            print(f"etcd outage of {outage:.1f}s (read_timeout={run.read_timeout:g}s) ridden out")
            for log in logs:
                failures = [entry for entry in log if isinstance(entry, Exception)]
                assert failures == [], failures
                assert set(log) == {(0, False)} and len(log) > 20
            # The heartbeats reached etcd again, and each node said how long it could not.
            wait_until(
                lambda: len(metric_log.values("backend.unreachable.duration.ms")) == 2, STEP, 0.1,
                "the nodes to reach etcd again",
            )
            # Reported once per node and outage: a warning (the heartbeats' own failure is not
            # warned of besides), an event, a metric; and the outage's end, with its length.
            ours = [r.getMessage() for r in caplog.records if r.name.startswith("rdzv_common")]
            reporters = sorted(w.split("'")[1] for w in ours if "from the last state known" in w)
            assert reporters == sorted(h.node.key for h in members) and len(ours) == 2, ours
            assert len([e for e in events.events if "from the last state known" in e["message"]]) == 2
            assert metric_log.values("backend.unreachable") == [1, 1]
            # The stored state never moved: nobody was dropped.
            checker.sync()
            assert checker.states[-1][1].round == first and len(checker.states[-1][1].participants) == 2

            # A late node scales the group up, as torchrun's agents would: the members see it waiting
            # and re-rendezvous.
            late = run.handler()
            pending = run.next([late])
            wait_until(lambda: all(h.num_nodes_waiting() == 1 for h in members), STEP, 0.2, "the late node to wait")
            infos = [f.result(timeout=STEP) for f in run.next(members) + pending]
            assert assert_group(infos, checker, members + [late], run) > first
    finally:
        if admin is not None:
            admin.close()
        run.close()


@pytest.mark.timeout(180)
def test_torchrun_job_trains_through_an_etcd_outage_and_exits_0(etcd_server, tmp_path):
    """Two real torchrun agents; etcd is killed (its data kept) while their workers train and
    comes back after more than read_timeout: the job finishes, rc=0, with no worker restarted."""
    server = etcd_server()
    conf = {**FAST_CONF, "read_timeout": "5"}
    with etcd_agent_group(tmp_path, server.endpoint, f"outage-{uuid.uuid4().hex[:8]}", nnodes="2", conf=conf) as job:
        job.env = {"TRAIN_SECONDS": "20"}
        job.start("train.py")
        job.start("train.py")
        job.wait_for_started(world_size=2, count=2, timeout=90)
        time.sleep(2)
        server.kill()
        killed_at = time.monotonic()
        time.sleep(float(conf["read_timeout"]) + 5)
        server.start()
        outage = time.monotonic() - killed_at
        assert job.wait(timeout=120) == [0, 0], job.logs()
        results = job.results()
        assert sorted((r["rank"], r["restart"]) for r in results) == [(0, 0), (1, 0)], results
        assert {r["sum"] for r in results} == {2.0 * results[0]["steps"]}
        logs = job.logs()
        print(f"torchrun: etcd down {outage:.1f}s mid-training (read_timeout={conf['read_timeout']}s), job exited 0")
        assert "from the last state known" in logs, logs


@pytest.mark.timeout(120)
def test_torchrun_without_a_reachable_etcd_warns_within_seconds_and_fails_once_within_read_timeout(tmp_path):
    """A mistyped endpoint (nothing listens): a warning comes a few seconds in, the agent fails about
    one read_timeout later (not after one read_timeout per call that needs etcd: the rendezvous,
    the shutdown's close, the end of the node's liveness), with the error once and no TLS hint."""
    read_timeout = 10
    group = AgentGroup(
        workdir=tmp_path, backend="etcd-v2", endpoint=f"127.0.0.1:{free_port()}", run_id="nowhere",
        nnodes="1", conf={"read_timeout": str(read_timeout)},
    )
    agent = group.start()
    warned_at = None
    try:
        while agent.proc.poll() is None:
            if warned_at is None and "has served no request" in agent.output():
                warned_at = time.monotonic()
            time.sleep(0.1)
        exited_at = time.monotonic()
    finally:
        group.close()
    log = agent.output()
    assert agent.proc.returncode != 0, log
    assert warned_at is not None, log
    print(f"unreachable etcd: warned, then the agent exited {exited_at - warned_at:.1f}s later (read_timeout={read_timeout}s)")
    assert exited_at - warned_at < 2 * read_timeout, log
    assert log.count("could not be reached") == 1, log
    assert "protocol=https" not in log, log
