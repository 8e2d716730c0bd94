"""etcd faults: the leader of a 3-member cluster killed mid-rendezvous, a single etcd restarted
from its data directory mid-run, and one that stays down. Handlers run in threads, each with its
own backend; ``InvariantChecker`` watches the state throughout."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from etcd_rdzv.embedded import EtcdCluster
from integration_tests.faultrun import FAST, STEP, Run, assert_group, ordered_endpoint, wait_for_participants
from integration_tests.invariants import etcd_client, wait_until
from rdzv_common.codec import decode_state

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
