"""Rendezvous under network faults: handlers talk to etcd through ``nemesis`` proxies that stall,
delay, blackhole, reset and drop responses, and to a 3-member cluster whose members reach each
other through proxies too (so one member can be cut off from its peers while its clients still
reach it).

Every scenario logs each answer ``next_rendezvous`` gave (``answers.record_rendezvous``) and ends
with ``answers.check`` against the groups ``InvariantChecker`` saw stored: an empty list, or the
test fails. Each is bounded well under a minute (``pytest-timeout`` backs that up).

Note: etcd3's client starts on a *random* endpoint of its list, not the first, so where a fault
must hit the member the handlers talk to, the tests find that member by the proxy that carries
their connections (``in_use``) instead of trusting the endpoint order.
"""

from __future__ import annotations

import collections
import gc
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import etcd3.etcdrpc as rpc
import grpc
import pytest
from torch.distributed.elastic.rendezvous import RendezvousError
from torch.distributed.elastic.utils.store import barrier

from benchmarks.answers import check, record_close, record_rendezvous, record_waiting
from benchmarks.invariants import etcd_client
from etcd_rdzv.runtime.client import REQUIRE_LEADER
from etcd_rdzv.embedded import EtcdCluster, find_etcdctl
from etcd_rdzv.factory import create_backend
from integration_tests.faultrun import STEP, Run, assert_group, lapse_inside_the_completing_write, wait_for_participants
from integration_tests.nemesis import Proxy
from integration_tests.tools import wait_until
from rdzv_common import ops

pytestmark = pytest.mark.timeout(90)


# -- helpers -----------------------------------------------------------------------------------


def in_use(proxies: list[Proxy], handler) -> Proxy:
    """The proxy of the endpoint that ``handler``'s client (shared by the run's handlers of this
    process) is on now; the checker reads etcd directly. On a busy machine an attempt can time out
    before the fault and move the client on, leaving connections on two proxies: the fault must
    hit the one the requests go to."""
    endpoint = handler._backend._run.etcd.raw.endpoint_in_use.netloc
    (proxy,) = [p for p in proxies if p.endpoint == endpoint]
    assert proxy.connections(), f"the handlers' client is on {endpoint}, but no connection goes through its proxy"
    return proxy


def leave(handler) -> None:
    """The node leaves as an agent that exits does: it stops beating and its liveness is revoked."""
    die(handler)
    handler._backend.close()


def die(handler) -> None:
    """The node dies: its beats stop, and its liveness lapses on its own. Its process is gone, so
    no finalizer of its handler runs later (one would try to end its liveness, for up to 2 s)."""
    handler._stop_heartbeats()
    handler._abandoned.detach()


def our_threads() -> list[str]:
    """Threads of the package and of the proxies that still run."""
    prefixes = ("etcd-rdzv", "RendezvousKeepAliveTimer", "RendezvousLeave", "nemesis-")
    return sorted(t.name for t in threading.enumerate() if t.name.startswith(prefixes) and t.is_alive())


def member_ids(cluster: EtcdCluster) -> dict[str, str]:
    """Member name -> member id as etcd writes it in its peers' ``X-Server-From`` header (hex)."""
    client = etcd_client(cluster.endpoint)
    try:
        return {m.name: format(m.id, "x") for m in client.members}
    finally:
        client.close()


def finished(futures, limit: float) -> list:
    """The results of ``futures``, each within ``limit`` seconds."""
    return [f.result(timeout=limit) for f in futures]


# -- 1. a stalled watch while a round forms ----------------------------------------------------


