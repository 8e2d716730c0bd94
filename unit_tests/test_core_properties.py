"""Invariants under churn: a hypothesis state machine drives up to six nodes one step at a time.

Each node is the real core (``StateHolder`` + ``OpExecutor`` + ops) over one in-memory server, on
a fake clock handed to the executor and the holder. A node's step runs its executor until it would block: the backend's
``wait_for_change`` raises ``Yield`` instead of waiting (the first wait of a step returns, as a
wait that timed out while the node was descheduled would), and a step may also be pre-empted
just before its compare-and-set, so other nodes act between a decision and its write (lost
races).
No threads; every interleaving is chosen by hypothesis and replayable.

Checked on every successful write of the shared state, and after every step:

* a round completes at most once: the group (participants and ranks) recorded the first time a
  round is seen complete never gains a member or changes a rank later;
* a round is complete with ranks exactly 0..n-1 and min_nodes <= n <= max_nodes when first seen,
  and below max_nodes only if the state it was written over was in a last call that is over;
* every node placed in a round got that round's rank and world size (all members agree);
* participants never exceed max_nodes; no node is in two lists; a closed run stays closed;
* at the end, every live node that keeps stepping gets a rank or a clear error (or waits, as a
  redundant node may, for a place in a full round).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch.distributed.elastic.rendezvous import (
    RendezvousClosedError,
    RendezvousGracefulExitError,
    RendezvousTimeoutError,
)

import rdzv_common.holder as holder_mod
from rdzv_common.codec import decode_state
from rdzv_common.executor import OpExecutor
from rdzv_common.holder import StateHolder
from rdzv_common.memory import MemoryBackend, MemoryStore
from rdzv_common.ops import close_op, exit_op, join_op, rejoin_op
from rdzv_common.settings import RendezvousSettings
from rdzv_common.state import NodeDesc

# The checker of what nodes were told, which the soak benchmark uses too: pure, importable here
# (pytest puts the rootdir on sys.path).
from benchmarks.answers import Answer, AnswerLog, check

RUN = "prop-run"
MAX_N = 6
INTERVAL = 1.0  # keep_alive_interval; liveness TTL is 3 x this
JOIN_TIMEOUT = 20.0


class FakeTime:
    """Stands in for the ``time`` module inside the core: one clock for monotonic and wall time."""

    def __init__(self) -> None:
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t

    def time(self) -> float:
        return 1.7e9 + self.t

    def sleep(self, _seconds: float) -> None:  # pragma: no cover - the core never sleeps here
        raise AssertionError("the core slept in a single-threaded test")


CLOCK = FakeTime()


@pytest.fixture(autouse=True, scope="module")
def _fake_time():
    # The holder times its monitor cache and liveness answers on ``time.monotonic``; the executor
    # and the holder's last-call deadlines get CLOCK's methods handed in (see ``Node``).
    patched = [(holder_mod, "time")]
    saved = [(m, name, getattr(m, name)) for m, name in patched]
    for m, name in patched:
        setattr(m, name, CLOCK)
    try:
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


class Yield(Exception):
    """The node would block here; control goes back to the scheduler."""


class SteppingBackend(MemoryBackend):
    """A node's backend: never blocks, may pre-empt a write, checks every state it writes."""

    def __init__(self, machine: "ChurnMachine", store: MemoryStore) -> None:
        super().__init__(store, RUN)
        self.machine = machine
        self.preempt_write = False
        self.ops = 0
        self.wait_budget = 0
        # The last-call deadline of a write pre-empted before its compare-and-set: the holder keeps
        # that state (dirty) and writes it later, so the call may have started in it.
        self.preempted_deadline = None

    def _count(self) -> None:
        self.ops += 1
        if self.ops > 400:
            raise AssertionError("a node made no progress: 400 backend calls in one step")

    def get_state(self):
        self._count()
        return super().get_state()

    def set_state(self, state, token=None, fence=(), member=None):
        self._count()
        if self.preempt_write:
            self.preempt_write = False
            self.preempted_deadline = decode_state(state).deadline or self.preempted_deadline
            raise Yield()
        response = super().set_state(state, token, fence, member)
        if response is not None and response[2]:
            self.machine.check_written(decode_state(response[0]), self.preempted_deadline)
            self.preempted_deadline = None
        return response

    def wait_for_change(self, token, timeout):
        current = self._store.states.get(RUN)
        if (current[1] if current else None) != token:
            return  # the state already moved: no wait
        if self.wait_budget > 0:
            # The node was woken for this step: its previous wait timed out, so this one returns
            # as a timed-out wait would, and the node acts once more before it blocks again.
            self.wait_budget -= 1
            return
        raise Yield()


