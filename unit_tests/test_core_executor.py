"""OpExecutor and the announce/fold protocol it drives through the StateHolder: who folds the
pending announcements, what a node does when its own is gone, that every decision gets the
executor's clocks, and that an announcement is withdrawn whenever its op ends."""

from __future__ import annotations

import threading
import time

import pytest
from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousTimeoutError

from rdzv_common import holder as holder_module
from rdzv_common.codec import decode_announcement, decode_state, encode_join, encode_state
from rdzv_common.executor import OpExecutor
from rdzv_common.holder import FOLD_FALLBACK_FIRST, FOLD_FALLBACK_STEP, StateHolder
from rdzv_common.memory import MemoryBackend, MemoryStore
from rdzv_common.ops import ROLLBACK_PERIOD, Action, fold, join_op
from rdzv_common.settings import RendezvousSettings
from rdzv_common.state import NodeDesc, RendezvousState

RUN = "executor-run"
NODES = [NodeDesc("10.0.0.1", 100 + i, 0) for i in range(6)]
NOW = 5_000.0  # the executors' monotonic time
WALL = 2_000_000.0  # their UNIX time


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


class WaitRecordingBackend(MemoryBackend):
    """Records the timeout of each ``wait_for_change`` and returns once ``clock`` has run through
    it (nobody writes)."""

    def __init__(self, store: MemoryStore) -> None:
        super().__init__(store, RUN)
        self.waits: list[float] = []
        self.clock = FakeClock(NOW)

    def wait_for_change(self, token, timeout: float) -> None:
        self.waits.append(timeout)
        self.clock.advance(timeout)


class HookBackend(MemoryBackend):
    """A memory backend that runs ``before_set`` (once) just before a compare-and-set, and
    ``before_post`` (once) just before a post; ``fences=False`` makes ``withdraw`` the no-op of a
    backend that cannot fence (c10d)."""

    def __init__(self, store: MemoryStore, fences: bool = True) -> None:
        super().__init__(store, RUN)
        self.before_set = None
        self.before_post = None
        mailbox = self.mailbox
        post, withdraw = mailbox.post, mailbox.withdraw

        def hooked_post(record, poster=None):
            hook, self.before_post = self.before_post, None
            if hook is not None:
                hook()
            return post(record, poster)

        mailbox.post = hooked_post
        self.withdrawn: list = []

        def recorded_withdraw(handle):
            self.withdrawn.append(handle)
            if fences:
                withdraw(handle)

        mailbox.withdraw = recorded_withdraw

    def set_state(self, state, token=None, fence=(), member=None):
        hook, self.before_set = self.before_set, None
        if hook is not None:
            hook()
        return super().set_state(state, token, fence, member)


def _settings(min_nodes=2, max_nodes=4, **kw) -> RendezvousSettings:
    return RendezvousSettings(RUN, min_nodes, max_nodes, **kw)


def _executor(store: MemoryStore, node: NodeDesc) -> tuple[OpExecutor, StateHolder, WaitRecordingBackend]:
    settings = _settings()
    backend = WaitRecordingBackend(store)
    holder = StateHolder(backend, settings, node, clock=backend.clock)
    executor = OpExecutor(node, holder, backend, settings)
    holder.read()
    executor.beat()
    return executor, holder, backend


def _stored(store) -> RendezvousState:
    return decode_state(store.states[RUN][0])


@pytest.fixture(autouse=True)
def _no_jitter(monkeypatch):
    monkeypatch.setattr(holder_module.random, "uniform", lambda a, b: 1.0)


# --------------------------------------------------------------------------- who folds


def test_the_oldest_poster_folds_at_once():
    store = MemoryStore()
    _, holder, backend = _executor(store, NODES[0])
    holder.announce(Action.ADD_TO_PARTICIPANTS)
    assert holder.await_fold() is False
    assert backend.waits == []  # no waiting: it is first in line
    assert holder.write() is True
    assert NODES[0] in holder.state.participants


def test_a_later_poster_waits_longer_the_further_back_it_is():
    store = MemoryStore()
    executors = [_executor(store, node) for node in NODES[:3]]
    for _, holder, _ in executors:
        holder.announce(Action.ADD_TO_PARTICIPANTS)
    for place, (_, holder, backend) in enumerate(executors[1:], start=1):
        # Nobody ahead folded within the wait, so this node folds the whole batch itself.
        assert holder.await_fold() is False
        assert backend.waits == [pytest.approx(FOLD_FALLBACK_FIRST + FOLD_FALLBACK_STEP * place)]
    last_holder = executors[2][1]
    assert last_holder.write() is True
    assert set(last_holder.state.participants) == set(NODES[:3])