def test_stalled_connection_while_a_round_forms_costs_seconds_not_timeouts(etcd_endpoints, etcd_admin):
    """The handlers' connection (watch and requests share it: one HTTP/2 connection per endpoint)
    stalls while nodes join: requests give up on it after one attempt (a quarter of read_timeout,
    at least 2 s), the view's stream is reopened after 3 s of silence, and both move to the other
    endpoint. A store read blocked on the view meanwhile sees a key set directly on etcd within
    seconds, not at its 300 s timeout."""
    target = etcd_endpoints[0]
    with Proxy.to(target) as first, Proxy.to(target) as second:
        run = Run(f"{first.endpoint},{second.endpoint}", 3, 3, read_timeout=5, direct=target)
        backend = None
        try:
            handlers = [run.handler() for _ in range(3)]
            # A store of the same process and run: it shares the handlers' client and view.
            backend, store = create_backend(run.params(), "etcd_rdzv")
            with run.checker() as checker:
                early = run.next(handlers[:2])
                wait_for_participants(checker, 2)
                blocked = run.pool.submit(store.get, "late-key")
                time.sleep(0.5)  # the read found nothing and waits on the view
                assert not blocked.done()
                stalled = in_use([first, second], handlers[0])
                stalled.stall()
                stalled_at = time.monotonic()
                late = run.next(handlers[2:])
                etcd_admin.put(store.prefix + "late-key", b"set-directly")
                assert blocked.result(timeout=15) == b"set-directly"
                read_took = time.monotonic() - stalled_at
                infos = finished(early + late, 20)
                round_took = time.monotonic() - stalled_at
                assert_group(infos, checker, handlers, run)
            print(f"stall: blocked read returned after {read_took:.1f}s, round completed {round_took:.1f}s after the stall")
            assert read_took < 8, f"the blocked read took {read_took:.1f}s through a stalled connection"
            assert round_took < 20, f"the round took {round_took:.1f}s with read_timeout=5"
            stalled.resume()
        finally:
            if backend is not None:
                backend.close()
            run.close()


# -- 2. a committed add whose response is lost -------------------------------------------------


def test_barrier_add_with_lost_responses_neither_hangs_nor_releases_early(etcd_endpoints, etcd_admin):
    """torch's store barrier (``add(count, 1)``; the last arrival sets a key everyone waits for),
    every participant on its own connection, each losing the response of its committed ``add``.
    A retried add applied twice would release the barrier early; one lost for good, never."""
    target = etcd_endpoints[0]
    n = 4
    proxies = [Proxy.to(target) for _ in range(n)]
    run = Run(target, n, n, read_timeout=5)
    backends, stores = [], []
    try:
        for proxy in proxies:
            backend, store = create_backend(run.params(proxy.endpoint), "etcd_rdzv")
            backends.append(backend)
            stores.append(store)
            # Connected, lease and session granted: the next request of the add is its first
            # transaction.
            store.add("warm-up", 1)
        arrived, released, returned = {}, {}, {}

        def participant(i: int) -> None:
            arrived[i] = time.monotonic()
            barrier(stores[i], n, "barrier", barrier_timeout=30)
            released[i] = time.monotonic()

        with ThreadPoolExecutor(n) as pool:
            futures = []
            for i in range(n):
                # Arrivals one at a time, so that each add's transactions are known: the first
                # add's first transaction (the key is absent) commits; every later add's first
                # transaction guesses the key absent, fails, and its second commits.
                proxies[i].drop_responses_after(0 if i == 0 else 1)
                futures.append(pool.submit(participant, i))
                wait_until(lambda i=i: proxies[i].faults["drop_response"] == 1, 10, 0.02, f"participant {i}'s lost add")
                wait_until(
                    lambda i=i: int(etcd_admin.get(stores[0].prefix + "barrier/num_members")[0] or 0) == i + 1,
                    10, 0.02, f"the count at {i + 1}",
                )
                time.sleep(0.3)
                returned[i] = [f.done() for f in futures]
            for f in futures:
                f.result(timeout=30)
        count = int(etcd_admin.get(stores[0].prefix + "barrier/num_members")[0])
        assert count == n, f"the barrier's counter ended at {count}, not {n}"
        last = arrived[n - 1]
        assert all(t >= last for t in released.values()), f"released before the last arrival: {released}, last {last}"
        # Nobody was released while somebody was still to come.
        assert all(not any(done) for done in list(returned.values())[:-1]), returned
        assert [p.faults["drop_response"] for p in proxies] == [1] * n
    finally:
        for backend in backends:
            backend.close()
        for proxy in proxies:
            proxy.close()
        run.close()


# -- 3. a member cut off from its peers --------------------------------------------------------


