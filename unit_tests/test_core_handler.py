"""In-process multi-handler scenarios: several ``DynamicRendezvousHandler`` threads over one
``MemoryStore``, each with its own ``MemoryBackend`` and its own ``TCPStore`` client."""

from __future__ import annotations

import re
import threading
import time
from datetime import datetime, timedelta

import pytest
import torch.distributed as dist
from torch.distributed.elastic.rendezvous import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousInfo,
    RendezvousTimeoutError,
)

import rdzv_common.handler as handler_mod
from rdzv_common.codec import MembershipChange, decode_announcement, decode_state, encode_state
from rdzv_common.handler import DynamicRendezvousHandler
from rdzv_common.memory import MemoryBackend, MemoryStore
from rdzv_common.state import RendezvousState
from unit_tests.torch_channels import torch_event_log, torch_metric_log

ADDR = "127.0.0.1"
FAST = dict(
    last_call_timeout=0.2,
    keep_alive_interval=0.1,
    keep_alive_max_attempt=5,
    join_timeout=6.0,
    close_timeout=3.0,
    heartbeat_timeout=2.0,
)

pytestmark = pytest.mark.timeout(30)


class OffsetClock:
    """Real monotonic time plus an offset a test can jump forward to expire heartbeats."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


class ClientPool:
    """One TCPStore server for the module and reusable client connections to it.

    Each handler needs a connection of its own (a client blocks per connection). Connections are
    reused across tests (run ids differ, so keys do not collide) because opening a TCPStore
    connection occasionally stalls for seconds in torch, and tests should not pay that often.
    """

    def __init__(self) -> None:
        self.server = dist.TCPStore(ADDR, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
        self.free: list[dist.TCPStore] = []

    def take(self) -> dist.TCPStore:
        if self.free:
            return self.free.pop()
        return dist.TCPStore(ADDR, self.server.port, is_master=False, timeout=timedelta(seconds=10))

    def give(self, clients) -> None:
        self.free.extend(clients)


@pytest.fixture(scope="module")
def pool():
    return ClientPool()


class Cluster:
    def __init__(self, run_id: str, pool: ClientPool) -> None:
        self.run_id = run_id
        self.clock = OffsetClock()
        self.mem = MemoryStore(clock=self.clock)
        self.pool = pool
        self.clients: list[dist.TCPStore] = []
        self.handlers: list[DynamicRendezvousHandler] = []
        self.threads: list[threading.Thread] = []

    def client(self) -> dist.TCPStore:
        c = self.pool.take()
        self.clients.append(c)
        return c

    def make(self, n: int, min_nodes: int, max_nodes: int, **overrides) -> list[DynamicRendezvousHandler]:
        timeouts = {**FAST, **overrides}
        made = []
        for _ in range(n):
            backend = MemoryBackend(self.mem, self.run_id)
            h = DynamicRendezvousHandler.from_backend(
                self.run_id, self.client(), backend, min_nodes, max_nodes, local_addr=ADDR, **timeouts
            )
            made.append(h)
        self.handlers.extend(made)
        return made

    def state(self) -> RendezvousState:
        entry = self.mem.states.get(self.run_id)
        return decode_state(entry[0]) if entry else RendezvousState()

    def start(self, fn) -> "Job":
        job = Job(fn)
        self.threads.append(job.thread)
        return job

    def rendezvous(self, handlers, timeout: float = 10.0) -> list:
        jobs = [self.start(h.next_rendezvous) for h in handlers]
        return [j.result(timeout) for j in jobs]

    def teardown(self) -> None:
        for h in self.handlers:
            h._stop_heartbeats()
        for t in self.threads:
            t.join(timeout=10)
        alive = [t for t in self.threads if t.is_alive()]
        for h in self.handlers:
            try:
                h.shutdown()
            except Exception:  # a failed shutdown of a test's leftover must not hide its result
                pass
        if not alive:  # a client a stuck thread may still use is not handed on
            self.pool.give(self.clients)
        assert not alive, f"threads still running: {alive}"


class Job:
    def __init__(self, fn) -> None:
        self.value = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn) -> None:
        try:
            self.value = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.error = e
        finally:
            self.done.set()

    def result(self, timeout: float = 10.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the rendezvous call did not return in time"
        return self.error if self.error is not None else self.value


def connect_trainer(info) -> dist.TCPStore:
    """Connect to a published trainer store as a trainer would.

    A TCPStore connection now and then stalls in torch and times out; a trainer's own launcher
    would retry, so the test does too rather than fail on that.
    """
    last: Exception | None = None
    for _ in range(3):
        try:
            return dist.TCPStore(
                info.master_addr, info.master_port, is_master=False, timeout=timedelta(seconds=3)
            )
        except dist.DistNetworkError as e:  # pragma: no cover - depends on timing
            last = e
    raise AssertionError(f"cannot reach the trainer store at {info}: {last}")


def wait_until(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def cluster(request, pool):
    c = Cluster(f"run-{request.node.name}".replace("[", "-").replace("]", ""), pool)
    yield c
    c.teardown()


@pytest.fixture(autouse=True)
def _no_monitor_cache(monkeypatch):
    monkeypatch.setattr(handler_mod, "MONITOR_CACHE_SECONDS", 0.0)


def _infos(results) -> list[RendezvousInfo]:
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def _check_group(infos: list[RendezvousInfo], world: int) -> None:
    assert sorted(i.rank for i in infos) == list(range(world))
    assert {i.world_size for i in infos} == {world}
    addrs = {(i.bootstrap_store_info.master_addr, i.bootstrap_store_info.master_port) for i in infos}
    assert len(addrs) == 1, addrs


# --------------------------------------------------------------------------- forming a round


def test_all_nodes_join_with_distinct_ranks(cluster):
    handlers = cluster.make(4, 4, 4)
    infos = _infos(cluster.rendezvous(handlers))
    _check_group(infos, 4)
    # Ranks follow node order (same host and pid: creation order).
    assert [i.rank for i in infos] == [0, 1, 2, 3]
    state = cluster.state()
    assert state.complete and state.round == 0
    assert {h.node: i.rank for h, i in zip(handlers, infos)} == state.participants
    for h in handlers:
        t = h.last_timings
        assert t is not None and t.round == 0
        assert t.total >= t.join_wait >= 0 and t.last_call_wait >= 0
        assert t.total == pytest.approx(t.join_wait + t.last_call_wait, abs=1e-6)
        assert t.writes >= 1 and 0 <= t.lost_writes <= t.writes


def test_min_below_max_completes_after_last_call(cluster):
    handlers = cluster.make(2, 2, 4, last_call_timeout=0.3)
    started = time.monotonic()
    infos = _infos(cluster.rendezvous(handlers))
    elapsed = time.monotonic() - started
    _check_group(infos, 2)
    assert elapsed >= 0.3  # waited for the last call rather than completing at min_nodes
    assert elapsed < 0.3 + 1.5  # and completed when it was over, not at some later wake-up
    assert 0.2 <= max(h.last_timings.last_call_wait for h in handlers) < 0.3 + 1.5
    state = cluster.state()
    assert state.complete and state.deadline is None and len(state.participants) == 2


def test_single_node_round(cluster):
    (h,) = cluster.make(1, 1, 1)
    (info,) = _infos(cluster.rendezvous([h]))
    assert (info.rank, info.world_size) == (0, 1)
    assert info.bootstrap_store_info.master_addr == ADDR


# --------------------------------------------------------------------------- later rounds


def test_late_node_waits_and_joins_next_round_with_that_rounds_master(cluster):
    a, b, c = cluster.make(3, 2, 3)
    first = _infos(cluster.rendezvous([a, b]))
    _check_group(first, 2)
    round0_port = first[0].bootstrap_store_info.master_port

    late = cluster.start(c.next_rendezvous)
    wait_until(lambda: a.num_nodes_waiting() == 1, what="the late node on the wait list")
    assert b.num_nodes_waiting() == 1
    assert cluster.state().wait_list == {c.node}
    assert not late.done.is_set()

    jobs = [cluster.start(a.next_rendezvous), cluster.start(b.next_rendezvous)]
    infos = _infos([j.result() for j in jobs] + [late.result()])
    _check_group(infos, 3)
    assert cluster.state().round == 1
    assert all(h.last_timings.round == 1 for h in (a, b, c))
    # The node that joined in round 1 uses round 1's trainer store, hosted by round 1's rank 0.
    rank0 = [h for h, i in zip((a, b, c), infos) if i.rank == 0][0]
    c_info = infos[2]
    assert c_info.bootstrap_store_info.master_addr == ADDR
    assert c_info.bootstrap_store_info.master_port == rank0._trainer_store.server.port
    assert a.num_nodes_waiting() == 0
    assert round0_port > 0


def test_a_re_rendezvous_costs_each_node_one_announcement(cluster):
    """A node that leaves its group to join the next posted a leave, waited for a write to fold it,
    then posted a join: two records per node, and twice the writes, each of which wakes every node
    (at N = 256, 556 records and 5 s). One rejoin record now does both."""
    handlers = cluster.make(4, 4, 4)
    _check_group(_infos(cluster.rendezvous(handlers)), 4)
    posted = len(cluster.mem.logs[cluster.run_id])
    _check_group(_infos(cluster.rendezvous(handlers)), 4)
    records = cluster.mem.logs[cluster.run_id][posted:]
    announced = [decode_announcement(r) for r in records]
    assert len(announced) == 4
    assert set(announced) == {MembershipChange("rejoin", h.node, 0, True) for h in handlers}
    assert cluster.state().round == 1


def test_a_health_checked_node_leaves_its_group_before_it_is_checked(cluster, tmp_path):
    """A node whose join waits for a health check (or a quarantine) still leaves the group first,
    in a leave of its own: the other members need not wait for its check to form the next one."""
    check = tmp_path / "check.sh"
    check.write_text("#!/bin/sh\nexit 0\n")
    check.chmod(0o755)
    a, b = cluster.make(2, 2, 2, health_check=str(check))
    _check_group(_infos(cluster.rendezvous([a, b])), 2)
    posted = len(cluster.mem.logs[cluster.run_id])
    _check_group(_infos(cluster.rendezvous([a, b])), 2)
    kinds = [decode_announcement(r).kind for r in cluster.mem.logs[cluster.run_id][posted:]]
    assert sorted(kinds) == ["join", "join", "leave", "leave"]


def test_a_rank_whose_rank_0_left_before_publishing_the_store_joins_the_next_round(cluster, monkeypatch):
    """Bug (nemesis churn run, 2 in 9 under load): rank 0's call failed after its round completed,
    before it published the trainers' store; its next call left that group. The other ranks
    waited for the store address until the store's timeout (300 s). They now check that rank 0 is
    still a member while they wait, and join the next round once it is not."""
    import rdzv_common.bootstrap as bootstrap

    monkeypatch.setattr(bootstrap, "LEADER_CHECK_SECONDS", 0.2, raising=False)
    a, b = cluster.make(2, 2, 2)
    publish = bootstrap.TrainerStoreHost.publish
    failed = []

    def rank_0_fails_once(host, rank, round_store, *rest):
        if rank == 0 and not failed:
            failed.append(host)
            raise RendezvousConnectionError("the etcd cluster went away")
        return publish(host, rank, round_store, *rest)

    monkeypatch.setattr(bootstrap.TrainerStoreHost, "publish", rank_0_fails_once)
    jobs = {h: cluster.start(h.next_rendezvous) for h in (a, b)}
    wait_until(lambda: failed, what="rank 0 failing")
    (leader,) = [h for h in (a, b) if h._trainer_store is failed[0]]
    (other,) = [h for h in (a, b) if h is not leader]
    assert isinstance(jobs[leader].result(10), RendezvousConnectionError)
    assert not jobs[other].done.is_set()  # it waits for rank 0's store address
    infos = _infos([cluster.start(leader.next_rendezvous).result(10), jobs[other].result(10)])
    _check_group(infos, 2)
    assert cluster.state().round == 1


def test_redundant_node_moves_up_when_a_participant_leaves(cluster):
    a, b, c = cluster.make(3, 2, 2)
    _check_group(_infos(cluster.rendezvous([a, b])), 2)

    extra = cluster.start(c.next_rendezvous)
    wait_until(lambda: cluster.state().redundancy_list == {c.node}, what="the redundancy list")
    assert a.num_nodes_waiting() == 0  # redundant nodes do not ask for a restart

    leaving = cluster.start(a.next_rendezvous)  # a leaves its round (exit) and joins the next
    wait_until(lambda: c.node not in cluster.state().redundancy_list, what="c off the redundancy list")
    wait_until(lambda: c.node in cluster.state().wait_list | set(cluster.state().participants), what="c placed")

    staying = cluster.start(b.next_rendezvous)
    results = {h: j for h, j in [(a, leaving), (b, staying), (c, extra)]}
    # Two of the three form round 1 (max 2); the third is left waiting or redundant.
    wait_until(lambda: sum(j.done.is_set() for j in results.values()) >= 2, timeout=8, what="round 1")
    time.sleep(0.3)
    done = {h: j for h, j in results.items() if j.done.is_set()}
    assert len(done) == 2
    infos = _infos([j.result() for j in done.values()])
    _check_group(infos, 2)
    state = cluster.state()
    assert state.round == 1 and state.complete
    (left_out,) = [h for h in results if h not in done]
    assert left_out.node in state.redundancy_list | state.wait_list

    # Closing the run releases it: redundant -> graceful exit, waiting -> closed.
    next(iter(done)).set_closed()
    err = results[left_out].result()
    if left_out.node in state.redundancy_list:
        assert isinstance(err, RendezvousGracefulExitError), err
    else:
        assert isinstance(err, RendezvousClosedError), err


def _monitor_until_waiting(handler, timeout: float) -> int:
    """Poll ``num_nodes_waiting`` as torchrun's agent does while its workers train; return the
    first positive answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = handler.num_nodes_waiting()
        if waiting > 0:
            return waiting
        time.sleep(0.05)
    raise AssertionError(f"num_nodes_waiting() stayed 0 for {timeout}s; state: {handler._executor.state}")