class Node:
    def __init__(self, machine: "ChurnMachine", index: int) -> None:
        self.desc = NodeDesc("10.0.0.1", 1000 + index, 0)
        self.backend = SteppingBackend(machine, machine.store)
        self.holder = StateHolder(self.backend, machine.settings, self.desc, wall_clock=CLOCK.time, clock=CLOCK.monotonic)
        self.executor = OpExecutor(
            self.desc, self.holder, self.backend, machine.settings, clock=CLOCK.monotonic, wall_clock=CLOCK.time
        )
        self.phase = "new"  # new | exit | join | placed | leaving | terminal states below
        self.deadline = 0.0
        self.outcome: str | None = None
        # Half the nodes leave and join in one announcement, as next_rendezvous does when
        # admission has nothing to check; the others leave first, as it does otherwise.
        self.rejoins = index % 2 == 0
        self.left_round = 0  # the round a rejoining node leaves: the one its holder last read

    @property
    def active(self) -> bool:
        return self.phase in ("exit", "join", "leaving")

    @property
    def beating(self) -> bool:
        return self.active or self.phase == "placed"


def _world_size(state) -> int:
    """The world size a handler reports: the size of the group the round formed."""
    return state.world_size


TERMINAL = ("dead", "left", "closed", "timeout", "graceful")


class ChurnMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        CLOCK.t = 1000.0
        self.store = MemoryStore(clock=CLOCK.monotonic)
        self.nodes: list[Node] = []
        self.settings: RendezvousSettings | None = None
        self.completed: dict[int, dict[NodeDesc, int]] = {}
        self.placements: dict[int, dict[NodeDesc, tuple[int, int]]] = {}
        self.closed_seen = False
        self.last_round = 0
        self.last_written = None  # the stored state every successful write replaced
        self.answers = AnswerLog()  # every placement, as next_rendezvous would have answered it

    # ----------------------------------------------------------------- checks

    def check_written(self, s, preempted_deadline=None) -> None:
        replaced, self.last_written = self.last_written, s
        lists = [set(s.participants), s.wait_list, s.redundancy_list]
        assert sum(len(x) for x in lists) == len(set().union(*lists)), f"a node is in two lists: {s}"
        assert len(s.participants) <= self.settings.max_nodes, s
        if self.closed_seen:
            assert s.closed, "a closed rendezvous was reopened"
        self.closed_seen = self.closed_seen or s.closed
        assert s.round >= self.last_round, "the round went backwards"
        self.last_round = s.round
        if not s.complete:
            assert all(r == 0 for r in s.participants.values()), s
            return
        group = self.completed.get(s.round)
        if group is None:
            self.completed[s.round] = dict(s.participants)  # recorded first: no cascading failures
            n = len(s.participants)
            assert sorted(s.participants.values()) == list(range(n)), (
                f"round {s.round} completed with ranks {sorted(s.participants.values())}: {s}"
            )
            assert self.settings.min_nodes <= n <= self.settings.max_nodes, (
                f"round {s.round} completed with {n} participants, outside "
                f"{self.settings.min_nodes}..{self.settings.max_nodes}: {s}"
            )
            assert s.world_size == n, f"round {s.round} completed with world_size {s.world_size}: {s}"
            if n < self.settings.max_nodes:
                # Below max_nodes only once the last call is over. A write writes over the stored
                # state, so the call's deadline is the one in the state it replaced, or, if that had
                # none, the one the writer set in an attempt pre-empted before its compare-and-set.
                deadline = None
                if replaced is not None and replaced.round == s.round and not replaced.complete:
                    deadline = replaced.deadline
                if deadline is None:
                    deadline = preempted_deadline
                assert deadline is not None and deadline <= CLOCK.time(), (
                    f"round {s.round} completed with {n} < max_nodes outside its last call "
                    f"(deadline {deadline}, now {CLOCK.time()}): {replaced} -> {s}"
                )
        else:
            for node, rank in s.participants.items():
                assert group.get(node) == rank, (
                    f"round {s.round} completed twice: {group} then {s.participants}"
                )
            assert s.world_size == len(group), s

    def _placed(self, node: Node) -> None:
        state = node.holder.state
        rnd = state.round
        rank, world = state.participants[node.desc], _world_size(state)
        assert state.complete
        group = self.completed.get(rnd)
        assert group is not None, f"{node.desc} placed in round {rnd}, never seen complete"
        assert group.get(node.desc) == rank, f"{node.desc}: rank {rank}, round {rnd} group {group}"
        # The node's rank and world size must be those of the round as stored, not of a view only
        # this node holds (for instance after dropping a node it alone believes dead): members
        # that disagree on the world size hang their trainers.
        stored = decode_state(self.store.states[RUN][0])
        assert stored.round == rnd and stored.complete
        assert (rank, world) == (stored.participants.get(node.desc), _world_size(stored)), (
            f"{node.desc} got rank {rank} of {world} in round {rnd}; stored: {stored.participants}"
        )
        # Members that left the round before this node read it shrink the world (as in torch),
        # but never grow it.
        assert world <= len(group)
        seen = self.placements.setdefault(rnd, {})
        for other, (r, w) in seen.items():
            if other != node.desc:
                assert r != rank, f"round {rnd}: {other} and {node.desc} both got rank {r}"
        seen[node.desc] = (rank, world)
        # No bootstrap store in this model: one name for every round.
        self.answers.add(Answer(node.desc.key, rnd, rank, world, "memory", CLOCK.monotonic()))
        node.phase = "placed"

    # ----------------------------------------------------------------- setup

    @initialize(
        n=st.integers(2, MAX_N),
        min_nodes=st.integers(1, 3),
        extra=st.integers(0, 3),
        last_call=st.sampled_from([0.5, 2.0]),
        started=st.integers(1, MAX_N),
    )
    def setup(self, n, min_nodes, extra, last_call, started):
        min_nodes = min(min_nodes, n)
        self.settings = RendezvousSettings(
            RUN,
            min_nodes,
            min(min_nodes + extra, MAX_N),
            join_timeout=JOIN_TIMEOUT,
            last_call_timeout=last_call,
            close_timeout=5.0,
            heartbeat_timeout=5.0,
            keep_alive_interval=INTERVAL,
            keep_alive_max_attempt=3,
        )
        self.nodes = [Node(self, i) for i in range(n)]
        for node in self.nodes[:started]:
            self._begin(node)

    def _node(self, i: int) -> Node:
        return self.nodes[i % len(self.nodes)]

    # ----------------------------------------------------------------- driving one node

    def _step(self, node: Node, preempt: bool = False) -> None:
        node.backend.ops = 0
        node.backend.wait_budget = 1
        node.backend.preempt_write = preempt

        def new_deadline(timeout: float) -> float:
            node.deadline = CLOCK.t + timeout
            return node.deadline

        try:
            if node.phase == "exit" and node.rejoins:
                node.executor.run(rejoin_op(node.left_round), node.deadline)
                node.phase = "join"
            elif node.phase in ("exit", "leaving"):
                node.executor.run(exit_op, node.deadline)
                if node.phase == "leaving":
                    node.backend.liveness.forget(node.desc.key)
                    node.phase = "left"
                else:
                    node.phase = "join"
            elif node.phase == "join":
                node.executor.run(join_op, node.deadline, new_deadline)
                self._placed(node)
        except Yield:
            pass
        except RendezvousClosedError:
            node.phase = "closed"
        except RendezvousTimeoutError:
            node.phase = "timeout"
            node.backend.liveness.forget(node.desc.key)  # as the handler does on a timeout
        except RendezvousGracefulExitError:
            node.phase = "graceful"
        finally:
            node.backend.preempt_write = False

    def _begin(self, node: Node) -> None:
        # What next_rendezvous does before its first decision.
        node.holder.refresh_liveness()
        node.holder.read()
        node.executor.beat()
        node.left_round = node.holder.state.round
        node.deadline = CLOCK.t + JOIN_TIMEOUT
        node.phase = "exit"

    # ----------------------------------------------------------------- rules

    def _eligible(self, phases) -> list[Node]:
        return [n for n in self.nodes if n.phase in phases]

    def _any(self, phases) -> bool:
        return bool(self._eligible(phases))

    @precondition(lambda self: self._any(("new", "placed")))
    @rule(data=st.data())
    def start(self, data):
        """A new node starts, or a placed node re-rendezvouses (its agent restarts workers)."""
        node = data.draw(st.sampled_from(self._eligible(("new", "placed"))), label="start")
        self._begin(node)

    @precondition(lambda self: self._any(("exit", "join", "leaving")))
    @rule(data=st.data(), preempt=st.booleans())
    def step(self, data, preempt):
        node = data.draw(st.sampled_from(self._eligible(("exit", "join", "leaving"))), label="step")
        self._step(node, preempt)

    @precondition(lambda self: self._any(("exit", "join", "leaving")))
    @rule(preempt=st.lists(st.booleans(), min_size=MAX_N, max_size=MAX_N))
    def step_all(self, preempt):
        """Every active node takes one step, in order; some are pre-empted before their write."""
        for node, p in zip(self.nodes, preempt):
            if node.active:
                self._step(node, p)

    @precondition(lambda self: self._any(("placed",)))
    @rule(data=st.data())
    def leave(self, data):
        """A placed node leaves for good: it exits its round, then its liveness ends."""
        node = data.draw(st.sampled_from(self._eligible(("placed",))), label="leave")
        node.phase = "leaving"
        node.deadline = CLOCK.t + JOIN_TIMEOUT
        self._step(node)

    @precondition(lambda self: self._any(("new", "exit", "join", "placed", "leaving")))
    @rule(data=st.data(), silent=st.booleans(), chance=st.integers(0, 3))
    def die(self, data, silent, chance):
        if chance:  # churn, not a massacre: most draws of this rule do nothing
            return
        node = data.draw(st.sampled_from(self._eligible(("new", "exit", "join", "placed", "leaving"))), label="die")
        if not silent:
            node.backend.liveness.forget(node.desc.key)
        node.phase = "dead"

    @precondition(lambda self: self._any(("new", "placed")))
    @rule(data=st.data(), chance=st.integers(0, 5))
    def close(self, data, chance):
        if chance:  # a close ends the run; keep it rare
            return
        node = data.draw(st.sampled_from(self._eligible(("new", "placed"))), label="close")
        node.backend.ops = 0
        node.executor.run(close_op, CLOCK.t + 5.0)
        assert decode_state(self.store.states[RUN][0]).closed

    @rule(dt=st.sampled_from([0.2, 0.3, 0.6, 1.0, 1.0, 2.5, 6.0, 25.0]))
    def advance(self, dt):
        self._advance(dt)

    def _advance(self, dt: float) -> None:
        while dt > 0:
            inc = min(dt, INTERVAL / 2)
            for node in self.nodes:
                if node.beating:  # heartbeat timers of live nodes
                    node.executor.beat()
            CLOCK.t += inc
            dt -= inc

    @invariant()
    def stored_state_decodes(self):
        entry = self.store.states.get(RUN)
        if entry is not None:
            state = decode_state(entry[0])
            if self.closed_seen:
                assert state.closed

    # ----------------------------------------------------------------- liveness at the end

    def _quiesce(self, dt: float) -> None:
        for _ in range(150):
            waiting = [n for n in self.nodes if n.active and not self._legitimately_waiting(n)]
            if not waiting:
                return
            for node in waiting:
                self._step(node)
            self._advance(dt)

    def teardown(self):
        if self.settings is None:
            return
        try:
            self._teardown()
        finally:
            self._check_answers()

    def _check_answers(self) -> None:
        """What every node was told, judged as the fault tests judge it (``answers.check``).
        Closes are not logged: the model's clock jumps, so the checker's grace period after a
        close (real seconds) means nothing here."""
        groups = {r: {n.key: rank for n, rank in group.items()} for r, group in self.completed.items()}
        problems = check(self.answers, groups)
        assert problems == [], "\n".join(problems) + "\n" + self.answers.describe()

    def _teardown(self) -> None:
        # Liveness: every live node that keeps stepping ends placed, with a clear error, or
        # legitimately waiting as a redundant node.
        self._quiesce(0.5)
        stuck = [(n.desc.key, n.phase) for n in self.nodes if n.active and not self._legitimately_waiting(n)]
        assert not stuck, f"live nodes neither placed nor failed after quiescence: {stuck}"
        if self.closed_seen:
            return
        # Progress: once churn stops, the live nodes re-rendezvous together (as their agents do on
        # a membership change) and form one round of min(len(live), max_nodes) within the timeout.
        live = [n for n in self.nodes if n.phase == "placed" or n.active]
        for node in live:
            if node.phase == "placed":
                self._begin(node)
            else:
                node.deadline = CLOCK.t + JOIN_TIMEOUT
        self._quiesce(0.2)
        if len(live) < self.settings.min_nodes:
            return
        timed_out = [n.desc.key for n in live if n.phase == "timeout"]
        assert not timed_out, f"{timed_out} timed out though {len(live)} live nodes re-rendezvoused"
        final = max(self.placements, default=None)
        placed = [n for n in live if n.phase == "placed" and n.desc in self.placements.get(final, {})]
        expected = min(len(live), self.settings.max_nodes)
        assert len(placed) == expected, (
            f"{len(live)} live nodes re-rendezvoused; round {final} placed {len(placed)}, "
            f"expected {expected}; phases {[(n.desc.key, n.phase) for n in live]}"
        )

    def _legitimately_waiting(self, node: Node) -> bool:
        """A redundant node may wait indefinitely for a place in a full, complete round."""
        if node.phase != "join":
            return False
        self._step(node)
        if node.phase != "join":
            return False
        entry = self.store.states.get(RUN)
        if entry is None:
            return False
        s = decode_state(entry[0])
        live_participants = [
            p for p in s.participants if any(n.desc == p and n.beating for n in self.nodes)
        ]
        return (
            node.desc in s.redundancy_list
            and s.complete
            and len(live_participants) == self.settings.max_nodes
        )


# Shrinking a failing churn run can take minutes; by default a failure is reported as found
# (still replayable from its printed steps). Set RDZV_SHRINK=1 to get a minimal failing run.
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target]
if os.environ.get("RDZV_SHRINK") == "1":
    _PHASES.append(Phase.shrink)

_SETTINGS = settings(
    max_examples=int(os.environ.get("RDZV_CHURN_EXAMPLES", "100")),
    stateful_step_count=60,
    deadline=None,
    phases=_PHASES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

TestChurn = ChurnMachine.TestCase
TestChurn.settings = _SETTINGS