@pytest.fixture
def proxied_cluster(etcd_binary) -> Iterator[tuple[EtcdCluster, dict[str, Proxy], dict[str, Proxy]]]:
    """A 3-member cluster whose members reach each other through a proxy in front of each peer
    port, and a client proxy in front of each member: (cluster, peer proxies, client proxies) by
    member name."""
    peers: dict[str, Proxy] = {}

    def through_proxy(name: str, peer_port: int) -> str:
        peers[name] = Proxy("127.0.0.1", peer_port)
        return peers[name].endpoint

    cluster = EtcdCluster(etcd_binary, peer_address=through_proxy)
    clients: dict[str, Proxy] = {}
    try:
        cluster.start()
        clients = {m.name: Proxy.to(m.endpoint) for m in cluster.members}
        yield cluster, peers, clients
    finally:
        for proxy in [*clients.values(), *peers.values()]:
            proxy.heal()
        cluster.close()
        for proxy in [*clients.values(), *peers.values()]:
            proxy.close()


def partition(name: str, ids: dict[str, str], peers: dict[str, Proxy]) -> None:
    """Cut member ``name`` off from its peers, both ways: nothing reaches its peer port, and the
    connections it opens to the others' (which name it in ``X-Server-From``) are blackholed."""
    peers[name].blackhole()
    for other, proxy in peers.items():
        if other != name:
            proxy.isolate(f"X-Server-From: {ids[name]}".encode())


def test_member_cut_off_from_its_peers_is_left_for_the_others(proxied_cluster):
    cluster, peers, clients = proxied_cluster
    ids = member_ids(cluster)
    names = [m.name for m in cluster.members]
    run = Run(",".join(clients[n].endpoint for n in names), 3, 3, read_timeout=8, direct=cluster.endpoint)
    try:
        handlers = [run.handler() for _ in range(3)]
        with run.checker() as checker:
            early = run.next(handlers[:2])
            wait_for_participants(checker, 2)
            proxy = in_use(list(clients.values()), handlers[0])
            (cut,) = [n for n in names if clients[n] is proxy]
            # The peer proxies can tell the member's own connections apart.
            marker = f"X-Server-From: {ids[cut]}".encode()
            assert any(marker in c.opening for n in names if n != cut for c in peers[n].connections())
            partition(cut, ids, peers)
            cut_at = time.monotonic()
            late = run.next(handlers[2:])
            infos = finished(early + late, STEP + run.read_timeout)
            took = time.monotonic() - cut_at
            round_ = assert_group(infos, checker, handlers, run)
            print(f"partition of {cut}: the round completed {took:.1f}s after the cut")
            assert took < 20
            # The cut-off member refuses a request that requires a leader (as the package's do).
            solo = etcd_client(clients[cut].endpoint, timeout=2)
            try:
                with pytest.raises(grpc.RpcError) as refused:
                    rpc.KVStub(solo.channel).Range(
                        rpc.RangeRequest(key=run.key.encode()), timeout=5, metadata=(REQUIRE_LEADER,)
                    )
                assert "no leader" in (refused.value.details() or ""), refused.value
            finally:
                solo.close()
            infos = finished(run.next(handlers), STEP)
            assert assert_group(infos, checker, handlers, run) > round_
        for n in names:
            peers[n].heal()
    finally:
        run.close()


# -- 4. latency on every request, 32 nodes -----------------------------------------------------


