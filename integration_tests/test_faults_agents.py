"""Agent faults: rendezvous nodes in real processes killed (SIGKILL) or frozen (SIGSTOP) at chosen
moments, while ``InvariantChecker`` watches the run's state."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator

import pytest

from benchmarks.answers import check
from benchmarks.invariants import InvariantChecker, etcd_client
from etcd_rdzv.keys import RunKeys
from integration_tests.tools import NodeProcess, wait_until

pytestmark = pytest.mark.timeout(90)

# A node is dead three seconds after its last heartbeat: two would do on an idle machine, but
# a busy 2-core one can starve a live node's heartbeat thread for that long.
FAST = {
    "read_timeout": 5,
    "join_timeout": 40,
    "last_call_timeout": 1,
    "keep_alive_interval": 1,
    "keep_alive_max_attempt": 3,
}
STEP = 20.0  # the most one rendezvous step may take here


@pytest.fixture
def spawn(etcd_run) -> Iterator:
    """``spawn(n, min_nodes, max_nodes)``: start ``n`` node processes of the test's run (in
    parallel, as importing torch is what takes time) and return them once all are ready."""
    nodes: list[NodeProcess] = []

    def start(count: int, min_nodes: int, max_nodes: int) -> list[NodeProcess]:
        conf = {**FAST, "key_prefix": etcd_run.key_prefix}
        fresh = [NodeProcess(etcd_run.endpoint, etcd_run.run_id, min_nodes, max_nodes, conf) for _ in range(count)]
        nodes.extend(fresh)
        return [node.ready() for node in fresh]

    yield start
    for node in nodes:
        node.close()


@pytest.fixture
def admin(etcd_run):
    client = etcd_client(etcd_run.endpoint)
    yield client
    client.close()


def checker_for(etcd_run, min_nodes: int, max_nodes: int) -> InvariantChecker:
    return InvariantChecker(etcd_run.endpoint, RunKeys(etcd_run.key_prefix, etcd_run.run_id).state, min_nodes, max_nodes)


def alive_key(etcd_run, node: NodeProcess) -> bytes:
    return RunKeys(etcd_run.key_prefix, etcd_run.run_id).alive_key(node.node).encode()


def wait_dead(admin, etcd_run, node: NodeProcess, timeout: float = 10.0) -> None:
    """Wait until etcd expired ``node``'s liveness key (its lease lapsed)."""
    key = alive_key(etcd_run, node)
    wait_until(lambda: admin.get(key)[0] is None, timeout, 0.1, f"the liveness of {node.node} to lapse")


def next_all(nodes: list[NodeProcess]) -> list[dict]:
    for node in nodes:
        node.send("next")
    return [node.expect("rdzv", STEP) for node in nodes]


def assert_group(results: list[dict], nodes: list[NodeProcess], checker: InvariantChecker) -> int:
    """Every node got the same round and world size, ranks 0..n-1, and the checker saw that group."""
    rounds = {r["round"] for r in results}
    assert len(rounds) == 1, results
    assert {r["world"] for r in results} == {len(nodes)}, results
    assert sorted(r["rank"] for r in results) == list(range(len(nodes))), results
    (round_,) = rounds
    checker.sync()
    group = checker.group(round_)
    assert group.ranks == {n.node: r["rank"] for n, r in zip(nodes, results)}
    answers = [a for n in nodes for a in n.answers]
    assert check(answers, checker.groups) == [], answers
    return round_


def test_agent_killed_while_joining_is_replaced(etcd_run, spawn, admin):
    a, b, c, d = spawn(4, 3, 3)
    with checker_for(etcd_run, 3, 3) as checker:
        a.send("next")
        b.send("next")
        # Both are participants of the incomplete round before one of them dies.
        wait_until(
            lambda: any(len(s.participants) == 2 for _, s in list(checker.states) if s is not None),
            STEP, 0.05, "two participants",
        )
        b.signal(signal.SIGKILL)
        b.proc.wait(timeout=5)
        wait_dead(admin, etcd_run, b)
        c.send("next")
        d.send("next")
        results = [n.expect("rdzv", STEP) for n in (a, c, d)]
        round_ = assert_group(results, [a, c, d], checker)
        assert b.node not in checker.group(round_).ranks


def test_agent_killed_after_round_others_continue_without_it(etcd_run, spawn, admin):
    a, b, c = spawn(3, 2, 3)
    with checker_for(etcd_run, 2, 3) as checker:
        first = assert_group(next_all([a, b, c]), [a, b, c], checker)
        c.signal(signal.SIGKILL)
        c.proc.wait(timeout=5)
        second = assert_group(next_all([a, b]), [a, b], checker)
        assert second > first
        # The dead node is gone from the state, not only from the group.
        checker.sync()
        assert c.desc not in checker.states[-1][1].nodes()