def test_a_spare_replaces_a_dead_member_through_the_monitor_path(cluster):
    a, b, spare = cluster.make(3, 2, 2)
    first = {h: i for h, i in zip((a, b), _infos(cluster.rendezvous([a, b])))}
    _check_group(list(first.values()), 2)
    waiting = cluster.start(spare.next_rendezvous)
    wait_until(lambda: cluster.state().redundancy_list == {spare.node}, what="the spare redundant")
    assert a.num_nodes_waiting() == 0

    b._stop_heartbeats()  # b's machine dies; nothing else tells a
    b._backend.liveness.forget(b.node.key)
    assert _monitor_until_waiting(a, 5) == 1

    infos = _infos([cluster.start(a.next_rendezvous).result(), waiting.result()])
    _check_group(infos, 2)
    assert infos[0].rank == first[a].rank  # the survivor keeps its rank
    state = cluster.state()
    assert state.round == 1 and set(state.participants) == {a.node, spare.node}


def test_dead_node_is_removed_from_the_state(cluster):
    a, b, c = cluster.make(3, 2, 3)
    _check_group(_infos(cluster.rendezvous([a, b, c])), 3)
    b._stop_heartbeats()  # b dies
    time.sleep(0.3)  # let an in-flight heartbeat land before the clock jumps
    cluster.clock.offset += 100.0  # every beat so far is now older than the liveness TTL
    assert b.node.key not in b._backend.liveness.alive([b.node.key], b.settings.liveness_ttl)

    infos = _infos(cluster.rendezvous([a, c]))
    _check_group(infos, 2)
    state = cluster.state()
    assert b.node not in state.nodes()
    assert set(state.participants) == {a.node, c.node}
    assert state.round == 1