def test_32_nodes_rendezvous_and_replace_one_under_50_to_200ms_latency(etcd_endpoints):
    """Four proxies with 25, 50, 75 and 100 ms each way (so 50 to 200 ms per request); 32 handlers
    in four groups, each group with its own client (its own endpoint order), each on whichever
    proxy its client picks. Then one node leaves, a new one takes its place, and all re-rendezvous."""
    target = etcd_endpoints[0]
    proxies = [Proxy.to(target) for _ in range(4)]
    for proxy, delay in zip(proxies, (0.025, 0.05, 0.075, 0.1)):
        proxy.latency(delay)
    orders = [",".join(p.endpoint for p in proxies[k:] + proxies[:k]) for k in range(4)]
    run = Run(orders[0], 32, 32, read_timeout=10, direct=target, workers=33)
    try:
        handlers = [run.handler(orders[i % 4]) for i in range(32)]
        with run.checker() as checker:
            started = time.monotonic()
            first = assert_group(finished(run.next(handlers), 40), checker, handlers, run)
            first_took = time.monotonic() - started
            leave(handlers[5])
            handlers[5] = run.handler(orders[1])
            started = time.monotonic()
            second = assert_group(finished(run.next(handlers), 40), checker, handlers, run)
            second_took = time.monotonic() - started
        assert second > first
        answers = len(run.answers.answers)
        print(f"latency: 32 nodes in {first_took:.1f}s, re-rendezvous in {second_took:.1f}s, {answers} answers checked")
        assert answers == 64
    finally:
        for proxy in proxies:
            proxy.latency(0)  # the 32 shutdowns are not what this test is about
        run.close()
        for proxy in proxies:
            proxy.close()


# -- 5. a hung leader ----------------------------------------------------------------------------


@pytest.fixture
def cluster_behind_proxies(etcd_binary) -> Iterator[tuple[EtcdCluster, dict[str, Proxy]]]:
    """A 3-member cluster with a client proxy in front of each member, by member name."""
    with EtcdCluster(etcd_binary) as cluster:
        clients = {m.name: Proxy.to(m.endpoint) for m in cluster.members}
        try:
            yield cluster, clients
        finally:
            for proxy in clients.values():
                proxy.close()


def move_leader(cluster: EtcdCluster, to: str) -> None:
    """Make member ``to`` the leader (etcdctl move-leader, asked of the current leader)."""
    leader = cluster.leader()
    if leader.name == to:
        return
    ids = member_ids(cluster)
    etcdctl = find_etcdctl(leader.binary)
    assert etcdctl, "no etcdctl beside the etcd binary"
    subprocess.run(
        [etcdctl, f"--endpoints={leader.endpoint}", "move-leader", ids[to]],
        check=True, capture_output=True, timeout=20,
    )
    wait_until(lambda: cluster.leader().name == to, 10, 0.1, f"{to} to lead")


def test_leader_hung_behind_its_proxy_mid_rendezvous_the_round_still_completes(cluster_behind_proxies):
    """The member the handlers talk to is made leader, then its client proxy stalls: every request
    hangs rather than fails. Each attempt is bounded to a quarter of read_timeout, so the handlers
    move to the other members and the round completes within one read_timeout or so."""
    cluster, clients = cluster_behind_proxies
    names = [m.name for m in cluster.members]
    run = Run(",".join(clients[n].endpoint for n in names), 3, 3, read_timeout=8, direct=cluster.endpoint)
    try:
        handlers = [run.handler() for _ in range(3)]
        with run.checker() as checker:
            early = run.next(handlers[:2])
            wait_for_participants(checker, 2)
            proxy = in_use(list(clients.values()), handlers[0])
            (hung,) = [n for n in names if clients[n] is proxy]
            move_leader(cluster, hung)
            proxy.stall()
            hung_at = time.monotonic()
            try:
                late = run.next(handlers[2:])
                infos = finished(early + late, STEP + run.read_timeout)
                took = time.monotonic() - hung_at
                round_ = assert_group(infos, checker, handlers, run)
            finally:
                proxy.resume()
            print(f"hung leader {hung}: the round completed {took:.1f}s after the stall")
            assert took < 2 * run.read_timeout
            infos = finished(run.next(handlers), STEP)
            assert assert_group(infos, checker, handlers, run) > round_
    finally:
        run.close()


# -- 6. a random fault schedule over a churn run -------------------------------------------------

CHURN_SECONDS = 35.0
SLOTS = 6
# The share of the churn's handlers whose process stalls inside its first write that completes a
# round, for longer than the run's liveness TTL (2 s): the fence must keep them out of that group.
# The participant next in line to complete a round steps in COMPLETE_STEP after the first: longer
# than the stall, so that the stalled write is the one that lands (at 0.25 s, the next in line
# completed the round during the stall and the stalled write always lost).
LAPSE_SHARE = 0.3
LAPSE_SECONDS = 3.0
COMPLETE_STEP = 4.0


