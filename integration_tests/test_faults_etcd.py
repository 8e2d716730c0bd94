"""etcd faults: the leader of a 3-member cluster killed mid-rendezvous, a single etcd restarted
from its data directory mid-run, and one that stays down. Handlers run in threads, each with its
own backend; ``InvariantChecker`` watches the state throughout."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousParameters

from etcd_rdzv.backend import state_key
from etcd_rdzv.embedded import EtcdCluster
from etcd_rdzv.plugin import create_handler
from integration_tests.answers import AnswerLog, check, record_rendezvous
from integration_tests.invariants import InvariantChecker, etcd_client, snapshot, wait_until
from rdzv_common.codec import decode_state

pytestmark = pytest.mark.timeout(90)

FAST = {
    "join_timeout": 40,
    "last_call_timeout": 1,
    "keep_alive_interval": 1,
    "keep_alive_max_attempt": 2,
}
STEP = 20.0


class Run:
    """Handlers of one run on one etcd (or cluster), created in this process; ``close`` shuts
    every handler down and checks that the run left no lease-less key behind."""

    def __init__(self, endpoint: str, min_nodes: int, max_nodes: int, read_timeout: float = 10) -> None:
        unique = uuid.uuid4().hex[:10]
        self.endpoint = endpoint
        self.run_id = f"fault-{unique}"
        self.key_prefix = f"/rdzv-fault/{unique}"
        self.key = state_key(self.key_prefix, self.run_id)
        self.min_nodes, self.max_nodes = min_nodes, max_nodes
        self.read_timeout = read_timeout
        self.handlers = []
        self.answers = AnswerLog()
        self.pool = ThreadPoolExecutor(8)

    def handler(self):
        params = RendezvousParameters(
            backend="etcd_rdzv", endpoint=self.endpoint, run_id=self.run_id, min_nodes=self.min_nodes,
            max_nodes=self.max_nodes, local_addr="127.0.0.1", key_prefix=self.key_prefix,
            read_timeout=self.read_timeout, **FAST,
        )
        handler = create_handler(params)
        self.handlers.append(handler)
        return handler

    def checker(self) -> InvariantChecker:
        return InvariantChecker(self.endpoint, self.key, self.min_nodes, self.max_nodes)

    def next(self, handlers):
        """Start ``next_rendezvous`` on each handler in a thread; futures come back."""
        return [self.pool.submit(record_rendezvous, h, self.answers) for h in handlers]

    def close(self) -> None:
        for handler in self.handlers:
            handler.shutdown()
        self.pool.shutdown(wait=False, cancel_futures=True)


def assert_group(infos, checker: InvariantChecker, handlers, run: Run) -> int:
    assert sorted(i.rank for i in infos) == list(range(len(infos)))
    assert {i.world_size for i in infos} == {len(infos)}
    rounds = {h.last_timings.round for h in handlers}
    assert len(rounds) == 1
    (round_,) = rounds
    checker.sync()
    assert checker.group(round_).ranks == {h.node.key: i.rank for h, i in zip(handlers, infos)}
    assert check(run.answers, checker.groups) == [], run.answers.describe()
    return round_


@pytest.fixture
def cluster(etcd_binary) -> Iterator[EtcdCluster]:
    with EtcdCluster(etcd_binary) as c:
        yield c


def test_cluster_leader_killed_mid_rendezvous_fails_over_and_loses_nothing(cluster):
    leader = cluster.leader()
    # The leader's endpoint goes first, so the handlers talk to it when it dies.
    endpoint = ",".join([leader.endpoint] + [m.endpoint for m in cluster.members if m is not leader])
    run = Run(endpoint, 3, 3)
    try:
        handlers = [run.handler() for _ in range(3)]
        with run.checker() as checker:
            early = run.next(handlers[:2])
            wait_until(
                lambda: any(s and len(s.participants) == 2 for _, s in list(checker.states)),
                STEP, 0.05, "two participants",
            )
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
    run = Run(server.endpoint, 1, 1, read_timeout=3)
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
        assert elapsed < 2 * 3 + 1.5, f"took {elapsed:.1f}s with read_timeout=3"
        assert server.endpoint in str(failure.value)
        assert "read_timeout=3" in str(failure.value)
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
