"""Driving one rendezvous run through etcd faults: handlers in threads of this process, each with
its own backend, their answers logged, and the checks every fault test ends with. Shared by the
process-cluster tests (``test_faults_etcd``) and the container-cluster tests (``test_docker_cluster``).
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from torch.distributed.elastic.rendezvous import RendezvousParameters

from benchmarks.answers import AnswerLog, check, record_rendezvous
from benchmarks.invariants import InvariantChecker
from etcd_rdzv.keys import RunKeys
from etcd_rdzv.plugin import create_handler
from integration_tests.tools import wait_until
from rdzv_common.codec import decode_state

__all__ = [
    "FAST", "STEP", "Run", "assert_group", "lapse_inside_the_completing_write", "ordered_endpoint",
    "wait_for_participants",
]

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

    def __init__(
        self,
        endpoint: str,
        min_nodes: int,
        max_nodes: int,
        read_timeout: float = 10,
        direct: str | None = None,
        workers: int = 8,
    ) -> None:
        """
        Args:
            endpoint: the handlers' ``--rdzv-endpoint`` (through fault proxies, say).
            direct: where the invariant checker reads etcd, past any proxy; ``endpoint`` by default.
            workers: how many ``next_rendezvous`` calls may run at once.
        """
        unique = uuid.uuid4().hex[:10]
        self.endpoint = endpoint
        self.direct = direct or endpoint
        self.run_id = f"fault-{unique}"
        self.key_prefix = f"/rdzv-fault/{unique}"
        self.key = RunKeys(self.key_prefix, self.run_id).state
        self.min_nodes, self.max_nodes = min_nodes, max_nodes
        self.read_timeout = read_timeout
        self.handlers = []
        self.answers = AnswerLog()
        self.pool = ThreadPoolExecutor(workers)

    def params(self, endpoint: str | None = None, **conf) -> RendezvousParameters:
        """The run's parameters on ``endpoint`` (the run's by default); ``conf`` overrides ``FAST``."""
        return RendezvousParameters(
            backend="etcd_rdzv", endpoint=endpoint or self.endpoint, run_id=self.run_id, min_nodes=self.min_nodes,
            max_nodes=self.max_nodes, local_addr="127.0.0.1", key_prefix=self.key_prefix,
            read_timeout=self.read_timeout, **{**FAST, **conf},
        )

    def handler(self, endpoint: str | None = None, **conf):
        """A new handler of the run, on ``endpoint`` (the run's by default). Handlers of one process
        with the same endpoint share one etcd client (``etcd_rdzv.runtime.fork``)."""
        handler = create_handler(self.params(endpoint, **conf))
        self.handlers.append(handler)
        return handler

    def checker(self) -> InvariantChecker:
        return InvariantChecker(self.direct, self.key, self.min_nodes, self.max_nodes)

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


def ordered_endpoint(first, members) -> str:
    """``--rdzv-endpoint`` with ``first``'s endpoint ahead of the others, so that the handlers talk
    to it when a fault hits it."""
    return ",".join([first.endpoint] + [m.endpoint for m in members if m is not first])


def wait_for_participants(checker: InvariantChecker, count: int) -> None:
    """Wait until the stored state of the run has ``count`` participants."""
    wait_until(
        lambda: any(s and len(s.participants) == count for _, s in list(checker.states)),
        STEP, 0.05, f"{count} participants",
    )


def lapse_inside_the_completing_write(handler, seconds: float, heartbeat_lag: float = 0.0) -> threading.Event:
    """Stall ``handler``'s process, its heartbeats included, for ``seconds`` at its first write that
    completes a round, after its liveness checks and before the compare-and-set (a long GC pause,
    a swapping host): with ``seconds`` past its liveness TTL, it lapses inside its own write. Its
    heartbeats resume ``heartbeat_lag`` seconds after the write. The event is set once the stall
    is over."""
    backend = handler._backend
    set_state, beat = backend.set_state, backend.liveness.beat
    stalled, over = threading.Event(), threading.Event()

    def stalling_set_state(state, *args, **kwargs):
        if not stalled.is_set() and decode_state(state).complete:
            stalled.set()
            time.sleep(seconds)
            over.set()
        return set_state(state, *args, **kwargs)

    def stalling_beat(*args, **kwargs):
        if stalled.is_set() and not over.is_set():
            over.wait()
            time.sleep(heartbeat_lag)
        return beat(*args, **kwargs)

    backend.set_state = stalling_set_state
    backend.liveness.beat = stalling_beat
    return over