class Churn:
    """Agent slots in threads that join, train (polling ``num_nodes_waiting`` as torchrun's agent
    does, and re-rendezvousing when it is above 0), re-rendezvous, leave and die at random, on a
    run whose connections go through ``proxies``; what every call ended with is counted in
    ``outcomes``. Some of the handlers lapse inside their own completing write."""

    def __init__(self, run: Run, orders: list[str], seed: int) -> None:
        self.run = run
        self.orders = orders
        self.seed = seed
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.unclear: list[str] = []
        self.churn: collections.Counter[str] = collections.Counter()
        self.live: set = set()
        self.corpses: list = []
        # etcd's current revision, read past the proxies: answers are judged at it.
        self.admin = etcd_client(run.direct)

    def now(self) -> int:
        return self.admin.get_response(self.run.key).header.revision

    def _call(self, handler) -> bool:
        try:
            record_rendezvous(handler, self.run.answers, self.now)
        except RendezvousError as exc:
            return self._failed(handler, exc)
        except Exception as exc:  # noqa: BLE001 - anything but a RendezvousError is a finding
            return self._failed(handler, exc)
        with self.lock:
            self.outcomes["returned"] += 1
        return True

    def _failed(self, handler, exc: BaseException) -> bool:
        with self.lock:
            self.outcomes[type(exc).__name__] += 1
            if not isinstance(exc, RendezvousError) or type(exc) is RendezvousError:
                self.unclear.append(f"{handler.node.key}: {type(exc).__name__}: {exc}")
        return False

    def _train(self, handler, rng: random.Random) -> bool:
        """Train for a while as torchrun's agent does: poll ``num_nodes_waiting`` every 0.2 s;
        return True to re-rendezvous at once (nodes wait), False when training ended by itself."""
        until = time.monotonic() + rng.uniform(0, 2)
        while time.monotonic() < until and not self.stop.is_set():
            try:
                if record_waiting(handler, self.run.answers) > 0:
                    with self.lock:
                        self.churn["monitor restart"] += 1
                    return True
            except Exception as exc:  # noqa: BLE001 - a monitor call must not fail under these faults
                self._failed(handler, exc)
                return False
            self.stop.wait(0.2)
        return False

    def slot(self, index: int) -> None:
        rng = random.Random(self.seed * 100 + index)
        handler = None
        while not self.stop.is_set():
            if handler is None:
                handler = self.run.handler(self.orders[index % len(self.orders)])
                lapses = rng.random() < LAPSE_SHARE
                if lapses:
                    lapse_inside_the_completing_write(handler, LAPSE_SECONDS, heartbeat_lag=0.5)
                with self.lock:
                    self.live.add(handler)
                    self.churn["joined"] += 1
                    self.churn["lapse injected"] += lapses
            if not self._call(handler) or self._train(handler, rng) or self.stop.is_set():
                continue
            fate = rng.choices(["again", "leave", "die"], weights=[6, 2, 2])[0]
            if fate == "again":
                continue
            with self.lock:
                self.live.discard(handler)
                self.churn[fate] += 1
                if fate == "die":
                    self.corpses.append(handler)
            if fate == "leave":
                leave(handler)
            else:
                die(handler)
            handler = None
            self.stop.wait(rng.uniform(0.5, 3))


def fault_schedule(
    proxies: list[Proxy], rng: random.Random, until: float, stop: threading.Event, read_timeout: float,
    scheduled: collections.Counter,
) -> None:
    """Faults on and off at random until ``until``: latency, a stall shorter than read_timeout, a
    reset of every connection, a dropped response. One fault at a time, a quiet gap after each,
    on a proxy that carries connections (each client uses one of its endpoints at a time)."""
    while time.monotonic() < until and not stop.is_set():
        proxy = rng.choice([p for p in proxies if p.connections()] or proxies)
        kind = rng.choice(["latency", "stall", "reset", "drop_response"])
        scheduled[kind] += 1
        if kind == "latency":
            proxy.latency(rng.uniform(0.025, 0.1))
            stop.wait(rng.uniform(1, 4))
            proxy.latency(0)
        elif kind == "stall":
            proxy.stall()
            stop.wait(rng.uniform(0.5, read_timeout * 0.6))
            proxy.resume()
        elif kind == "reset":
            proxy.reset()
        else:
            proxy.drop_next_response()
        stop.wait(rng.uniform(0.2, 1.5))


