"""StateHolder: compare-and-set sync, mailbox folding, dead-node removal and the monitor cache."""

from __future__ import annotations

import time

import pytest
from torch.distributed.elastic.rendezvous import RendezvousStateError

from rdzv_common.codec import decode_state, encode_join, encode_state
from rdzv_common.holder import StateHolder
from rdzv_common.memory import MemoryBackend, MemoryStore
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


class CountingBackend(MemoryBackend):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.gets = 0
        self.sets = 0

    def get_state(self):
        self.gets += 1
        return super().get_state()

    def set_state(self, state, token=None):
        self.sets += 1
        return super().set_state(state, token)


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


def _backend(store, mailbox=True) -> CountingBackend:
    return CountingBackend(store, RUN, use_mailbox=mailbox)


def _stored(store) -> RendezvousState:
    return decode_state(store.states[RUN][0])


def _beat(backend, settings, *nodes):
    for n in nodes:
        backend.liveness.beat(n.key, settings.liveness_ttl)


def test_read_of_an_absent_state_is_the_empty_state(store):
    h = StateHolder(_backend(store), _settings())
    assert h.sync() is None
    assert h.state == RendezvousState() and h.token is None


@pytest.mark.parametrize("mailbox", [True, False])
def test_write_then_read_back(store, mailbox):
    s = _settings()
    b1, b2 = _backend(store, mailbox), _backend(store, mailbox)
    _beat(b1, s, A)
    h1, h2 = StateHolder(b1, s), StateHolder(b2, s)
    h1.sync()
    apply(Action.ADD_TO_PARTICIPANTS, h1.state, A, s)
    h1.mark_dirty()
    assert h1.sync() is True
    assert h1.writes == 1 and h1.failed_writes == 0
    assert h1.token is not None
    assert h2.sync() is None
    assert h2.state.participants == {A: 0}
    assert h2.token == h1.token
    assert _stored(store).participants == {A: 0}


def test_a_clean_sync_does_not_write(store):
    s = _settings()
    b = _backend(store)
    h = StateHolder(b, s)
    h.sync()
    h.sync()
    assert b.sets == 0 and b.gets == 2


@pytest.mark.parametrize("mailbox", [True, False])
def test_lost_race_leaves_the_winners_state(store, mailbox):
    s = _settings()
    b1, b2 = _backend(store, mailbox), _backend(store, mailbox)
    _beat(b1, s, A, B)
    h1, h2 = StateHolder(b1, s), StateHolder(b2, s)
    h1.sync()
    h2.sync()
    apply(Action.ADD_TO_PARTICIPANTS, h1.state, A, s)
    h1.mark_dirty()
    assert h1.sync() is True
    winner = encode_state(h1.state)

    apply(Action.ADD_TO_PARTICIPANTS, h2.state, B, s)  # decided on a stale view
    h2.mark_dirty()
    assert h2.sync() is False
    assert h2.failed_writes == 1 and h2.writes == 1
    assert encode_state(h2.state) == winner
    assert B not in h2.state.participants
    assert h2.token == h1.token
    assert store.states[RUN][0] == winner
    # The loser decides again from the winner's state and wins this time.
    apply(Action.ADD_TO_PARTICIPANTS, h2.state, B, s)
    h2.mark_dirty()
    assert h2.sync() is True
    assert set(_stored(store).participants) == {A, B}


def test_mailbox_folding_admits_several_joins_in_one_write(store):
    s = _settings(min_nodes=2, max_nodes=4)
    b = _backend(store)
    joiners = [A, B, C]
    _beat(b, s, *joiners)
    for n in joiners:
        b.mailbox.post(encode_join(n))
    writes_before = store.writes
    h = StateHolder(b, s)
    h.sync()
    assert h.state.participants == {}  # announcements are not state until folded
    h.mark_dirty()
    assert h.sync() is True
    state = _stored(store)
    assert set(state.participants) == set(joiners)
    assert state.cursor == 3
    assert state.deadline is not None  # reached min_nodes through folding
    assert store.writes - writes_before == 1  # one state write admitted all three
    assert b.sets == 1

    # A fourth join fills the round: completion happens in the fold, with sorted ranks.
    b.mailbox.post(encode_join(D))
    _beat(b, s, D)
    h.mark_dirty()
    assert h.sync() is True
    state = _stored(store)
    assert state.cursor == 4 and state.complete
    assert state.participants == {n: r for r, n in enumerate(sorted([A, B, C, D]))}


