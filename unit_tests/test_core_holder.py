"""StateHolder: reads and compare-and-set writes, mailbox folding and fencing, announcements, dead-node removal,
the completion rule applied on write, and the monitor cache."""

from __future__ import annotations

import time

import pytest
from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousStateError

from rdzv_common.codec import decode_announcement, decode_state, encode_join, encode_leave, encode_state
from rdzv_common.holder import StateHolder
from rdzv_common.memory import MemoryBackend, MemoryLiveness, MemoryStore
from rdzv_common.ops import Action, Context, apply, join_op
from rdzv_common.settings import RendezvousSettings
from rdzv_common.state import NodeDesc, RendezvousState

RUN = "holder-run"
A = NodeDesc("10.0.0.1", 1, 0)
B = NodeDesc("10.0.0.2", 2, 0)
C = NodeDesc("10.0.0.3", 3, 0)
D = NodeDesc("10.0.0.4", 4, 0)
EARLY = NodeDesc("10.0.0.0", 1, 0)  # sorts before every other node: it gets rank 0


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


WALL = 1_000_000.0  # the holders' UNIX time


class CountingBackend(MemoryBackend):
    """Counts reads and writes, records each write's fence (its records' handles), and can run ``before_set`` (once)
    between a write's fold and its compare-and-set."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.gets = 0
        self.sets = 0
        self.fences: list[list] = []
        self.before_set = None

    def get_state(self):
        self.gets += 1
        return super().get_state()

    def set_state(self, state, token=None, fence=(), member=None):
        self.sets += 1
        self.fences.append([record.handle for record in fence])
        hook, self.before_set = self.before_set, None
        if hook is not None:
            hook()
        return super().set_state(state, token, fence, member)


def _settings(min_nodes=2, max_nodes=4, **kw) -> RendezvousSettings:
    kw.setdefault("keep_alive_interval", 1.0)
    kw.setdefault("keep_alive_max_attempt", 3)
    kw.setdefault("last_call_timeout", 0.2)
    return RendezvousSettings(RUN, min_nodes, max_nodes, **kw)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def store(clock):
    return MemoryStore(clock=clock)


def _backend(store) -> CountingBackend:
    return CountingBackend(store, RUN)


def _holder(backend, settings, node=None) -> StateHolder:
    return StateHolder(backend, settings, node, wall_clock=lambda: WALL)


def _stored(store) -> RendezvousState:
    return decode_state(store.states[RUN][0])


def _beat(backend, settings, *nodes):
    for n in nodes:
        backend.liveness.beat(n.key, settings.liveness_ttl)


def test_read_of_an_absent_state_is_the_empty_state(store):
    h = _holder(_backend(store), _settings())
    h.read()
    assert h.state == RendezvousState() and h.token is None


def test_write_then_read_back(store):
    s = _settings()
    b1, b2 = _backend(store), _backend(store)
    _beat(b1, s, A)
    h1, h2 = _holder(b1, s), _holder(b2, s)
    h1.read()
    apply(Action.ADD_TO_PARTICIPANTS, h1.state, A)
    h1.mark_dirty()
    assert h1.write() is True
    assert h1.writes == 1 and h1.failed_writes == 0
    assert h1.token is not None
    h2.read()
    assert h2.state.participants == {A: 0}
    assert h2.token == h1.token
    assert _stored(store).participants == {A: 0}


def test_a_read_does_not_write(store):
    s = _settings()
    b = _backend(store)
    h = _holder(b, s)
    h.read()
    h.read()
    assert b.sets == 0 and b.gets == 2


def test_lost_race_leaves_the_winners_state(store):
    s = _settings()
    b1, b2 = _backend(store), _backend(store)
    _beat(b1, s, A, B)
    h1, h2 = _holder(b1, s), _holder(b2, s)
    h1.read()
    h2.read()
    apply(Action.ADD_TO_PARTICIPANTS, h1.state, A)
    h1.mark_dirty()
    assert h1.write() is True
    winner = encode_state(h1.state)

    apply(Action.ADD_TO_PARTICIPANTS, h2.state, B)  # decided on a stale view
    h2.mark_dirty()
    assert h2.write() is False
    assert h2.failed_writes == 1 and h2.writes == 1
    assert encode_state(h2.state) == winner
    assert B not in h2.state.participants
    assert h2.token == h1.token
    assert store.states[RUN][0] == winner
    # The loser decides again from the winner's state and wins this time.
    apply(Action.ADD_TO_PARTICIPANTS, h2.state, B)
    h2.mark_dirty()
    assert h2.write() is True
    assert set(_stored(store).participants) == {A, B}


def test_mailbox_folding_admits_several_joins_in_one_write(store):
    s = _settings(min_nodes=2, max_nodes=4)
    b = _backend(store)
    joiners = [A, B, C]
    _beat(b, s, *joiners)
    for n in joiners:
        b.mailbox.post(encode_join(n))
    writes_before = store.writes
    h = _holder(b, s)
    h.read()
    assert h.state.participants == {}  # announcements are not state until folded
    h.mark_dirty()
    assert h.write() is True
    state = _stored(store)
    assert set(state.participants) == set(joiners)
    assert state.cursor == 3
    assert state.deadline == WALL + s.last_call_timeout  # reached min_nodes through folding
    assert not state.complete
    assert store.writes - writes_before == 1  # one state write admitted all three
    assert b.sets == 1
    assert b.fences == [[r.handle for r in b.mailbox.read(0)]]  # fenced on all it folded

    # A fourth join fills the round: the write completes it (settle), with sorted ranks.
    b.mailbox.post(encode_join(D))
    _beat(b, s, D)
    h.mark_dirty()
    assert h.write() is True
    state = _stored(store)
    assert state.cursor == 4 and state.complete and state.deadline is None and state.world_size == 4
    assert state.participants == {n: r for r, n in enumerate(sorted([A, B, C, D]))}
    # A write that folds nothing is fenced on nothing.
    h.mark_dirty()
    assert h.write() is True
    assert b.fences[-1] == []


def test_folded_joins_apply_exactly_once(store):
    s = _settings(min_nodes=1, max_nodes=2)
    b1, b2 = _backend(store), _backend(store)
    _beat(b1, s, A, B, C)
    for n in (A, B):
        b1.mailbox.post(encode_join(n))
    h1, h2 = _holder(b1, s), _holder(b2, s)
    h1.read()
    h1.mark_dirty()
    assert h1.write() is True
    assert _stored(store).complete and _stored(store).participants == {A: 0, B: 1}
    # Another writer starting from the stored cursor must not fold A and B again.
    b2.mailbox.post(encode_join(C))
    h2.read()
    h2.mark_dirty()
    assert h2.write() is True
    state = _stored(store)
    assert state.cursor == 3
    assert set(state.participants) == {A, B} and state.redundancy_list == {C}


def test_a_lost_write_does_not_consume_the_mailbox(store):
    s = _settings(min_nodes=2, max_nodes=4)
    b1, b2 = _backend(store), _backend(store)
    _beat(b1, s, A, B)
    h1, h2 = _holder(b1, s), _holder(b2, s)
    h1.read()
    h2.read()
    h1.mark_dirty()
    h1.write()  # writes cursor 0, moves the token
    b2.mailbox.post(encode_join(B))
    h2.mark_dirty()
    assert h2.write() is False  # its fold of B is discarded with its stale state
    assert _stored(store).cursor == 0 and not _stored(store).participants
    h1.mark_dirty()
    assert h1.write() is True
    assert set(_stored(store).participants) == {B} and _stored(store).cursor == 1


def test_dead_node_is_dropped_via_liveness(store, clock):
    s = _settings(min_nodes=2, max_nodes=4)
    b = _backend(store)
    _beat(b, s, A, B, C)
    initial = RendezvousState(participants={A: 0, B: 0, C: 0}, wait_list={D}, deadline=WALL + 60)
    b.set_state(encode_state(initial))
    h = _holder(b, s)
    h.read()
    assert set(h.state.participants) == {A, B, C} and h.state.wait_list == set()  # D never beat

    clock.advance(s.liveness_ttl + 0.5)
    _beat(b, s, A, B)  # C stops beating
    fresh = _holder(b, s)  # no cached answer about C
    fresh.read()
    assert set(fresh.state.participants) == {A, B}
    # A read only drops locally; the drop is written by the next write.
    assert set(_stored(store).participants) == {A, B, C}
    fresh.mark_dirty()
    assert fresh.write() is True
    state = _stored(store)
    assert set(state.participants) == {A, B}
    assert state.deadline == WALL + 60 and not state.complete  # still at min_nodes: same last call

    clock.advance(s.liveness_ttl + 0.5)
    _beat(b, s, A)
    fresh = _holder(b, s)
    fresh.read()
    fresh.mark_dirty()
    assert fresh.write() is True
    state = _stored(store)
    assert set(state.participants) == {A}
    assert state.deadline is None and not state.complete  # fell below min_nodes


class TrailingLiveness(MemoryLiveness):
    """A liveness whose everyday answers come from a copy that has not seen ``lapsed`` die yet
    (as a process's etcd run view may trail other nodes' lapses); ``current`` answers are true."""

    def __init__(self, *a, lapsed=(), **kw):
        super().__init__(*a, **kw)
        self.lapsed = set(lapsed)
        self.current_asks = 0

    def alive(self, node_keys, ttl, current=False):
        alive = super().alive(node_keys, ttl)
        if current:
            self.current_asks += 1
            return alive - self.lapsed
        return alive


def test_a_write_that_completes_a_round_checks_its_members_on_the_server(store):
    """A node killed while joining: its liveness key was gone from etcd, yet a newcomer's process
    view had not applied the delete, and the newcomer's join completed the round with the dead
    node in it (`test_agent_killed_while_joining_is_replaced`, seen in CI); the fourth node then
    waited for a group that could never train."""
    s = _settings(min_nodes=3, max_nodes=3)
    b = _backend(store)
    _beat(b, s, A, B, C)
    b._liveness = liveness = TrailingLiveness(store, RUN, lapsed={B.key})
    b.set_state(encode_state(RendezvousState(participants={A: 0, B: 0})))
    h = StateHolder(b, s, C, wall_clock=lambda: WALL)
    h.read()
    apply(Action.ADD_TO_PARTICIPANTS, h.state, C)
    h.mark_dirty()
    assert h.write() is True
    state = _stored(store)
    assert not state.complete and set(state.participants) == {A, C}
    assert liveness.current_asks == 1
    # A write that does not complete the round takes the everyday answer.
    h.mark_dirty()
    assert h.write() is True and liveness.current_asks == 1


def test_forgotten_node_is_dropped_from_every_list(store):
    s = _settings(min_nodes=1, max_nodes=2)
    b = _backend(store)
    _beat(b, s, A, B, C, D)
    initial = RendezvousState(
        round=3, complete=True, participants={A: 0, B: 1}, wait_list={C}, redundancy_list={D}
    )
    initial.world_size = 2
    b.set_state(encode_state(initial))
    for n in (A, B, C, D):
        b.liveness.forget(n.key)
    h = _holder(b, s)
    h.mark_dirty()
    h._state = decode_state(store.states[RUN][0])
    h._token = store.states[RUN][1]
    assert h.write() is True
    state = _stored(store)
    assert state.nodes() == set()
    assert state.round == 4 and not state.complete  # the emptied complete round advanced


def test_monitor_cache_skips_a_read(store):
    s = _settings()
    b = _backend(store)
    h = _holder(b, s)
    h.read()
    assert b.gets == 1
    other = _holder(_backend(store), s)
    _beat(b, s, A)
    other.read()
    apply(Action.ADD_TO_PARTICIPANTS, other.state, A)
    other.mark_dirty()
    other.write()

    h.read_if_older_than(60)
    assert b.gets == 1  # skipped: the cached view is young enough
    assert h.state.participants == {}  # and therefore stale
    h.read_if_older_than(0)
    assert b.gets == 2
    assert h.state.participants == {A: 0}


def test_monitor_cache_expires_on_the_holders_clock(store, clock):
    s = _settings()
    b = _backend(store)
    h = StateHolder(b, s, wall_clock=lambda: WALL, clock=clock)
    h.read()
    clock.advance(0.04)
    h.read_if_older_than(0.05)
    assert b.gets == 1
    clock.advance(0.02)
    h.read_if_older_than(0.05)
    assert b.gets == 2


def test_unwritten_changes_are_read_over_despite_max_age(store):
    """A read never writes: changes marked and not written are dropped by the next read, even
    one whose cached view is young enough, and ``write`` stores them."""
    s = _settings()
    b = _backend(store)
    _beat(b, s, A)
    h = _holder(b, s)
    h.read()
    apply(Action.ADD_TO_PARTICIPANTS, h.state, A)
    h.mark_dirty()
    h.read_if_older_than(60)
    assert b.sets == 0 and b.gets == 2
    assert h.state.participants == {} and not h.has_changes
    apply(Action.ADD_TO_PARTICIPANTS, h.state, A)
    h.mark_dirty()
    assert h.write() is True
    assert b.sets == 1


@pytest.mark.parametrize("value", [b"\x80\x81 not json", b"[]", b'{"format": "other"}'])
def test_corrupt_stored_state_raises_naming_backend_and_run(store, value):
    store.states[RUN] = (value, 1)
    h = _holder(_backend(store), _settings())
    with pytest.raises(RendezvousStateError) as info:
        h.read()
    msg = str(info.value)
    assert "memory" in msg and RUN in msg


def test_corrupt_mailbox_record_raises(store):
    s = _settings()
    b = _backend(store)
    b.mailbox.post(b"\xff garbage")
    h = _holder(b, s)
    h.read()
    h.mark_dirty()
    with pytest.raises(RendezvousStateError, match=RUN):
        h.write()


# --------------------------------------------------------------------------- completion


def _completing_holder(store, s):
    """A holder whose node A decided MARK_RENDEZVOUS_COMPLETE on a round of EARLY, A and B."""
    b = _backend(store)
    _beat(b, s, EARLY, A, B)
    initial = RendezvousState(participants={EARLY: 0, A: 0, B: 0}, deadline=WALL - 1)
    b.set_state(encode_state(initial))
    h = _holder(b, s, A)
    h.read()
    assert set(h.state.participants) == {EARLY, A, B}
    action = join_op(Context(A, h.state, s, 0.0, WALL), 60.0)
    assert action is Action.MARK_RENDEZVOUS_COMPLETE
    apply(action, h.state, A)
    h.mark_dirty()
    return b, h


def test_completing_write_completes_with_dense_ranks(store):
    s = _settings(min_nodes=2, max_nodes=4)
    b, h = _completing_holder(store, s)
    assert h.write() is True
    state = _stored(store)
    assert state.complete and state.deadline is None and state.world_size == 3
    assert state.participants == {EARLY: 0, A: 1, B: 2}


def test_completing_write_that_drops_a_dead_node_keeps_ranks_dense(store):
    # The round is decided complete on a view where EARLY (rank 0) is alive; EARLY's liveness lapses
    # before the write. The stored complete round must still rank its members 0..n-1, or a node
    # gets a rank >= world_size.
    s = _settings(min_nodes=2, max_nodes=4, keep_alive_interval=0.05)
    b, h = _completing_holder(store, s)
    b.liveness.forget(EARLY.key)
    time.sleep(0.06)  # the holder's cached 'alive' answer about EARLY goes stale
    assert h.write() is True
    state = _stored(store)
    assert state.complete and state.world_size == 2
    assert state.participants == {A: 0, B: 1}


def test_completing_write_that_folds_a_leave_keeps_ranks_dense(store):
    # EARLY took back its join of round 0 (its join timed out) just before A's completing write.
    s = _settings(min_nodes=2, max_nodes=4)
    b, h = _completing_holder(store, s)
    b.mailbox.post(encode_leave(EARLY, 0, False))
    assert h.write() is True
    state = _stored(store)
    assert state.complete and state.world_size == 2
    assert state.participants == {A: 0, B: 1}
    assert state.cursor == 1


def test_completing_write_never_forms_a_group_below_min_nodes(store):
    # min_nodes 3: EARLY, A and B are enough when A decides to complete; EARLY's liveness lapses
    # before A's write. Torch never completes a round with fewer than min_nodes participants.
    s = _settings(min_nodes=3, max_nodes=4, keep_alive_interval=0.05)
    b, h = _completing_holder(store, s)
    b.liveness.forget(EARLY.key)
    time.sleep(0.06)
    assert h.write() is True
    state = _stored(store)
    assert state == RendezvousState(participants={A: 0, B: 0}), state  # open, and no last call


def test_fold_to_max_with_a_dead_node_stays_open_in_its_last_call(store):
    """Bug: a write whose fold brought the round to ``max_nodes`` completed it in the fold; the same
    write then dropped a dead node, and the old holder wrote the round complete (re-ranked) with
    fewer than ``max_nodes`` participants, before any last call. Now the write settles after the
    drop: the round stays open, its last call started."""
    s = _settings(min_nodes=2, max_nodes=3, last_call_timeout=30)
    b = _backend(store)
    _beat(b, s, A, B, C)
    b.set_state(encode_state(RendezvousState(participants={A: 0})))
    h = _holder(b, s, B)
    h.read()
    for n in (B, C):
        b.mailbox.post(encode_join(n))
    b.liveness.forget(A.key)  # A died; its join was folded long ago
    h.refresh_liveness()
    h.mark_dirty()
    assert h.write() is True
    state = _stored(store)
    assert not state.complete and state.world_size == 0
    assert state.participants == {B: 0, C: 0}
    assert state.deadline == WALL + 30
    assert state.cursor == 2


def test_read_of_a_complete_round_keeps_the_world_size(store):
    # A member whose liveness lapsed after completion must not shrink the world size other members
    # compute from their own reads: they would disagree and hang their trainers.
    s = _settings(min_nodes=2, max_nodes=3)
    b = _backend(store)
    _beat(b, s, A, B, C)
    complete = RendezvousState(complete=True, participants={A: 0, B: 1, C: 2}, world_size=3)
    b.set_state(encode_state(complete))
    b.liveness.forget(C.key)
    h = _holder(b, s, B)
    h.read()
    assert C not in h.state.participants  # dropped locally...
    assert h.state.world_size == 3 and h.state.complete  # ...but the group's size stands
    assert h.state.participants == {A: 0, B: 1}


# --------------------------------------------------------------------------- announcements, fencing


def _records(backend):
    return [decode_announcement(r.data) for r in backend.mailbox.read(0)]


def test_announce_posts_once_per_round_and_action(store):
    s = _settings()
    b = _backend(store)
    h = _holder(b, s, A)
    h.read()
    h.announce(Action.ADD_TO_PARTICIPANTS)
    h.announce(Action.ADD_TO_PARTICIPANTS)  # still pending: not posted twice
    assert [(a.kind, a.node) for a in _records(b)] == [("join", A)]
    h.announce(Action.ADD_TO_WAIT_LIST)  # all joins are one record kind, but a new decision posts
    assert len(_records(b)) == 2


def test_leave_names_the_round_and_whether_it_was_complete(store):
    s = _settings(min_nodes=1, max_nodes=2)
    b = _backend(store)
    _beat(b, s, A, B)
    b.set_state(encode_state(RendezvousState(round=3, participants={A: 0, B: 0}, deadline=WALL + 9)))
    h = _holder(b, s, A)
    h.read()
    h.announce(Action.REMOVE_FROM_PARTICIPANTS)
    complete = RendezvousState(round=5, complete=True, participants={A: 0, B: 1}, world_size=2)
    b.set_state(encode_state(complete), store.states[RUN][1])
    h.read()
    h.announce(Action.REMOVE_FROM_PARTICIPANTS)  # another round: a new announcement
    leaves = _records(b)
    assert [(a.kind, a.node, a.round, a.complete) for a in leaves] == [
        ("leave", A, 3, False),
        ("leave", A, 5, True),
    ]


def test_own_write_folds_the_announcement_and_nothing_is_withdrawn(store):
    s = _settings()
    b = _backend(store)
    _beat(b, s, A)
    h = _holder(b, s, A)
    h.read()
    h.announce(Action.ADD_TO_PARTICIPANTS)
    assert h.await_fold() is False  # first in line: it folds at once
    assert h.write() is True
    assert A in h.state.participants
    h.withdraw()
    assert store.withdrawn == set()
    # A later announcement of the same round and action is posted afresh.
    h.announce(Action.ADD_TO_PARTICIPANTS)
    assert len(b.mailbox.read(0)) == 2


def test_announcement_folded_by_another_node_is_not_withdrawn(store):
    s = _settings()
    b1, b2 = _backend(store), _backend(store)
    _beat(b1, s, A, B)
    mine, other = _holder(b1, s, A), _holder(b2, s, B)
    mine.read()
    other.read()
    mine.announce(Action.ADD_TO_PARTICIPANTS)
    other.mark_dirty()
    assert other.write() is True  # B's write folded A's join
    mine.read()  # A reads it
    assert A in mine.state.participants
    mine.withdraw()
    assert store.withdrawn == set()


def test_withdrawn_announcement_is_never_folded(store):
    s = _settings()
    b1, b2 = _backend(store), _backend(store)
    _beat(b1, s, A, B)
    mine, other = _holder(b1, s, A), _holder(b2, s, B)
    mine.read()
    mine.announce(Action.ADD_TO_PARTICIPANTS)
    mine.withdraw()
    assert b2.mailbox.read(0) == []
    other.read()
    other.mark_dirty()
    assert other.write() is True
    assert _stored(store).participants == {}
    mine.withdraw()  # nothing pending: nothing more to take back
    assert len(store.withdrawn) == 1


def test_write_that_read_a_withdrawn_join_does_not_land(store):
    """Bug: a node whose join op gave up (timed out) left its join in the mailbox, and a write
    that had read it placed the node anyway, though it was gone. Now the node withdraws its join;
    a write that folded the join before the withdrawal is fenced on it and fails, and the retry
    (which no longer sees the join) lands without the node."""
    s = _settings()
    b1, b2 = _backend(store), _backend(store)
    _beat(b1, s, A, B, C)
    b1.set_state(encode_state(RendezvousState()))
    before = store.states[RUN]
    folder, quitter = _holder(b1, s, A), _holder(b2, s, B)
    folder.read()
    quitter.read()
    b1.mailbox.post(encode_join(C))
    quitter.announce(Action.ADD_TO_PARTICIPANTS)
    b1.mailbox.post(encode_join(D))
    _beat(b1, s, D)
    # The folder reads the mailbox (C, B, D), and B withdraws before the folder's write.
    b1.before_set = quitter.withdraw
    folder.mark_dirty()
    assert folder.write() is False
    assert b1.fences[-1] == [1, 2, 3]  # C, B, D
    assert store.states[RUN] == before  # nothing landed
    assert folder.state == RendezvousState() and folder.token == before[1]
    folder.mark_dirty()
    assert folder.write() is True
    state = _stored(store)
    assert set(state.participants) == {C, D}
    assert state.cursor == 3  # past B's withdrawn record: it is never folded later
    assert b1.fences[-1] == [1, 3]


# --------------------------------------------------------------------------- a write that raised



def _raise_once(backend):
    def unreachable():
        raise RendezvousConnectionError("the request timed out")

    backend.before_set = unreachable


def test_write_retried_after_an_error_is_still_fenced_on_what_it_folded(store):
    s = _settings()
    b1, b2 = _backend(store), _backend(store)
    _beat(b1, s, A, B)
    b1.set_state(encode_state(RendezvousState()))
    folder, quitter = _holder(b1, s, A), _holder(b2, s, B)
    folder.read()
    quitter.read()
    quitter.announce(Action.ADD_TO_PARTICIPANTS)
    _raise_once(b1)
    folder.mark_dirty()
    with pytest.raises(RendezvousConnectionError):
        folder.write()  # it folded B's join, then its request failed
    quitter.withdraw()  # B gives up
    folder.mark_dirty()
    assert not folder.has_changes  # a change marked on what the failed write left is never written
    folder.read()
    folder.mark_dirty()
    assert folder.write() is True
    assert B not in _stored(store).nodes()


def test_completion_retried_after_an_error_keeps_ranks_dense(store):
    s = _settings(min_nodes=1, max_nodes=4, keep_alive_interval=0.05)
    b = _backend(store)
    _beat(b, s, EARLY, A)
    b.set_state(encode_state(RendezvousState(participants={EARLY: 0, A: 0}, deadline=WALL - 1)))
    h = _holder(b, s, A)
    h.read()
    _raise_once(b)
    h.mark_dirty()
    with pytest.raises(RendezvousConnectionError):
        h.write()  # completed the round locally (ranks EARLY 0, A 1); the write failed
    b.liveness.forget(EARLY.key)
    time.sleep(0.06)
    h.read()  # the failed write left nothing behind: this reads the stored, open round
    assert not h.state.complete
    h.mark_dirty()  # the node decides to complete again
    h.write()
    state = _stored(store)
    assert state.complete
    assert sorted(state.participants.values()) == list(range(state.world_size)), state


class EarlyWakeBackend(CountingBackend):
    """A backend whose change notification returns after at most ``cap`` seconds of ``clock``
    time, as the contract allows (the etcd backend's waits end after a second at most)."""

    def __init__(self, store, cap: float) -> None:
        super().__init__(store, RUN)
        self.cap = cap
        self.waits: list[float] = []

    def wait_for_change(self, token, timeout):
        self.waits.append(timeout)
        self._store.clock.advance(min(timeout, self.cap))


def test_a_node_behind_in_line_waits_its_whole_turn_through_early_wake_ups(store, clock):
    """A node third in line must leave the fold to the two ahead of it for its whole fallback
    delay, however often the backend's wait returns early. A wait that ended after a second let
    every node in line write at once (a stampede of writes at N = 1024)."""
    from rdzv_common import holder as holder_module

    s = _settings(min_nodes=4, max_nodes=4)
    ahead = _backend(store)
    _beat(ahead, s, A, B, C)
    for node in (A, B):
        h = _holder(ahead, s, node)
        h.read()
        h.announce(Action.ADD_TO_PARTICIPANTS)  # posted, never folded: A and B are stalled
    b = EarlyWakeBackend(store, cap=0.1)
    h = StateHolder(b, s, C, wall_clock=lambda: WALL, clock=clock)
    h.read()
    h.announce(Action.ADD_TO_PARTICIPANTS)
    started = clock()
    assert h.await_fold() is False  # nobody folded: C steps in, but only once its turn came
    least = (holder_module.FOLD_FALLBACK_FIRST + 2 * holder_module.FOLD_FALLBACK_STEP) * 0.9
    assert clock() - started >= least
    assert b.sets == 0 and len(b.waits) > 1