def test_round_members_agree_on_world_size_when_a_lease_lapses(cluster):
    # c waits for round 1; its lease lapses (liveness forgotten) while its process lives on, so it
    # keeps acting and is placed in round 1. Whatever the others decide about c, every member of
    # the round must report the same world size and ranks 0..n-1, or the trainers hang.
    a, b, c = cluster.make(3, 2, 3)
    _check_group(_infos(cluster.rendezvous([a, b])), 2)
    late = cluster.start(c.next_rendezvous)
    wait_until(lambda: a.num_nodes_waiting() == 1, what="c waiting")
    c._backend.liveness.forget(c.node.key)
    infos = _infos(cluster.rendezvous([a, b]))
    res = late.result()
    members = list(zip((a, b), infos))
    state = cluster.state()
    if isinstance(res, RendezvousInfo):
        members.append((c, res))
    else:
        # c did not make it: then it is no member of the round the others formed, and it failed
        # the way a node left out does, not in some unexpected way.
        assert isinstance(res, RendezvousTimeoutError), res
        assert c.node not in state.participants
    rounds = {h.last_timings.round for h, _ in members}
    assert rounds == {1}
    _check_group([i for _, i in members], len(members))
    assert state.round == 1 and state.complete and state.world_size == len(members)
    assert state.participants == {h.node: i.rank for h, i in members}