def test_folded_joins_apply_exactly_once(store):
    s = _settings(min_nodes=1, max_nodes=2)
    b1, b2 = _backend(store), _backend(store)
    _beat(b1, s, A, B, C)
    for n in (A, B):
        b1.mailbox.post(encode_join(n))
    h1, h2 = StateHolder(b1, s), StateHolder(b2, s)
    h1.sync()
    h1.mark_dirty()
    assert h1.sync() is True
    assert _stored(store).complete
    # Another writer starting from the stored cursor must not fold A and B again.
    b2.mailbox.post(encode_join(C))
    h2.sync()
    h2.mark_dirty()
    assert h2.sync() is True
    state = _stored(store)
    assert state.cursor == 3
    assert set(state.participants) == {A, B} and state.redundancy_list == {C}


def test_a_lost_write_does_not_consume_the_mailbox(store):
    s = _settings(min_nodes=2, max_nodes=4)
    b1, b2 = _backend(store), _backend(store)
    _beat(b1, s, A, B)
    h1, h2 = StateHolder(b1, s), StateHolder(b2, s)
    h1.sync()
    h2.sync()
    h1.mark_dirty()
    h1.sync()  # writes cursor 0, moves the token
    b2.mailbox.post(encode_join(B))
    h2.mark_dirty()
    assert h2.sync() is False  # its fold of B is discarded with its stale state
    assert _stored(store).cursor == 0 and not _stored(store).participants
    h1.mark_dirty()
    assert h1.sync() is True
    assert set(_stored(store).participants) == {B} and _stored(store).cursor == 1


def test_dead_node_is_dropped_via_liveness(store, clock):
    s = _settings(min_nodes=2, max_nodes=4)
    b = _backend(store)
    _beat(b, s, A, B, C)
    initial = RendezvousState(participants={A: 0, B: 0, C: 0}, wait_list={D}, deadline=time.time() + 60)
    b.set_state(encode_state(initial))
    h = StateHolder(b, s)
    h.sync()
    assert set(h.state.participants) == {A, B, C} and h.state.wait_list == set()  # D never beat

    clock.advance(s.liveness_ttl + 0.5)
    _beat(b, s, A, B)  # C stops beating
    fresh = StateHolder(b, s)  # no cached answer about C
    fresh.sync()
    assert set(fresh.state.participants) == {A, B}
    # A read only drops locally; the drop is written by the next write.
    assert set(_stored(store).participants) == {A, B, C}
    fresh.mark_dirty()
    assert fresh.sync() is True
    state = _stored(store)
    assert set(state.participants) == {A, B}
    assert state.deadline is not None  # still at min_nodes

    clock.advance(s.liveness_ttl + 0.5)
    _beat(b, s, A)
    fresh = StateHolder(b, s)
    fresh.sync()
    fresh.mark_dirty()
    assert fresh.sync() is True
    state = _stored(store)
    assert set(state.participants) == {A}
    assert state.deadline is None  # fell below min_nodes


def test_forgotten_node_is_dropped_from_every_list(store):
    s = _settings(min_nodes=1, max_nodes=2)
    b = _backend(store)
    _beat(b, s, A, B, C, D)
    initial = RendezvousState(
        round=3, complete=True, participants={A: 0, B: 1}, wait_list={C}, redundancy_list={D}
    )
    if hasattr(initial, "world_size"):
        initial.world_size = 2
    b.set_state(encode_state(initial))
    for n in (A, B, C, D):
        b.liveness.forget(n.key)
    h = StateHolder(b, s)
    h.mark_dirty()
    h._state = decode_state(store.states[RUN][0])
    h._token = store.states[RUN][1]
    assert h.sync() is True
    state = _stored(store)
    assert state.nodes() == set()
    assert state.round == 4 and not state.complete  # the emptied complete round advanced


def test_monitor_cache_skips_a_read(store):
    s = _settings()
    b = _backend(store)
    h = StateHolder(b, s)
    h.sync()
    assert b.gets == 1
    other = StateHolder(_backend(store), s)
    _beat(b, s, A)
    other.sync()
    apply(Action.ADD_TO_PARTICIPANTS, other.state, A, s)
    other.mark_dirty()
    other.sync()

    assert h.sync(max_age=60) is None
    assert b.gets == 1  # skipped: the cached view is young enough
    assert h.state.participants == {}  # and therefore stale
    assert h.sync(max_age=0) is None
    assert b.gets == 2
    assert h.state.participants == {A: 0}


def test_monitor_cache_expires(store):
    s = _settings()
    b = _backend(store)
    h = StateHolder(b, s)
    h.sync()
    time.sleep(0.06)
    h.sync(max_age=0.05)
    assert b.gets == 2