def test_agent_frozen_past_its_lease_is_dropped_and_rejoins_later(etcd_run, spawn, admin):
    a, b, c = spawn(3, 2, 3)
    with checker_for(etcd_run, 2, 3) as checker:
        first = assert_group(next_all([a, b, c]), [a, b, c], checker)
        c.signal(signal.SIGSTOP)
        # The survivors re-rendezvous; they complete without the frozen node once its lease lapses.
        a.send("next")
        b.send("next")
        wait_dead(admin, etcd_run, c)
        second = assert_group([a.expect("rdzv", STEP), b.expect("rdzv", STEP)], [a, b], checker)
        assert second > first
        c.signal(signal.SIGCONT)
        # Resumed, it beats again but holds no place: it has no rank in the round formed without
        # it, and asking for the next rendezvous puts it on the wait list, not into that round.
        wait_until(lambda: admin.get(alive_key(etcd_run, c))[0] is not None, 10, 0.1, "the resumed node to beat")
        c.send("next")
        assert c.idle(2.0), "the resumed node joined a round formed without it"
        a.send("waiting")
        assert a.expect("waiting", STEP)["count"] == 1
        checker.sync()
        assert c.node not in checker.group(second).ranks
        # The next round admits it cleanly.
        a.send("next")
        b.send("next")
        results = [n.expect("rdzv", STEP) for n in (a, b, c)]
        third = assert_group(results, [a, b, c], checker)
        assert third > second


class _SlowMailboxBackend:
    """Delegates to a real backend; the first mailbox read made to fold the mailbox into a write
    (``StateHolder._fold_mailbox``) runs ``hook`` first: a request that is slow while the cluster
    changes, e.g. one retried through a leader election."""

    def __init__(self, backend, hook) -> None:
        self._backend = backend
        self._hook = hook
        outer = self

        class Mailbox:
            def post(self, record, poster=None):
                return backend.mailbox.post(record, poster)

            def read(self, cursor):
                if outer._hook is not None and sys._getframe(1).f_code.co_name == "_fold_mailbox":
                    hook, outer._hook = outer._hook, None
                    hook()
                return backend.mailbox.read(cursor)

            def withdraw(self, handle):
                return backend.mailbox.withdraw(handle)

            def trim(self, cursor):
                return backend.mailbox.trim(cursor)

        self.mailbox = Mailbox()

    def __getattr__(self, name):
        return getattr(self._backend, name)


def test_member_dying_while_its_round_is_folded_complete_does_not_shrink_it_below_min(etcd_run, spawn, admin):
    """min=max=3 with A and B waiting: C's join completes the round [A, B, C] in C's write, but B
    dies between C's mailbox read and C's liveness check. The round must not complete as [A, C]
    (2 < min_nodes); A and C wait for a third node, D."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    from etcd_rdzv.factory import create_backend
    from rdzv_common.handler import DynamicRendezvousHandler
    from rdzv_common.settings import settings_from_params
    from rdzv_common.node import NodeDescGenerator

    a, b, d = spawn(3, 3, 3)
    with checker_for(etcd_run, 3, 3) as checker:
        a.send("next")
        b.send("next")
        wait_until(
            lambda: any(len(s.participants) == 2 for _, s in list(checker.states) if s is not None),
            STEP, 0.05, "two participants",
        )

        killed = threading.Event()

        def kill_b() -> None:
            b.signal(signal.SIGKILL)
            wait_dead(admin, etcd_run, b)
            killed.set()

        params = RendezvousParameters(
            "etcd_rdzv", etcd_run.endpoint, etcd_run.run_id, 3, 3, local_addr="127.0.0.1",
            key_prefix=etcd_run.key_prefix, **FAST,
        )
        backend, store = create_backend(params, "etcd_rdzv")
        slow = _SlowMailboxBackend(backend, kill_b)
        c = DynamicRendezvousHandler(
            NodeDescGenerator().generate("127.0.0.1"), settings_from_params(params), "etcd_rdzv", store, slow
        )
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(info=c.next_rendezvous()), daemon=True)
        try:
            thread.start()
            # D arrives once C's write is done (else D folds C's join itself, while B still lives).
            assert killed.wait(STEP), "C never folded the mailbox into a write"
            wait_until(
                lambda: any(s and c.node in s.participants for _, s in list(checker.states)),
                STEP, 0.05, "C's write",
            )
            d.send("next")
            results = [a.expect("rdzv", STEP), d.expect("rdzv", STEP)]
            thread.join(STEP)
            assert slow._hook is None, "C never folded the mailbox into a write"
            assert "info" in result
            assert {r["world"] for r in results} | {result["info"].world_size} == {3}, (results, result)
        finally:
            c.shutdown()
            thread.join(5)