def test_a_wait_for_a_turn_in_line_ends_when_a_heartbeat_is_due():
    """A node far back in line waits up to FOLD_FALLBACK_FIRST + FOLD_FALLBACK_STEP * 16 seconds
    (4.5 s) for its turn, longer than a liveness TTL of 1 s x 3: it stops when its heartbeat is
    due, so the caller beats, and keeps its turn. Without the beat, a re-rendezvous at N = 256
    lost nodes to lapses, and the round, short of min_nodes, fell into hundreds of lost writes."""
    store = MemoryStore()
    executors = [_executor(store, node) for node in NODES[:3]]
    for _, holder, _ in executors:
        holder.announce(Action.ADD_TO_PARTICIPANTS)
    _, last, backend = executors[2]
    assert last.await_fold(decide_in=0.3) is True  # decide afresh: beat, then wait again
    assert backend.waits == [pytest.approx(0.3)]
    assert last.await_fold() is False  # the turn counted from the post, not from the beat
    assert sum(backend.waits) == pytest.approx(FOLD_FALLBACK_FIRST + FOLD_FALLBACK_STEP * 2)


def test_a_poster_in_line_only_looks_at_a_write_that_folds_the_line_ahead_of_it():
    """A write that folds the announcements ahead of a waiting poster's moves it up the line: it
    looked at the stored state and, first in line now, folds at once, with no full read of the
    writes that passed over it."""
    store = MemoryStore()
    executors = [_executor(store, node) for node in NODES[:3]]
    for _, holder, _ in executors:
        holder.announce(Action.ADD_TO_PARTICIPANTS)
    _, last, backend = executors[2]
    reads = []
    read = last.read
    last.read = lambda *args, **kwargs: reads.append(1) or read(*args, **kwargs)
    waits = backend.waits

    def a_write_folds_the_two_ahead(token, timeout):
        waits.append(timeout)
        backend.clock.advance(0.1)
        if len(waits) == 1:
            state = last.state.copy()
            for data in store.logs[RUN][:2]:
                fold(state, decode_announcement(data), _settings())
            state.cursor = 2  # the position past the second record
            assert backend.set_state(encode_state(state), last.token)[2]

    backend.wait_for_change = a_write_folds_the_two_ahead
    assert last.await_fold() is False  # its turn at once: it folds its own announcement now
    assert len(waits) == 1
    assert len(reads) == 1  # the read it writes from, and no other
    assert last.write() is True
    assert set(_stored(store).participants) == set(NODES[:3])


def test_repeated_joins_of_placed_nodes_do_not_hold_up_the_line():
    store = MemoryStore()
    _, placed_holder, _ = _executor(store, NODES[0])
    placed_holder.announce(Action.ADD_TO_PARTICIPANTS)
    placed_holder.mark_dirty()
    assert placed_holder.write() is True
    # A second join record of the already placed node, older than the next joiner's.
    store_backend = MemoryBackend(store, RUN)
    store_backend.mailbox.post(store_backend.mailbox.read(0)[0].data)
    _, holder, backend = _executor(store, NODES[1])
    holder.announce(Action.ADD_TO_PARTICIPANTS)
    assert holder.await_fold() is False
    assert backend.waits == []


def test_a_node_whose_join_was_undone_announces_again():
    store = MemoryStore()
    _, holder, _ = _executor(store, NODES[0])
    holder.announce(Action.ADD_TO_PARTICIPANTS)
    holder.mark_dirty()
    assert holder.write() is True
    # Another node dropped it (e.g. it was thought dead) and the record is folded: none is pending.
    state = holder.state.copy()
    del state.participants[NODES[0]]
    other = MemoryBackend(store, RUN)
    _, token, won = other.set_state(encode_state(state), holder.token)
    assert won
    holder.read()
    posted_before = len(other.mailbox.read(0))
    assert holder.await_fold() is False
    holder.announce(Action.ADD_TO_PARTICIPANTS)
    assert len(other.mailbox.read(0)) == posted_before + 1