def test_dirty_state_is_written_despite_max_age(store):
    s = _settings()
    b = _backend(store)
    _beat(b, s, A)
    h = StateHolder(b, s)
    h.sync()
    apply(Action.ADD_TO_PARTICIPANTS, h.state, A, s)
    h.mark_dirty()
    assert h.sync(max_age=60) is True
    assert b.sets == 1


@pytest.mark.parametrize("value", [b"\x80\x81 not json", b"[]", b'{"format": "other"}'])
def test_corrupt_stored_state_raises_naming_backend_and_run(store, value):
    store.states[RUN] = (value, 1)
    h = StateHolder(_backend(store), _settings())
    with pytest.raises(RendezvousStateError) as info:
        h.sync()
    msg = str(info.value)
    assert "memory" in msg and RUN in msg


def test_corrupt_mailbox_record_raises(store):
    s = _settings()
    b = _backend(store)
    b.mailbox.post(b"\xff garbage")
    h = StateHolder(b, s)
    h.sync()
    h.mark_dirty()
    with pytest.raises(RendezvousStateError, match=RUN):
        h.sync()


# --------------------------------------------------------------------------- completion


def _completing_holder(store, s):
    """A holder whose node decided MARK_RENDEZVOUS_COMPLETE on a round of EARLY, A and B."""
    b = _backend(store)
    _beat(b, s, EARLY, A, B)
    initial = RendezvousState(participants={EARLY: 0, A: 0, B: 0}, deadline=time.time() - 1)
    b.set_state(encode_state(initial))
    h = StateHolder(b, s)
    h.sync()
    assert set(h.state.participants) == {EARLY, A, B}
    action = join_op(Context(A, h.state, s), time.monotonic() + 60)
    assert action is Action.MARK_RENDEZVOUS_COMPLETE
    apply(action, h.state, A, s)
    h.mark_dirty()
    return b, h


def test_completing_write_that_drops_a_dead_node_keeps_ranks_dense(store):
    # The round is decided complete on a view where EARLY (rank 0) is alive; EARLY's liveness lapses
    # before the write. The stored complete round must still rank its members 0..n-1, or a node
    # gets a rank >= world_size (world_size is len(participants)).
    s = _settings(min_nodes=2, max_nodes=4, keep_alive_interval=0.05)
    b, h = _completing_holder(store, s)
    b.liveness.forget(EARLY.key)
    time.sleep(0.06)  # the holder's cached 'alive' answer about EARLY goes stale
    h.sync()
    state = _stored(store)
    if state.complete:
        world = len(state.participants)
        assert sorted(state.participants.values()) == list(range(world)), state.participants
        assert world >= s.min_nodes


def test_completing_write_that_folds_a_leave_keeps_ranks_dense(store):
    # EARLY announced leaving round 0 (its join timed out) just before A's completing write.
    from rdzv_common import codec

    if not hasattr(codec, "encode_leave"):
        pytest.skip("this release has no leave announcements")
    s = _settings(min_nodes=2, max_nodes=4)
    b, h = _completing_holder(store, s)
    b.mailbox.post(codec.encode_leave(EARLY, 0))
    h.sync()
    state = _stored(store)
    assert EARLY not in state.participants
    if state.complete:
        world = len(state.participants)
        assert sorted(state.participants.values()) == list(range(world)), state.participants


def test_completing_write_never_forms_a_group_below_min_nodes(store):
    # min_nodes 3: EARLY, A and B are enough when A decides to complete; EARLY's liveness lapses
    # before A's write. Torch never completes a round with fewer than min_nodes participants.
    s = _settings(min_nodes=3, max_nodes=4, keep_alive_interval=0.05)
    b, h = _completing_holder(store, s)
    b.liveness.forget(EARLY.key)
    time.sleep(0.06)
    h.sync()
    state = _stored(store)
    assert EARLY not in state.participants
    assert not state.complete or len(state.participants) >= s.min_nodes, state


def test_read_of_a_complete_round_keeps_the_world_size(store):
    # A member whose liveness lapsed after completion must not shrink the world size other members
    # compute from their own reads: they would disagree and hang their trainers.
    s = _settings(min_nodes=2, max_nodes=3)
    b = _backend(store)
    _beat(b, s, A, B, C)
    complete = RendezvousState(complete=True, participants={A: 0, B: 1, C: 2})
    if hasattr(complete, "world_size"):
        complete.world_size = 3
    b.set_state(encode_state(complete))
    b.liveness.forget(C.key)
    try:
        h = StateHolder(b, s, B)
    except TypeError:  # a release whose holder does not know its node
        h = StateHolder(b, s)
    h.sync()
    world = getattr(h.state, "world_size", None) or len(h.state.participants)
    assert world == 3
    assert h.state.participants[B] == 1