def test_random_fault_schedule_over_a_churn_run(etcd_endpoints):
    threads_before = set(our_threads())
    figures = churn_under_random_faults(etcd_endpoints[0], seed=20261130)
    # Nothing of the run is referenced any more: its stores are collected, releasing the shared
    # client, session and view, whose threads must end.
    gc.collect()
    returned = time.monotonic()
    try:
        # A session thread may be inside one renewal (up to read_timeout) when its cluster closes.
        wait_until(lambda: set(our_threads()) <= threads_before, 15, 0.2, "the threads to end")
    except AssertionError:
        raise AssertionError(f"threads left: {sorted(set(our_threads()) - threads_before)}") from None
    print(f"random faults: {figures}; no thread left {time.monotonic() - returned:.1f}s after the run")


def churn_under_random_faults(target: str, seed: int) -> dict:
    """The churn run under the fault schedule; returns its figures (and holds on to nothing)."""
    proxies = [Proxy.to(target) for _ in range(3)]
    orders = [",".join(p.endpoint for p in proxies[k:] + proxies[:k]) for k in range(3)]
    run = Run(orders[0], 2, 4, read_timeout=6, direct=target, workers=1)
    run.handler = _churn_handler(run)
    churn = Churn(run, orders, seed)
    scheduled: collections.Counter[str] = collections.Counter()
    slots = [threading.Thread(target=churn.slot, args=(i,), name=f"churn-slot-{i}", daemon=True) for i in range(SLOTS)]
    started = time.monotonic()
    faults = threading.Thread(
        target=fault_schedule,
        args=(proxies, random.Random(seed), started + CHURN_SECONDS, churn.stop, run.read_timeout, scheduled),
        name="churn-faults", daemon=True,
    )
    try:
        with run.checker() as checker, mock.patch.object(ops, "COMPLETE_STEP", COMPLETE_STEP):
            for thread in [*slots, faults]:
                thread.start()
            faults.join(CHURN_SECONDS + run.read_timeout)
            for proxy in proxies:
                proxy.heal()
            # Close the run: whoever waits in a round learns it at once, and the slots stop.
            churn.stop.set()
            closer = run.handler(orders[0])
            assert record_close(closer, run.answers)
            for thread in slots:
                thread.join(20)
            assert not [t.name for t in slots if t.is_alive()], "a slot's call did not return"
            for handler in [*churn.live, closer]:
                handler.shutdown()
            for handler in churn.corpses:
                handler._backend.close()
            checker.sync()
        violations = check(run.answers, checker.groups, states=checker.states) + checker.violations
        injected: collections.Counter[str] = collections.Counter()
        for proxy in proxies:
            injected.update(proxy.faults)
        figures = {
            "seed": seed,
            "seconds": round(time.monotonic() - started),
            "faults scheduled": dict(sorted(scheduled.items())),
            "faults injected": dict(sorted(injected.items())),
            "rounds completed": len(checker.groups),
            "answers checked": len(run.answers.answers),
            "monitor answers checked": len(run.answers.waiting),
            "violations": len(violations),
            "calls": dict(churn.outcomes),
            "churn": dict(churn.churn),
        }
        print(f"\nrandom faults: {figures}")
        assert violations == [], "\n".join(violations) + "\n" + run.answers.describe()
        assert churn.unclear == [], churn.unclear
        assert figures["rounds completed"] >= 5 and figures["answers checked"] >= 10, figures
        assert sum(injected.values()) >= 10, figures
        return figures
    finally:
        churn.stop.set()
        run.handlers = []
        run.close()
        for proxy in proxies:
            proxy.close()
        churn.live.clear()
        churn.corpses.clear()
        churn.admin.close()


def _churn_handler(run: Run):
    """``run.handler`` with a short join timeout, so that a node left waiting gives up in bounded time."""
    make = run.handler

    def handler(endpoint: str | None = None):
        return make(endpoint, join_timeout=15, last_call_timeout=0.5)

    return handler