class VanishingMailboxBackend(WaitRecordingBackend):
    """Every record posted is gone before anyone reads it (it lapses with its poster's session at
    once, say): each announcement of the node is consumed without placing it. Fails the test
    once the node has posted ``storm`` records."""

    def __init__(self, store: MemoryStore, storm: int = 200) -> None:
        super().__init__(store)
        self.posts: list[float] = []
        mailbox = self.mailbox
        post = mailbox.post

        def vanishing_post(record, poster=None):
            self.posts.append(self.clock())
            assert len(self.posts) < storm, "a write storm: the node re-posts without backing off"
            posted = post(record, poster)
            mailbox.withdraw(posted.handle)
            return posted

        mailbox.post = vanishing_post


def test_an_announcement_consumed_without_placing_the_node_is_posted_again_with_growing_waits():
    store = MemoryStore()
    settings = _settings(min_nodes=2)
    backend = VanishingMailboxBackend(store)
    holder = StateHolder(backend, settings, NODES[0], clock=backend.clock)
    executor = OpExecutor(NODES[0], holder, backend, settings, clock=backend.clock, wall_clock=lambda: WALL)
    with pytest.raises(RendezvousTimeoutError):
        executor.run(join_op, NOW + 60)
    gaps = [b - a for a, b in zip(backend.posts, backend.posts[1:])]
    assert 5 <= len(backend.posts) <= 25, backend.posts
    assert gaps[0] < 0.05  # the first repeat goes at once: a node dropped once re-joins at once
    assert max(gaps) >= 2.0 and gaps[-2] >= gaps[2], gaps  # then each waits longer


# --------------------------------------------------------------------------- clocks


def test_every_decision_gets_the_executors_clocks():
    store = MemoryStore()
    settings = _settings(keep_alive_interval=4.0)
    backend = WaitRecordingBackend(store)
    clock, wall = FakeClock(NOW), FakeClock(WALL)
    holder = StateHolder(backend, settings, NODES[0], wall_clock=wall)
    executor = OpExecutor(NODES[0], holder, backend, settings, clock=clock, wall_clock=wall)
    seen = []

    def op(ctx, deadline):
        seen.append((ctx.now, ctx.wall, ctx.keep_alive_due))
        clock.advance(1.0)
        wall.advance(10.0)
        return Action.SYNC if len(seen) < 3 else Action.FINISH

    executor.beat()  # at NOW
    executor.run(op, NOW + 7)
    assert seen == [(NOW, WALL, False), (NOW + 1, WALL + 10, False), (NOW + 2, WALL + 20, False)]
    # Each wait ends at the next heartbeat or the deadline, on the executor's clock.
    assert backend.waits == [pytest.approx(3.0), pytest.approx(2.0)]


def test_the_next_heartbeat_is_due_an_interval_after_the_last_was_sent():
    """Bug: the next beat fell due an interval after the last one *returned*. Under load a reply
    took most of a second, so beats went out up to 2.4 s apart against a 3 s TTL, leases lapsed by
    the dozen in a re-rendezvous at N = 256, and the dropped nodes set off storms of writes."""
    store = MemoryStore()
    settings = _settings(keep_alive_interval=1.0)
    backend = MemoryBackend(store, RUN)
    clock = FakeClock(NOW)
    executor = OpExecutor(NODES[0], StateHolder(backend, settings, NODES[0]), backend, settings, clock=clock)
    beat = backend.liveness.beat

    def slow_beat(*args, **kwargs):
        clock.advance(0.6)  # the reply's delay
        beat(*args, **kwargs)

    backend.liveness.beat = slow_beat
    executor.beat()
    assert executor.last_beat == NOW
    assert executor.next_beat_in() == pytest.approx(0.4)
    # A beat asked for only if due is skipped while the last one is recent (another thread sent it).
    executor.beat(if_due=True)
    assert clock.t == pytest.approx(NOW + 0.6)
    clock.advance(0.4)
    executor.beat(if_due=True)
    assert executor.last_beat == pytest.approx(NOW + 1.0)


def test_an_op_run_on_a_state_just_read_decides_first_and_reads_after():
    """After a rejoin, the join decides from the state the rejoin finished on (one read fewer per
    node in a re-rendezvous); a wait then reads as usual."""
    store = MemoryStore()
    executor, holder, backend = _executor(store, NODES[0])
    reads = []
    get_state = backend.get_state
    backend.get_state = lambda: reads.append(len(decisions)) or get_state()
    decisions = []

    def op(ctx, deadline):
        decisions.append(ctx.state.round)
        return Action.SYNC if len(decisions) < 2 else Action.FINISH

    executor.run(op, NOW + 7, synced=True)
    assert reads == [1]  # the first decision came before any read; the second after one