# --------------------------------------------------------------------------- closing


def test_set_closed_propagates(cluster):
    a, b, c = cluster.make(3, 2, 2)
    _check_group(_infos(cluster.rendezvous([a, b])), 2)
    extra = cluster.start(c.next_rendezvous)
    wait_until(lambda: cluster.state().redundancy_list == {c.node}, what="c redundant")
    assert not b.is_closed()

    a.set_closed()
    assert a.is_closed() and b.is_closed()
    assert isinstance(extra.result(), RendezvousGracefulExitError)
    with pytest.raises(RendezvousClosedError):
        b.next_rendezvous()
    assert cluster.state().closed
    a.set_closed()  # idempotent
    assert cluster.state().closed


def test_a_run_closed_now_reports_a_waiting_node_so_that_torchrun_stops_its_workers(cluster):
    """torchrun's agent asks only ``num_nodes_waiting`` while its workers are healthy; a plain close
    leaves them training, ``close --now`` (``stop_now``) makes the agent stop them and rendezvous,
    which the closed run refuses."""
    a, b = cluster.make(2, 2, 2)
    _check_group(_infos(cluster.rendezvous([a, b])), 2)
    a.set_closed()
    assert b.is_closed() and b.num_nodes_waiting() == 0
    operator = MemoryBackend(cluster.mem, cluster.run_id)  # as `etcd-rdzv close --now` writes it
    stored, token = operator.get_state()
    state = decode_state(stored)
    state.stop_now = True
    assert operator.set_state(encode_state(state), token)[2]
    assert a.num_nodes_waiting() == 1 and b.num_nodes_waiting() == 1
    with pytest.raises(RendezvousClosedError):
        b.next_rendezvous()