def test_an_executor_whose_caller_beats_sends_no_beat_and_wakes_only_to_look_at_liveness():
    store = MemoryStore()
    settings = _settings(keep_alive_interval=1.0)
    backend = WaitRecordingBackend(store)
    holder = StateHolder(backend, settings, NODES[0], clock=backend.clock)
    executor = OpExecutor(NODES[0], holder, backend, settings, clock=backend.clock, beats=False)
    beats = []
    backend.liveness.beat = lambda *args, **kwargs: beats.append(args)
    seen = []

    def op(ctx, deadline):
        seen.append(ctx.keep_alive_due)
        return Action.SYNC if len(seen) < 3 else Action.FINISH

    executor.run(op, NOW + 7)
    assert seen == [False, False, False] and beats == []  # the caller's thread sends the beats
    # Each wait lasts an interval: the node looks at the others' liveness between waits.
    assert backend.waits == [pytest.approx(1.0), pytest.approx(1.0)]


def test_a_node_that_waits_past_its_deadline_does_not_poll():
    """Bug: a redundant node waits for a free place past its join deadline, and each of its waits
    was bounded by that deadline, passed already: it read the state every 10 ms."""
    store = MemoryStore()
    executor, _, backend = _executor(store, NODES[0])
    decisions = []

    def redundant(ctx, deadline):
        decisions.append(ctx.now)
        return Action.SYNC if len(decisions) < 4 else Action.FINISH

    executor.run(redundant, backend.clock.t - 1.0)
    assert all(wait >= 0.5 for wait in backend.waits), backend.waits


def test_a_participant_waits_for_the_last_call_on_the_wall_clock():
    store = MemoryStore()
    settings = _settings(keep_alive_interval=50.0)
    backend = WaitRecordingBackend(store)
    MemoryBackend(store, RUN).set_state(
        encode_state(RendezvousState(participants={NODES[0]: 0, NODES[1]: 0}, deadline=WALL + 1.5))
    )
    MemoryBackend(store, RUN).liveness.beat(NODES[1].key, settings.liveness_ttl)
    holder = StateHolder(backend, settings, NODES[0], wall_clock=lambda: WALL)
    executor = OpExecutor(NODES[0], holder, backend, settings, clock=lambda: NOW, wall_clock=lambda: WALL)
    executor.beat()
    decisions = iter([Action.SYNC, Action.FINISH])
    executor.run(lambda ctx, deadline: next(decisions), NOW + 60)
    assert backend.waits == [pytest.approx(1.5)]


# --------------------------------------------------------------------------- withdrawal


def test_a_finished_join_leaves_nothing_withdrawn():
    store = MemoryStore()
    settings = _settings(min_nodes=1, max_nodes=1)
    backend = HookBackend(store)
    holder = StateHolder(backend, settings, NODES[0])
    executor = OpExecutor(NODES[0], holder, backend, settings)
    executor.run(join_op, executor._clock() + 30)
    assert _stored(store).participants == {NODES[0]: 0} and _stored(store).complete
    assert backend.withdrawn == [] and store.withdrawn == set()


def test_an_op_that_fails_withdraws_its_pending_join():
    store = MemoryStore()
    settings = _settings()
    backend = HookBackend(store)
    holder = StateHolder(backend, settings, NODES[0])
    executor = OpExecutor(NODES[0], holder, backend, settings)

    def unreachable():
        raise RendezvousConnectionError("the server went away")

    backend.before_set = unreachable  # its own write of its join fails
    with pytest.raises(RendezvousConnectionError):
        executor.run(join_op, executor._clock() + 30)
    assert backend.withdrawn == [1]
    # Nobody folds it later.
    other = StateHolder(MemoryBackend(store, RUN), settings, NODES[1])
    other.mark_dirty()
    assert other.write() is True
    assert NODES[0] not in _stored(store).nodes()


def test_join_of_a_node_that_timed_out_is_withdrawn_and_fences_the_fold_that_read_it():
    """Bug: a node whose join op timed out before its join was folded left the join in the
    mailbox; any later write (even one already under way) placed the departed node in the round,
    which then waited for, or formed a group with, a node that was gone. Now the executor withdraws
    the join when the op ends, and a write that folded it before the withdrawal is fenced and fails.

    B posts its join; A starts a write that reads it; B's own write loses a race and B's time runs
    out, so B times out and withdraws; only then does A's compare-and-set reach the server."""
    store = MemoryStore()
    settings = _settings(min_nodes=2, max_nodes=3)
    A, B = NODES[0], NODES[1]
    plain = MemoryBackend(store, RUN)
    plain.set_state(encode_state(RendezvousState(participants={A: 0})))
    plain.liveness.beat(A.key, settings.liveness_ttl)

    backend_a = HookBackend(store)
    holder_a = StateHolder(backend_a, settings, A, wall_clock=lambda: WALL)
    backend_b = HookBackend(store)
    clock_b = FakeClock(NOW)
    holder_b = StateHolder(backend_b, settings, B, wall_clock=lambda: WALL)
    executor_b = OpExecutor(B, holder_b, backend_b, settings, clock=clock_b, wall_clock=lambda: WALL)

    a_has_read, b_withdrew = threading.Event(), threading.Event()
    results: list = []

    def a_write():
        try:
            holder_a.read()
            holder_a.mark_dirty()
            results.append(holder_a.write())  # folds B's join, then waits for B to give up
        except BaseException as e:  # noqa: BLE001 - reported below
            results.append(e)
            a_has_read.set()

    tokens_current: list[bool] = []

    def a_about_to_write():
        # Only the fence can stop this write: A's token is the stored one.
        tokens_current.append(holder_a.token == plain.get_state()[1])
        a_has_read.set()
        assert b_withdrew.wait(10)

    backend_a.before_set = a_about_to_write
    folder = threading.Thread(target=a_write, daemon=True)

    def b_about_to_write():
        # A write that read the mailbox before B posted lands first: B's write will lose.
        current = plain.get_state()
        plain.set_state(current[0], current[1])
        folder.start()
        assert a_has_read.wait(10)
        clock_b.advance(10 + ROLLBACK_PERIOD + 1)  # and B's join deadline passes meanwhile

    backend_b.before_set = b_about_to_write
    withdraw = backend_b.mailbox.withdraw

    def withdraw_and_tell(handle):
        withdraw(handle)
        b_withdrew.set()

    backend_b.mailbox.withdraw = withdraw_and_tell
    try:
        with pytest.raises(RendezvousTimeoutError):
            executor_b.run(join_op, NOW + 10)
    finally:
        b_withdrew.set()
        folder.join(10)
    assert not folder.is_alive()
    assert backend_b.withdrawn == [1]
    assert tokens_current == [True]
    assert results == [False]  # A's write read B's join before the withdrawal: it was fenced
    assert B not in _stored(store).nodes()
    holder_a.mark_dirty()
    assert holder_a.write() is True
    state = _stored(store)
    assert B not in state.nodes() and state.participants == {A: 0}
    assert state.cursor == 0  # nothing live was posted; B's record is not folded by anyone


@pytest.mark.parametrize("fences", [True, False], ids=["withdrawn", "not-withdrawable"])
def test_take_back_of_an_incomplete_round_does_not_leave_the_group_it_formed(fences):
    """Bug: a node whose join timed out while its round was incomplete posted a leave naming the
    round number only; when that round completed with the node in it before the leave was folded,
    the node saw itself ranked and finished, but the next write folded the stale leave and removed
    it from the group just formed (its rank vanished, the world size no longer matched). Now the
    leave says the round was incomplete and does not apply to the complete round; where the
    backend can, the executor also withdraws it when the op finishes."""
    store = MemoryStore()
    settings = _settings(min_nodes=2, max_nodes=3, last_call_timeout=30)
    me, a, c, d = NODES[:4]
    plain = MemoryBackend(store, RUN)
    for n in (a, c, d):
        plain.liveness.beat(n.key, settings.liveness_ttl)
    plain.set_state(encode_state(RendezvousState(participants={me: 0, a: 0}, deadline=WALL + 30)))
    other = StateHolder(MemoryBackend(store, RUN), settings, a, wall_clock=lambda: WALL)

    def round_fills():
        # Before the take-back is posted, a write folds c's join: the round is full and complete.
        plain.mailbox.post(encode_join(c))
        other.read()
        other.mark_dirty()
        assert other.write() is True
        assert _stored(store).complete

    backend = HookBackend(store, fences=fences)
    backend.before_post = round_fills
    holder = StateHolder(backend, settings, me, wall_clock=lambda: WALL)
    executor = OpExecutor(me, holder, backend, settings, clock=lambda: NOW, wall_clock=lambda: WALL)
    executor.run(join_op, NOW - 1)  # its join deadline passed while the round was incomplete

    posted = [decode_announcement(data) for data in store.logs[RUN]]
    assert [(x.kind, x.node, x.round, x.complete) for x in posted] == [
        ("join", c, None, None),
        ("leave", me, 0, False),
    ]
    assert backend.withdrawn == [2]  # the op finished with its take-back unfolded
    group = _stored(store)
    assert group.complete and group.world_size == 3
    assert group.participants == {n: r for r, n in enumerate(sorted([me, a, c]))}
    # Later writes (d joins) fold whatever is left in the mailbox: the group stays as it formed.
    plain.mailbox.post(encode_join(d))
    other.read()
    other.mark_dirty()
    assert other.write() is True
    state = _stored(store)
    assert state.participants == group.participants
    assert state.complete and state.world_size == 3 and state.round == 0
    assert state.redundancy_list == {d}