def test_join_timeout_rolls_the_node_back_out(cluster):
    (a,) = cluster.make(1, 2, 3, join_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(RendezvousTimeoutError):
        a.next_rendezvous()
    assert 0.5 <= time.monotonic() - started < 0.5 + 1.5
    state = cluster.state()
    assert a.node not in state.nodes()
    assert state.deadline is None and not state.complete
    # A node that gave up ends its liveness: a join folded after it left would be dropped at once.
    assert a._backend.liveness.alive([a.node.key], a.settings.liveness_ttl) == set()


def test_join_timeout_of_a_waiting_node(cluster):
    a, b = cluster.make(2, 1, 2, join_timeout=0.6)
    # With min 1 and max 2, a alone completes round 0 after the last call.
    _check_group(_infos(cluster.rendezvous([a])), 1)
    # b cannot join a complete round; it waits for round 1 that never starts, and times out.
    with pytest.raises(RendezvousTimeoutError):
        b.next_rendezvous()
    state = cluster.state()
    assert b.node not in state.nodes()
    assert state.participants == {a.node: 0}


# --------------------------------------------------------------------------- trainer store


def test_bootstrap_info_uses_local_addr_and_rank0_server(cluster):
    handlers = cluster.make(3, 3, 3)
    infos = _infos(cluster.rendezvous(handlers))
    _check_group(infos, 3)
    assert all(h.use_agent_store for h in handlers)
    rank0 = [h for h, i in zip(handlers, infos) if i.rank == 0][0]
    server = rank0._trainer_store.server
    assert server is not None
    assert {i.bootstrap_store_info.master_addr for i in infos} == {ADDR}
    assert {i.bootstrap_store_info.master_port for i in infos} == {server.port}
    assert all(h._trainer_store.server is None for h in handlers if h is not rank0)


# TEST-NET-1 (RFC 5737): documentation only, never an address of this machine.
FOREIGN_ADDR = "192.0.2.7"


def _in_thread(fn, timeout: float):
    """``fn()``'s result or exception, or ``None`` if it is still running after ``timeout`` (on a
    daemon thread, which the old code's retries must not keep the test process alive for)."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else None


def test_rank_0_that_cannot_serve_at_its_local_addr_fails_at_once_naming_it(cluster):
    """Bug (the README's library example, local_addr="10.0.0.7" on a machine without it): rank 0
    started a TCPStore there, whose own client then retried the address for the store's timeout
    (300 s) with only torch's socket error. It now fails at once, naming local_addr and the fix."""
    store = cluster.client()
    backend = MemoryBackend(cluster.mem, cluster.run_id)
    node = DynamicRendezvousHandler.from_backend(cluster.run_id, store, backend, 1, 1, local_addr=FOREIGN_ADDR, **FAST)
    cluster.handlers.append(node)
    started = time.monotonic()
    error = _in_thread(node.next_rendezvous, timeout=10)
    assert error is not None, "rank 0 was still trying to serve the trainers' store after 10 s"
    assert time.monotonic() - started < 10
    assert isinstance(error, RendezvousError), error
    message = str(error)
    assert "local_addr" in message and FOREIGN_ADDR in message and "--local-addr" in message, message


def test_the_other_ranks_stop_waiting_for_a_rank_0_that_cannot_serve(cluster):
    """A rank 0 that cannot listen at its local_addr leaves at once (its liveness ends), so the
    other ranks stop waiting for its store address and go on to the next round."""
    from rdzv_common.settings import RendezvousSettings
    from rdzv_common.state import NodeDesc

    # A liveness TTL of 10 s: the other rank must not learn of rank 0's leaving by its lapse.
    settings = RendezvousSettings(cluster.run_id, 2, 2, rank_order="topology", **{**FAST, "keep_alive_max_attempt": 100})
    foreign, local = (
        DynamicRendezvousHandler(NodeDesc(addr, 1000 + i, 0), settings, "memory", cluster.client(),
                                 MemoryBackend(cluster.mem, cluster.run_id), topology=label)
        for i, (addr, label) in enumerate([(FOREIGN_ADDR, "a"), (ADDR, None)])  # labelled nodes rank first
    )
    cluster.handlers += [foreign, local]
    waiting = cluster.start(local.next_rendezvous)
    assert isinstance(_in_thread(foreign.next_rendezvous, timeout=10), RendezvousError)
    wait_until(lambda: cluster.state().round == 1, timeout=5, what="the other rank going on to round 1")
    assert local.node in cluster.state().nodes() and foreign.node not in cluster.state().nodes()
    assert not waiting.done.is_set()  # it waits for a partner in round 1, not for rank 0's store


def test_a_rank_that_gives_up_on_rank_0s_store_says_how_long_it_waited(cluster):
    """Bug: the other ranks wait for rank 0's store address in steps of a second; when the store's
    timeout ran out, the error was the last step's ("wait timeout after 486ms" after minutes).
    It now states the time actually waited."""
    from rdzv_common.bootstrap import TrainerStoreHost

    store = cluster.client()
    store.set_timeout(timedelta(seconds=2.5))
    started = time.monotonic()
    error = _in_thread(
        lambda: TrainerStoreHost(ADDR).publish(1, dist.PrefixStore(f"{cluster.run_id}/r0", store), lambda: True),
        timeout=20,
    )
    waited = time.monotonic() - started
    assert isinstance(error, Exception), error
    stated = [float(v) / (1000 if unit == "ms" else 1) for v, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s)\b", str(error))]
    assert stated, f"no time in {error}"
    assert all(abs(s - waited) < 0.5 for s in stated), (stated, waited, str(error))


def test_disabled_shared_store(cluster, monkeypatch):
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    handlers = cluster.make(2, 2, 2)
    assert not any(h.use_agent_store for h in handlers)
    infos = _infos(cluster.rendezvous(handlers))
    _check_group(infos, 2)
    assert {i.bootstrap_store_info.master_addr for i in infos} == {ADDR}
    assert all(h._trainer_store.server is None for h in handlers)


def test_trainer_store_is_fresh_every_round(cluster):
    a, b = cluster.make(2, 2, 2)
    first = _infos(cluster.rendezvous([a, b]))
    _check_group(first, 2)
    info0 = first[0].bootstrap_store_info
    trainer0 = connect_trainer(info0)
    trainer0.set("nccl_unique_id", b"round0-secret")
    assert trainer0.check(["nccl_unique_id"])

    second = _infos(cluster.rendezvous([a, b]))
    _check_group(second, 2)
    assert a.last_timings.round == 1
    info1 = second[0].bootstrap_store_info
    trainer1 = connect_trainer(info1)
    assert not trainer1.check(["nccl_unique_id"])
    trainer1.set("nccl_unique_id", b"round1")
    assert trainer1.get("nccl_unique_id") == b"round1"


def test_round_store_is_a_prefix_store_per_round(cluster):
    a, b = cluster.make(2, 2, 2)
    infos = _infos(cluster.rendezvous([a, b]))
    raw = cluster.client()
    for info in infos:
        assert isinstance(info.store, dist.PrefixStore)
    prefix0 = f"torch.rendezvous.{cluster.run_id}.0"
    infos[0].store.set("probe", b"zero")
    assert raw.get(f"{prefix0}/probe") == b"zero"
    assert raw.get(f"{prefix0}/MASTER_ADDR") == ADDR.encode()
    assert infos[1].store.get("probe") == b"zero"  # same round, same namespace

    again = _infos(cluster.rendezvous([a, b]))
    assert not again[0].store.check(["probe"])  # round 1 has its own namespace
    again[0].store.set("probe", b"one")
    assert raw.get(f"torch.rendezvous.{cluster.run_id}.1/probe") == b"one"
    assert raw.get(f"{prefix0}/probe") == b"zero"


# --------------------------------------------------------------------------- events, shutdown


def _torch_name(method: str) -> str:
    return f"dynamic_rendezvous.py:{method}"


def test_events_reach_torchs_event_handler_under_torchs_names(cluster):
    with torch_event_log() as log:
        a, b = cluster.make(2, 2, 3)  # completes at the last call
        infos = _infos(cluster.rendezvous([a, b]))
        _check_group(infos, 2)
        for h, info in zip((a, b), infos):
            mine = [e for e in log.events if (e["pid"], e["local_id"]) == (h.node.pid, h.node.local_id)]
            assert all(e["run_id"] == cluster.run_id and e["hostname"] == ADDR for e in mine)
            calls = [e for e in mine if e["name"] == _torch_name("DynamicRendezvousHandler.next_rendezvous")]
            assert calls[0]["message"] == (
                f"The node '{h.node}' attempts to join the next round of the rendezvous '{cluster.run_id}'."
            )
            assert calls[-1]["message"] == (
                f"The node '{h.node}' has joined round 0 of the rendezvous '{cluster.run_id}' as rank "
                f"{info.rank} in a world of size 2."
            )
            assert calls[-1]["rank"] == info.rank and calls[-1]["node_state"] == "RUNNING"
            added = [e for e in mine if e["name"] == _torch_name("_DistributedRendezvousOpExecutor._add_to_participants")]
            assert [e["message"] for e in added] == [
                f"The node '{h.node}' added itself to the participants of round 0 of the rendezvous "
                f"'{cluster.run_id}'. Pending sync."
            ]
        completed = log.named(_torch_name("_DistributedRendezvousOpExecutor._mark_rendezvous_complete"))
        assert len(completed) == 1 and completed[0]["node_state"] == "SUCCEEDED"
        assert f"marked round 0 of the rendezvous '{cluster.run_id}' as complete" in completed[0]["message"]

        # A node dies and a spare takes its place: a write drops it, under torch's state holder's name.
        a._stop_heartbeats()
        cluster.clock.offset += 10
        # b's heartbeats go on through its calls: its next beat makes it alive again.
        wait_until(lambda: b._backend.liveness.alive([b.node.key], b.settings.liveness_ttl), what="b's next beat")
        (c,) = cluster.make(1, 2, 3)
        _check_group(_infos(cluster.rendezvous([b, c])), 2)
        dropped = log.named(_torch_name("_BackendRendezvousStateHolder.sync"))
        assert dropped and f"the node(s) '{a.node}' have been removed" in dropped[-1]["message"]
        left = log.named(_torch_name("_DistributedRendezvousOpExecutor._remove_from_participants"))
        assert [e["pid"] for e in left] == [b.node.pid] and left[0]["local_id"] == b.node.local_id

        b.set_closed()
        closed = log.named(_torch_name("_DistributedRendezvousOpExecutor._mark_rendezvous_closed"))
        assert len(closed) == 1 and closed[0]["node_state"] == "SUCCEEDED"
        assert log.named(_torch_name("DynamicRendezvousHandler._close"))[-1]["message"] == (
            f"The node '{b.node}' has closed the rendezvous '{cluster.run_id}'."
        )
        with pytest.raises(RendezvousClosedError):
            b.next_rendezvous()
        failed = [e for e in log.events if e["node_state"] == "FAILED"]
        assert failed[-1]["name"] == _torch_name("DynamicRendezvousHandler.next_rendezvous")
        assert failed[-1]["message"].startswith("RendezvousClosedError")
        assert "RendezvousClosedError" in failed[-1]["error_trace"]


def test_heartbeats_are_events_as_in_torch(cluster):
    with torch_event_log() as log:
        (a,) = cluster.make(1, 1, 1)
        _infos(cluster.rendezvous([a]))
        wait_until(lambda: log.named(_torch_name("DynamicRendezvousHandler._keep_alive")), what="a heartbeat event")
    assert log.named(_torch_name("DynamicRendezvousHandler._keep_alive"))[0]["message"] == (
        f"The node '{a.node}' has sent a keep-alive heartbeat to the rendezvous '{cluster.run_id}'."
    )


def test_timings_reach_torchs_metric_handler(cluster):
    with torch_metric_log() as metric_log:
        a, b = cluster.make(2, 2, 3)  # completes at the last call (0.2 s)
        _check_group(_infos(cluster.rendezvous([a, b])), 2)
        a.set_closed()
        (late,) = cluster.make(1, 2, 3)
        with pytest.raises(RendezvousClosedError):
            late.next_rendezvous()
    assert metric_log.values("next_rendezvous.success") == [1, 1]
    assert metric_log.values("next_rendezvous.failure") == [1]
    totals = metric_log.values("next_rendezvous.duration.ms")
    assert sorted(totals) == sorted(round(h.last_timings.total * 1000) for h in (a, b))
    assert all(t >= 150 for t in totals)  # the last call held the round open
    for name in ("join_wait.ms", "last_call_wait.ms", "writes", "lost_writes"):
        assert len(metric_log.values(f"next_rendezvous.{name}")) == 2
    assert sum(metric_log.values("next_rendezvous.writes")) == a.last_timings.writes + b.last_timings.writes >= 1


def test_deepspeed_reads_torchs_private_state_and_settings(cluster):
    """The expressions of DeepSpeed's ``DSElasticAgent._invoke_run``, on our handler."""
    a, b = cluster.make(2, 2, 2, keep_alive_max_attempt=5)
    infos = _infos(cluster.rendezvous([a, b]))
    rdzv_handler = a

    participants = rdzv_handler._state_holder.state.participants
    assert participants == {h.node: info.rank for h, info in zip((a, b), infos)}
    assert all(isinstance(rank, int) for rank in participants.values())
    expire_time = datetime.utcnow() - (
        rdzv_handler._settings.keep_alive_interval * rdzv_handler._settings.keep_alive_max_attempt
    )
    assert rdzv_handler._settings.keep_alive_interval == timedelta(seconds=FAST["keep_alive_interval"])
    heartbeats = rdzv_handler._state_holder.state.last_heartbeats
    assert set(heartbeats) == {a.node, b.node}
    _dead_nodes = [node for node, last_heartbeat in heartbeats.items() if last_heartbeat < expire_time]
    assert _dead_nodes == []

    # b dies: once its liveness lapses it has no heartbeat, and the next round is smaller.
    b._stop_heartbeats()
    cluster.clock.offset += 10
    time.sleep(FAST["keep_alive_interval"] * 1.5)  # older than an interval: liveness is asked afresh
    assert set(rdzv_handler._state_holder.state.last_heartbeats) == {a.node}
    (lonely,) = cluster.make(1, 1, 1)
    assert len(participants) == 2 and lonely._state_holder.state.participants == {}
    with pytest.raises(AttributeError):
        rdzv_handler._state_holder.state.round = 7  # a snapshot, read-only


def test_shutdown_closes_and_ends_liveness(cluster):
    a, b = cluster.make(2, 2, 2)
    _check_group(_infos(cluster.rendezvous([a, b])), 2)
    ttl = a.settings.liveness_ttl
    assert a._backend.liveness.alive([a.node.key, b.node.key], ttl) == {a.node.key, b.node.key}
    assert a.shutdown() is True
    assert a._backend.liveness.alive([a.node.key], ttl) == set()
    assert cluster.state().closed
    assert b.is_closed()
    assert b._backend.liveness.alive([b.node.key], ttl) == {b.node.key}
    # a's heartbeats stopped: its liveness does not come back.
    time.sleep(3 * a.settings.keep_alive_interval)
    assert a._backend.liveness.alive([a.node.key], ttl) == set()
    with pytest.raises(RendezvousClosedError):
        b.next_rendezvous()
    assert b.shutdown() is True


# --------------------------------------------------------------------------- heartbeats


class StateCallCounter:
    """Counts every call a handler's backend makes on the shared state or the mailbox."""

    def __init__(self, backend) -> None:
        self.calls: list[str] = []
        for name in ("get_state", "set_state", "wait_for_change"):
            self._wrap(backend, name)
        for name in ("post", "read", "withdraw", "trim"):
            self._wrap(backend.mailbox, name, f"mailbox.{name}")
        self.beats = 0
        beat = backend.liveness.beat

        def counted_beat(*a, **kw):
            self.beats += 1
            return beat(*a, **kw)

        backend.liveness.beat = counted_beat

    def _wrap(self, obj, name, label=None) -> None:
        original = getattr(obj, name)

        def counted(*a, **kw):
            self.calls.append(label or name)
            return original(*a, **kw)

        setattr(obj, name, counted)


def test_a_nodes_heartbeats_go_on_while_its_next_call_is_held_up(cluster):
    """Bug: ``next_rendezvous`` stopped the heartbeat thread and left the beats to the calling
    thread, which beat only after its first read of the state. With 255 threads of a process
    rejoining at once, that read took a second or more, the beats went out 2.4 s apart on median
    against a 3 s TTL, and leases lapsed by the dozen. Now the heartbeat thread beats on, on its
    own, through the call."""
    a, b = cluster.make(2, 2, 2)
    _check_group(_infos(cluster.rendezvous([a, b])), 2)
    beats: list[float] = []
    beat = b._backend.liveness.beat

    def counted_beat(*args, **kwargs):
        beats.append(time.monotonic())
        return beat(*args, **kwargs)

    b._backend.liveness.beat = counted_beat
    get_state = b._backend.get_state
    held: list[float] = []

    def held_up_get_state():
        if not held:  # the call's first read, by a thread starved of CPU
            held.append(time.monotonic())
            time.sleep(1.0)
            held.append(time.monotonic())
        return get_state()

    b._backend.get_state = held_up_get_state
    job_b = cluster.start(b.next_rendezvous)
    wait_until(lambda: held, what="b's call to start")
    _check_group(_infos([cluster.start(a.next_rendezvous).result(), job_b.result()]), 2)
    during = [t for t in beats if held[0] <= t <= held[1]]
    # An interval of 0.1 s: about ten beats in the second the call was held up (none before).
    assert len(during) >= 5, f"{len(during)} beats in the second b's call was held up"


def test_a_node_waiting_in_its_call_copies_the_state_only_when_it_changes(cluster, monkeypatch):
    """A waiting node wakes every heartbeat interval to look at the others' liveness; a wake that
    finds the state as it was read it the same way, but no longer decodes a copy of it (in a
    re-rendezvous at N = 256: 2,028-2,439 full reads, 880-898 now)."""
    import rdzv_common.holder as holder_mod

    a, b = cluster.make(2, 2, 2)
    copies = []
    decode_state = holder_mod.decode_state
    monkeypatch.setattr(holder_mod, "decode_state", lambda *args: copies.append(1) or decode_state(*args))
    counter = StateCallCounter(a._backend)
    job = cluster.start(a.next_rendezvous)
    time.sleep(10 * a.settings.keep_alive_interval)  # a waits for b
    reads, copied = counter.calls.count("get_state"), len(copies)
    assert counter.beats >= 5  # its heartbeats went on
    _check_group(_infos([cluster.start(b.next_rendezvous).result(), job.result()]), 2)
    assert reads >= 5  # it woke to look at b's liveness
    assert copied <= 3, f"{copied} copies in {reads} reads"


def test_a_heartbeat_reads_and_writes_no_state(cluster):
    """Bug: the old heartbeat ran an op through the executor (``keep_alive_op``), which synced the
    holder: every beat of every node read the shared state (and could write it), so the server's
    load grew with the number of nodes times the beat rate. Now a beat touches only the node's
    liveness."""
    a, b = cluster.make(2, 2, 2)
    _check_group(_infos(cluster.rendezvous([a, b])), 2)
    a._stop_heartbeats()
    time.sleep(0.3)  # let an in-flight heartbeat land before counting and before the clock jumps
    counter = StateCallCounter(a._backend)
    ttl = a.settings.liveness_ttl
    cluster.clock.offset += ttl + 1  # a's last beat is stale: only a new one keeps it alive
    assert a._backend.liveness.alive([a.node.key], ttl) == set()
    for _ in range(3):
        a._keep_alive()
    assert counter.beats == 3
    assert a._backend.liveness.alive([a.node.key], ttl) == {a.node.key}
    assert counter.calls == []
    # The heartbeat thread does the same.
    a._start_heartbeats()
    wait_until(lambda: counter.beats >= 6, what="three beats from the heartbeat thread")
    a._stop_heartbeats()
    assert counter.calls == []