# --------------------------------------------------------------------------- waits and beats


def test_a_placed_participant_passes_over_joins_folded_into_its_round_and_wakes_when_it_completes():
    """At N = 1,024 a join took 21 writes, each folding the joins posted meanwhile into the open
    round, and each one had every node placed so far read the whole state again (a copy and a
    liveness check of every node): nothing a placed participant decides changes until the round
    completes, a last call starts or it is removed."""
    store = MemoryStore()
    settings = _settings(min_nodes=4, max_nodes=4, keep_alive_interval=30.0)
    me = NODES[0]
    writer = MemoryBackend(store, RUN)
    open_round = RendezvousState(participants={me: 0, NODES[1]: 0})
    writer.set_state(encode_state(open_round))
    for node in NODES[:4]:
        writer.liveness.beat(node.key, 60)
    backend = MemoryBackend(store, RUN)
    holder = StateHolder(backend, settings, me)
    executor = OpExecutor(me, holder, backend, settings, beats=False)
    reads = []
    read = holder.read
    holder.read = lambda *args, **kwargs: (reads.append(1), read(*args, **kwargs))[1]
    done = threading.Event()

    def join() -> None:
        executor.run(join_op, time.monotonic() + 30)
        done.set()

    threading.Thread(target=join, daemon=True).start()
    fuller = open_round.copy()
    fuller.participants[NODES[2]] = 0
    time.sleep(0.2)  # the node has read the state and waits
    writer.set_state(encode_state(fuller), writer.get_state()[1])
    assert not done.wait(0.3)
    assert len(reads) == 1  # the write was only looked at
    complete = fuller.copy()
    complete.participants = {node: rank for rank, node in enumerate(NODES[:4])}
    complete.complete, complete.world_size = True, 4
    writer.set_state(encode_state(complete), writer.get_state()[1])
    assert done.wait(5)
    assert len(reads) == 2 and holder.state.complete


def test_a_waiting_node_passes_over_members_leaving_and_wakes_for_the_next_round():
    """In a re-rendezvous of N nodes, a node whose rejoin was folded waits in the wait list while
    the other N - 1 leave one write at a time; a full read (a copy of the state and a liveness
    check of every node) at each of those writes, by each waiting node, was N squared reads."""
    store = MemoryStore()
    me = NODES[5]
    backend = MemoryBackend(store, RUN)
    settings = _settings()
    state = RendezvousState(complete=True, participants={NODES[0]: 0, NODES[1]: 1}, world_size=2, wait_list={me})
    backend.set_state(encode_state(state))
    for node in (NODES[0], NODES[1], me):
        backend.liveness.beat(node.key, 60)
    holder = StateHolder(backend, settings, me)
    holder.read()
    token = holder.token
    woke = threading.Event()

    def wait() -> None:
        holder.wait_until(lambda stored: stored.round != 0 or me not in stored.wait_list, 10.0)
        woke.set()

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    left = state.copy()
    left.remove_participant(NODES[0])
    backend.set_state(encode_state(left), backend.get_state()[1])
    assert not woke.wait(0.3)
    assert holder.token == token and NODES[0] in holder.state.participants  # only looked at
    opened = left.copy()
    opened.remove_participant(NODES[1])
    backend.set_state(encode_state(opened), backend.get_state()[1])
    assert woke.wait(5)
    waiter.join(5)
