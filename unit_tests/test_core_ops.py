"""Operation decisions (join, exit, close), the transitions they ask for, the completion rule
(``settle``) and folding announcements (``fold``).

Decisions are pure: every test hands the time in through the ``Context`` (``now``: monotonic,
``wall``: UNIX), so none depends on the clock of the machine that runs it.
"""

from __future__ import annotations

import copy
import itertools
import logging
import time

import pytest
from torch.distributed.elastic.rendezvous import RendezvousGracefulExitError

from rdzv_common import ops
from rdzv_common.codec import MembershipChange
from rdzv_common.ops import (
    ADD_ACTIONS,
    ANNOUNCED_ACTIONS,
    COMPLETE_RANKS,
    COMPLETE_STEP,
    ROLLBACK_PERIOD,
    Action,
    Context,
    apply,
    close_op,
    completion_due,
    exit_op,
    fold,
    join_op,
    rejoin_op,
    settle,
    waits_for_members,
    waits_for_next_round,
    would_fold,
)
from rdzv_common.settings import RendezvousSettings
from rdzv_common.state import NodeDesc, RendezvousState

N = [NodeDesc("10.0.0.1", 100 + i, i % 2) for i in range(8)]
ME = NodeDesc("10.0.0.9", 9, 0)

# The time every decision below is taken at: far from the clock of the machine running the tests,
# so a decision that read the real clock instead of its context would come out differently.
NOW = 1_000.0  # monotonic
WALL = 1_000_000.0  # UNIX


def _settings(min_nodes=2, max_nodes=3, **kw) -> RendezvousSettings:
    kw.setdefault("last_call_timeout", 0.2)
    return RendezvousSettings("ops-run", min_nodes, max_nodes, **kw)


def _ctx(state, settings=None, node=ME, due=False, now=NOW, wall=WALL) -> Context:
    return Context(node, state, settings or _settings(), now, wall, keep_alive_due=due)


def _future() -> float:
    return NOW + 60


def _past(by: float = 1.0) -> float:
    return NOW - by


def _join(state, settings=None, node=ME, due=False, deadline=None, wall=WALL) -> Action:
    return join_op(_ctx(state, settings, node, due, wall=wall), _future() if deadline is None else deadline)


def _complete(members, round=0) -> RendezvousState:
    state = RendezvousState(
        round=round, complete=True, participants={n: r for r, n in enumerate(sorted(members))}
    )
    state.world_size = len(state.participants)
    return state


def _leave(node, state, complete=None) -> MembershipChange:
    """The leave ``node`` posts when it sees ``state`` (or, with ``complete``, a round so marked)."""
    return MembershipChange("leave", node, state.round, state.complete if complete is None else complete)


# --------------------------------------------------------------------------- join_op


def test_join_closed_is_error_closed():
    for state in [
        RendezvousState(closed=True),
        RendezvousState(closed=True, wait_list={ME}),
        RendezvousState(closed=True, participants={ME: 0}, complete=True),
    ]:
        assert _join(state) is Action.ERROR_CLOSED


def test_join_closed_while_redundant_is_a_graceful_exit():
    state = _complete(N[:3])
    state.closed = True
    state.redundancy_list = {ME}
    with pytest.raises(RendezvousGracefulExitError, match="ops-run"):
        _join(state)


@pytest.mark.parametrize("due, expected", [(False, Action.SYNC), (True, Action.KEEP_ALIVE)])
def test_redundant_with_full_round_waits(due, expected):
    state = _complete(N[:3])
    state.redundancy_list = {ME}
    assert _join(state, due=due) is expected


def test_redundant_ignores_the_join_deadline():
    state = _complete(N[:3])
    state.redundancy_list = {ME}
    assert _join(state, deadline=_past(ROLLBACK_PERIOD + 10)) is Action.SYNC


def test_redundant_with_room_leaves_the_redundancy_list():
    state = _complete(N[:2])  # one place free (max 3)
    state.redundancy_list = {ME}
    assert _join(state) is Action.REMOVE_FROM_REDUNDANCY_LIST
    state = RendezvousState(round=4, redundancy_list={ME})  # a fresh, empty round
    assert _join(state) is Action.REMOVE_FROM_REDUNDANCY_LIST


def test_complete_participant_finishes():
    state = _complete([ME, N[0]])
    assert _join(state) is Action.FINISH
    # Even past its deadline: it already has its rank.
    assert _join(state, deadline=_past(ROLLBACK_PERIOD + 10)) is Action.FINISH


def test_deadline_passed_within_rollback_participant_backs_out():
    state = RendezvousState(participants={ME: 0})
    assert _join(state, deadline=_past(0.5)) is Action.REMOVE_FROM_PARTICIPANTS
    # The deadline itself is still in time; the rollback period's end is still a rollback.
    assert _join(state, deadline=NOW) is Action.SYNC
    assert _join(state, deadline=_past(ROLLBACK_PERIOD)) is Action.REMOVE_FROM_PARTICIPANTS
    assert _join(state, deadline=_past(ROLLBACK_PERIOD + 0.001)) is Action.ERROR_TIMEOUT


def test_deadline_passed_within_rollback_waiter_backs_out():
    state = _complete(N[:2])
    state.wait_list = {ME}
    assert _join(state, deadline=_past(0.5)) is Action.REMOVE_FROM_WAIT_LIST


def test_deadline_passed_not_placed_is_timeout():
    assert _join(RendezvousState(), deadline=_past(0.5)) is Action.ERROR_TIMEOUT


@pytest.mark.parametrize("where", ["participants", "wait_list", "nowhere"])
def test_deadline_past_rollback_is_timeout(where):
    state = RendezvousState()
    if where == "participants":
        state.participants[ME] = 0
    elif where == "wait_list":
        state = _complete(N[:2])
        state.wait_list = {ME}
    assert _join(state, deadline=_past(ROLLBACK_PERIOD + 1)) is Action.ERROR_TIMEOUT


def test_complete_round_with_room_adds_to_wait_list():
    state = _complete(N[:2])
    assert _join(state) is Action.ADD_TO_WAIT_LIST


@pytest.mark.parametrize("due, expected", [(False, Action.SYNC), (True, Action.KEEP_ALIVE)])
def test_already_waiting_syncs(due, expected):
    state = _complete(N[:2])
    state.wait_list = {ME}
    assert _join(state, due=due) is expected


def test_full_complete_round_adds_to_redundancy_list():
    state = _complete(N[:3])
    assert _join(state) is Action.ADD_TO_REDUNDANCY_LIST


def test_waiter_of_a_round_that_filled_stays_waiting():
    state = _complete(N[:3])
    state.wait_list = {ME}
    assert _join(state) is Action.SYNC


@pytest.mark.parametrize("others", [0, 1, 2])
def test_incomplete_round_adds_to_participants(others):
    state = RendezvousState(participants={n: 0 for n in N[:others]})
    assert _join(state) is Action.ADD_TO_PARTICIPANTS
    # From the wait list too, once the round it waited for has started.
    state.wait_list = {ME}
    assert _join(state) is Action.ADD_TO_PARTICIPANTS


def test_participant_past_last_call_with_min_completes():
    state = RendezvousState(participants={ME: 0, N[0]: 0}, deadline=WALL - 0.01)
    assert _join(state) is Action.MARK_RENDEZVOUS_COMPLETE
    # The last call is judged by the context's wall time, not by the machine's clock.
    assert _join(state, wall=WALL - 1) is Action.SYNC


@pytest.mark.parametrize("due, expected", [(False, Action.SYNC), (True, Action.KEEP_ALIVE)])
def test_participant_before_last_call_waits(due, expected):
    state = RendezvousState(participants={ME: 0, N[0]: 0}, deadline=WALL + 30)
    assert _join(state, due=due) is expected
    assert _join(state, due=due, wall=WALL + 31) is Action.MARK_RENDEZVOUS_COMPLETE


def test_participants_ask_to_complete_the_round_one_after_another():
    """Past the last call the participant k-th in the state's order asks COMPLETE_STEP * k later,
    so that a large round is completed by one write instead of a write by every participant."""
    others = N[:6]
    state = RendezvousState(participants=dict.fromkeys([*others[:3], ME, *others[3:]], 0), deadline=WALL - 0.01)
    assert completion_due(state, others[0]) == state.deadline
    assert completion_due(state, ME) == state.deadline + 3 * COMPLETE_STEP
    assert _join(state, node=others[0]) is Action.MARK_RENDEZVOUS_COMPLETE
    assert _join(state) is Action.SYNC
    assert _join(state, wall=state.deadline + 3 * COMPLETE_STEP + 0.01) is Action.MARK_RENDEZVOUS_COMPLETE
    # The wait stops growing at COMPLETE_RANKS places.
    many = [NodeDesc("10.0.1.1", i, 0) for i in range(COMPLETE_RANKS + 5)]
    state = RendezvousState(participants=dict.fromkeys([*many, ME], 0), deadline=WALL)
    assert completion_due(state, ME) == completion_due(state, many[-1]) == WALL + COMPLETE_RANKS * COMPLETE_STEP
    assert completion_due(RendezvousState(participants={ME: 0}), ME) is None


def test_participant_below_min_waits_even_with_stale_deadline():
    state = RendezvousState(participants={ME: 0}, deadline=WALL - 10)
    assert _join(state) is Action.SYNC
    state = RendezvousState(participants={ME: 0, N[0]: 0}, deadline=None)
    assert _join(state) is Action.SYNC


# --------------------------------------------------------------------------- exit, close


def test_exit_op():
    settings = _settings()
    in_round = _ctx(_complete([ME, N[0]]), settings)
    assert exit_op(in_round, _future()) is Action.REMOVE_FROM_PARTICIPANTS
    assert exit_op(in_round, NOW) is Action.REMOVE_FROM_PARTICIPANTS
    assert exit_op(in_round, _past()) is Action.ERROR_TIMEOUT
    for state in [RendezvousState(), _complete(N[:2]), RendezvousState(wait_list={ME})]:
        assert exit_op(_ctx(state, settings), _future()) is Action.FINISH
        assert exit_op(_ctx(state, settings), _past()) is Action.FINISH


def test_close_op():
    settings = _settings()
    assert close_op(_ctx(RendezvousState(), settings), _future()) is Action.MARK_RENDEZVOUS_CLOSED
    assert close_op(_ctx(RendezvousState(), settings), NOW) is Action.MARK_RENDEZVOUS_CLOSED
    assert close_op(_ctx(RendezvousState(), settings), _past()) is Action.ERROR_TIMEOUT
    assert close_op(_ctx(RendezvousState(closed=True), settings), _future()) is Action.FINISH
    assert close_op(_ctx(RendezvousState(closed=True), settings), _past()) is Action.FINISH


def _decision_grid():
    """(op, context, deadline) over every kind of state a node meets, at several times."""
    s = _settings(min_nodes=2, max_nodes=3, last_call_timeout=5)
    closed_redundant = _complete(N[:3])
    closed_redundant.closed = True
    states = [
        RendezvousState(),
        RendezvousState(participants={ME: 0}),
        RendezvousState(participants={ME: 0, N[0]: 0}, deadline=WALL - 1),
        RendezvousState(participants={ME: 0, N[0]: 0}, deadline=WALL + 1),
        _complete([ME, N[0]]),
        _complete(N[:2]),
        _complete(N[:3]),
        RendezvousState(round=2, wait_list={ME}),
        RendezvousState(closed=True),
    ]
    for state in states:
        for due, deadline in itertools.product([False, True], [NOW + 60, NOW - 1, NOW - ROLLBACK_PERIOD - 1]):
            for op in (join_op, exit_op, close_op):
                yield op, _ctx(copy.deepcopy(state), s, due=due), deadline


def test_decisions_are_pure_and_read_no_clock(monkeypatch, caplog):
    """Bug: the old ops read ``time.monotonic()``/``time.time()`` themselves, so one state could
    give two decisions and no test could pin the time. Now the same context (with its ``now`` and
    ``wall``) gives the same action every time, without a clock read, and leaves the state alone."""
    caplog.set_level(logging.WARNING, logger=ops.__name__)  # a log record would read the clock

    def no_clock():
        raise AssertionError("an operation read the clock")

    grid = list(_decision_grid())
    monkeypatch.setattr(time, "monotonic", no_clock)
    monkeypatch.setattr(time, "time", no_clock)
    answers = []
    for op, ctx, deadline in grid:
        before = copy.deepcopy(ctx.state)
        try:
            first = op(ctx, deadline)
            second = op(ctx, deadline)
        except RendezvousGracefulExitError:
            first = second = "graceful-exit"
        assert first == second
        assert ctx.state == before, (op.__name__, before)
        answers.append(first)
    monkeypatch.undo()
    # The grid must have exercised the clock-dependent branches, or "no clock read" means little.
    assert {Action.ERROR_TIMEOUT, Action.MARK_RENDEZVOUS_COMPLETE, Action.REMOVE_FROM_PARTICIPANTS} <= set(answers)


def test_decisions_depend_on_the_context_time_alone():
    """The same state and deadline give a different answer only when the context's time moves."""
    state = RendezvousState(participants={ME: 0, N[0]: 0}, deadline=WALL + 1)
    s = _settings()
    at = lambda now, wall: join_op(Context(ME, state, s, now, wall), NOW + 10)  # noqa: E731
    assert at(NOW, WALL) is Action.SYNC
    assert at(NOW, WALL + 2) is Action.MARK_RENDEZVOUS_COMPLETE
    assert at(NOW + 11, WALL) is Action.REMOVE_FROM_PARTICIPANTS
    assert at(NOW + 11 + ROLLBACK_PERIOD, WALL) is Action.ERROR_TIMEOUT


# --------------------------------------------------------------------------- apply


def test_add_to_participants_neither_sets_a_deadline_nor_completes():
    # Completion is settle's alone: apply only moves the node.
    members = [N[5], N[2], N[7], N[0]]
    state = RendezvousState(wait_list={N[0]}, redundancy_list={N[7]})
    for n in members:
        apply(Action.ADD_TO_PARTICIPANTS, state, n)
    assert state == RendezvousState(participants=dict.fromkeys(members, 0))


def test_add_to_participants_takes_the_node_off_other_lists():
    state = RendezvousState(wait_list={ME, N[1]}, redundancy_list={N[2]})
    apply(Action.ADD_TO_PARTICIPANTS, state, ME)
    assert ME in state.participants and state.wait_list == {N[1]} and state.redundancy_list == {N[2]}
    state = RendezvousState(redundancy_list={ME, N[2]})
    apply(Action.ADD_TO_PARTICIPANTS, state, ME)
    assert ME in state.participants and state.redundancy_list == {N[2]}


def test_add_to_wait_list_and_redundancy_list():
    state = _complete(N[:3])
    apply(Action.ADD_TO_REDUNDANCY_LIST, state, ME)
    assert state.redundancy_list == {ME}
    apply(Action.ADD_TO_WAIT_LIST, state, ME)
    assert state.wait_list == {ME} and state.redundancy_list == set()
    apply(Action.REMOVE_FROM_WAIT_LIST, state, ME)
    assert state.wait_list == set()
    apply(Action.ADD_TO_REDUNDANCY_LIST, state, ME)
    apply(Action.REMOVE_FROM_REDUNDANCY_LIST, state, ME)
    assert state.redundancy_list == set()
    assert state == _complete(N[:3])


def test_remove_from_participants_leaves_the_deadline_to_settle():
    state = RendezvousState(participants={N[0]: 0, N[1]: 0}, deadline=WALL + 5)
    apply(Action.REMOVE_FROM_PARTICIPANTS, state, N[1])
    assert state == RendezvousState(participants={N[0]: 0}, deadline=WALL + 5)


def test_complete_round_keeps_ranks_until_it_empties_then_advances():
    s = _settings(min_nodes=2, max_nodes=3)
    state = _complete(N[:3], round=5)
    state.wait_list = {ME}
    ranks = dict(state.participants)
    apply(Action.REMOVE_FROM_PARTICIPANTS, state, N[0])
    assert state.complete and state.round == 5 and state.world_size == 3
    assert state.participants == {n: ranks[n] for n in N[1:3]}  # survivors keep their ranks
    settle(state, s, WALL)  # a complete round keeps its group, whatever it lost
    assert state.complete and state.world_size == 3
    assert state.participants == {n: ranks[n] for n in N[1:3]}
    apply(Action.REMOVE_FROM_PARTICIPANTS, state, N[1])
    apply(Action.REMOVE_FROM_PARTICIPANTS, state, N[2])
    assert state.round == 6 and not state.complete and not state.participants and state.world_size == 0
    assert state.wait_list == {ME}  # the waiters carry over to the next round
    assert _join(state, s) is Action.ADD_TO_PARTICIPANTS


def test_mark_complete_only_asks_for_a_write_and_closed_closes():
    state = RendezvousState(participants={N[3]: 0, N[1]: 0}, deadline=WALL)
    before = copy.deepcopy(state)
    apply(Action.MARK_RENDEZVOUS_COMPLETE, state, N[1])
    assert state == before
    settle(state, _settings(), WALL)
    assert state.complete and state.deadline is None
    assert state.participants == {N[1]: 0, N[3]: 1} and state.world_size == 2
    apply(Action.MARK_RENDEZVOUS_CLOSED, state, N[1])
    assert state.closed


@pytest.mark.parametrize("action", [Action.SYNC, Action.KEEP_ALIVE, Action.FINISH, Action.ERROR_CLOSED, Action.ERROR_TIMEOUT])
def test_apply_refuses_non_state_actions(action):
    with pytest.raises(ValueError):
        apply(action, RendezvousState(), ME)


def test_every_action_is_classified():
    state_changing = {
        Action.ADD_TO_PARTICIPANTS,
        Action.ADD_TO_WAIT_LIST,
        Action.ADD_TO_REDUNDANCY_LIST,
        Action.REMOVE_FROM_PARTICIPANTS,
        Action.REMOVE_FROM_WAIT_LIST,
        Action.REMOVE_FROM_REDUNDANCY_LIST,
        Action.MARK_RENDEZVOUS_COMPLETE,
        Action.MARK_RENDEZVOUS_CLOSED,
    }
    for action in Action:
        state = _complete([ME, N[0]]) if action is Action.REMOVE_FROM_PARTICIPANTS else RendezvousState()
        if action in state_changing:
            apply(action, state, ME)
        else:
            with pytest.raises(ValueError):
                apply(action, state, ME)
    assert ADD_ACTIONS == {Action.ADD_TO_PARTICIPANTS, Action.ADD_TO_WAIT_LIST, Action.ADD_TO_REDUNDANCY_LIST}
    assert ANNOUNCED_ACTIONS == ADD_ACTIONS | {Action.REMOVE_FROM_PARTICIPANTS, Action.REJOIN}


# --------------------------------------------------------------------------- settle


def test_a_round_that_opens_takes_in_its_waiting_nodes_while_it_has_room():
    s = _settings(min_nodes=2, max_nodes=3)
    state = _complete(N[:2], round=4)
    state.wait_list = {N[6], N[5], N[4], N[3]}
    state.redundancy_list = {N[7]}
    for node in N[:2]:
        apply(Action.REMOVE_FROM_PARTICIPANTS, state, node)
    settle(state, s, WALL)
    # The write that opened round 5 placed the first three waiting nodes in node order; the
    # fourth waits on, and a redundant node is left to ask for a place itself.
    assert state.round == 5 and list(state.participants) == [N[3], N[4], N[5]]
    assert state.wait_list == {N[6]} and state.redundancy_list == {N[7]}
    assert state.complete and state.world_size == 3  # max_nodes reached: complete at once
    # A complete round keeps its waiting nodes waiting.
    state = _complete(N[:2])
    state.wait_list = {N[3]}
    settle(state, _settings(min_nodes=2, max_nodes=4), WALL)
    assert state.wait_list == {N[3]} and N[3] not in state.participants


def test_settle_below_min_sets_no_deadline_and_clears_a_stale_one():
    s = _settings(min_nodes=2, max_nodes=3)
    state = RendezvousState(participants={N[0]: 0})
    settle(state, s, WALL)
    assert state == RendezvousState(participants={N[0]: 0})
    state.deadline = WALL - 10  # left over from before a participant dropped out
    settle(state, s, WALL)
    assert state.deadline is None and not state.complete


def test_settle_reaching_min_starts_the_last_call():
    s = _settings(min_nodes=2, max_nodes=3, last_call_timeout=7)
    state = RendezvousState(participants={N[0]: 0, N[1]: 0})
    settle(state, s, WALL)
    assert state.deadline == WALL + 7 and not state.complete
    # A running last call is not restarted by later writes.
    settle(state, s, WALL + 3)
    assert state.deadline == WALL + 7 and not state.complete


def test_settle_at_min_keeps_the_deadline_after_a_participant_leaves():
    s = _settings(min_nodes=2, max_nodes=4)
    state = RendezvousState(participants={N[0]: 0, N[1]: 0, N[2]: 0}, deadline=WALL + 5)
    apply(Action.REMOVE_FROM_PARTICIPANTS, state, N[2])
    settle(state, s, WALL)
    assert state.deadline == WALL + 5 and not state.complete


def test_settle_completes_when_the_last_call_is_over():
    s = _settings(min_nodes=2, max_nodes=4)
    state = RendezvousState(participants={N[3]: 0, N[0]: 0, N[1]: 0}, deadline=WALL + 5)
    settle(state, s, WALL + 4.999)
    assert not state.complete and state.deadline == WALL + 5
    settle(state, s, WALL + 5)
    assert state.complete and state.deadline is None and state.world_size == 3
    assert state.participants == {N[0]: 0, N[1]: 1, N[3]: 2}


def test_settle_reaching_max_completes_at_once_with_sorted_ranks():
    s = _settings(min_nodes=1, max_nodes=4)
    members = [N[5], N[2], N[7], N[0]]
    state = RendezvousState(participants=dict.fromkeys(members, 0), wait_list={N[1]})
    settle(state, s, WALL)
    assert state.complete and state.deadline is None and state.world_size == 4
    assert state.participants == {n: r for r, n in enumerate(sorted(members))}
    assert state.wait_list == {N[1]}


@pytest.mark.parametrize(
    "state",
    [
        _complete(N[:1]),  # complete below min_nodes (members left): it keeps its group
        RendezvousState(closed=True, participants={N[0]: 0, N[1]: 0, N[2]: 0}),
        RendezvousState(closed=True, participants={N[0]: 0, N[1]: 0}, deadline=WALL - 1),
    ],
)
def test_settle_leaves_complete_and_closed_rounds_alone(state):
    before = copy.deepcopy(state)
    settle(state, _settings(min_nodes=2, max_nodes=3), WALL)
    assert state == before


def test_fold_to_max_then_dead_node_dropped_keeps_the_round_open():
    """Bug: the old ``apply`` completed a round the moment a fold brought it to ``max_nodes``; the
    same write then dropped a dead node and wrote the round complete with fewer than ``max_nodes``
    before its last call was over (the holder only re-ranked it). ``settle`` runs after the drop:
    the round stays open, in its last call."""
    s = _settings(min_nodes=2, max_nodes=3, last_call_timeout=30)
    # Below min_nodes before the write: the last call starts with it.
    state = RendezvousState(participants={N[0]: 0})
    assert fold(state, MembershipChange("join", N[1]), s)
    assert fold(state, MembershipChange("join", N[2]), s)
    assert len(state.participants) == s.max_nodes and not state.complete
    state.remove_node(N[0])  # dead
    settle(state, s, WALL)
    assert not state.complete and state.world_size == 0
    assert state.participants == {N[1]: 0, N[2]: 0}
    assert state.deadline == WALL + 30
    # Already in its last call: the call goes on, unshortened.
    state = RendezvousState(participants={N[0]: 0, N[1]: 0}, deadline=WALL + 12)
    assert fold(state, MembershipChange("join", N[2]), s)
    state.remove_node(N[1])
    settle(state, s, WALL)
    assert not state.complete and state.deadline == WALL + 12
    # ... and it ends when the call does.
    settle(state, s, WALL + 12)
    assert state.complete and state.participants == {N[0]: 0, N[2]: 1}


# --------------------------------------------------------------------------- fold


def test_fold_of_more_joins_than_max_nodes_completes_the_round_at_max():
    """Bug: folding a batch of joins into an open round added every one of them, and ``settle``
    completed the round with more than ``max_nodes`` participants (found by the random fault
    schedule of ``integration_tests/test_nemesis_scenarios.py``: groups of 5 and 6 with
    ``max_nodes=4``). Joins past ``max_nodes`` wait in the redundancy list, as they would had the
    round completed at the join that filled it."""
    s = _settings(min_nodes=2, max_nodes=3)
    state = RendezvousState(participants={N[0]: 0})
    placed = [fold(state, MembershipChange("join", n), s) for n in N[1:6]]
    assert placed == [True] * 5
    assert set(state.participants) == set(N[:3])
    assert state.redundancy_list == set(N[3:6])
    settle(state, s, WALL)
    assert state.complete and state.world_size == 3
    assert sorted(state.participants.values()) == [0, 1, 2]
    assert not would_fold(state, MembershipChange("join", N[4]), s)



def test_fold_join_places_as_the_node_itself_would():
    s = _settings(min_nodes=2, max_nodes=3)
    state = RendezvousState()
    for n in N[:3]:
        action = join_op(_ctx(state, s, node=n), _future())
        assert action is Action.ADD_TO_PARTICIPANTS
        assert fold(state, MembershipChange("join", n), s) is True
    assert not state.complete  # until settled
    settle(state, s, WALL)
    assert state.complete and sorted(state.participants.values()) == [0, 1, 2]
    assert join_op(_ctx(state, s, node=N[3]), _future()) is Action.ADD_TO_REDUNDANCY_LIST
    assert fold(state, MembershipChange("join", N[3]), s) is True
    assert state.redundancy_list == {N[3]}
    apply(Action.REMOVE_FROM_PARTICIPANTS, state, N[0])
    assert join_op(_ctx(state, s, node=N[4]), _future()) is Action.ADD_TO_WAIT_LIST
    assert fold(state, MembershipChange("join", N[4]), s) is True
    assert state.wait_list == {N[4]}


@pytest.mark.parametrize("setup", ["incomplete", "complete", "waiting", "redundant", "closed"])
def test_fold_join_is_idempotent(setup):
    s = _settings(min_nodes=2, max_nodes=3)
    if setup == "incomplete":
        state = RendezvousState(participants={N[0]: 0})
    elif setup in ("complete", "waiting"):
        state = _complete(N[:2])
    elif setup == "redundant":
        state = _complete(N[:3])
    else:
        state = RendezvousState(closed=True)
    join = MembershipChange("join", ME)
    if setup == "waiting":
        state.wait_list = {ME}
    first = fold(state, join, s)
    snapshot = copy.deepcopy(state)
    assert fold(state, join, s) is False
    assert fold(state, join, s) is False
    assert state == snapshot
    if setup == "closed":
        assert first is False and state == RendezvousState(closed=True)
    elif setup == "waiting":
        assert first is False and state.wait_list == {ME}
    else:
        assert first is True and ME in state.nodes()


def _would_fold_cases():
    s = _settings(min_nodes=2, max_nodes=3)
    waiting = _complete(N[:2])
    waiting.wait_list = {ME}
    states = {
        "incomplete": RendezvousState(participants={N[0]: 0, N[1]: 0}),
        "complete": _complete(N[:2]),
        "waiting": waiting,
        "redundant": _complete(N[:3]),
        "closed": RendezvousState(closed=True, participants={N[0]: 0}),
    }
    kinds = ["join", "leave", "leave-old-round", "leave-other-completeness", "leave-of-non-member", "rejoin", "rejoin-old-round", "rejoin-of-non-member"]
    for (name, state), kind in itertools.product(states.items(), kinds):
        yield s, name, state, kind


@pytest.mark.parametrize("s, setup, state, kind", list(_would_fold_cases()))
def test_would_fold_says_whether_folding_changes_the_state(s, setup, state, kind):
    state = copy.deepcopy(state)
    node = ME if kind in ("join", "leave-of-non-member", "rejoin-of-non-member") else N[0]
    if kind == "join":
        announcement = MembershipChange("join", node)
    elif kind.startswith("rejoin"):
        announcement = MembershipChange("rejoin", node, state.round + (kind == "rejoin-old-round"), True)
    elif kind == "leave-old-round":
        announcement = MembershipChange("leave", node, state.round + 1, state.complete)
    elif kind == "leave-other-completeness":
        announcement = _leave(node, state, complete=not state.complete)
    else:
        announcement = _leave(node, state)
    predicted = would_fold(state, announcement, s)
    before = copy.deepcopy(state)
    assert would_fold(state, announcement, s) == predicted and state == before  # no side effect
    changed = fold(state, announcement, s)
    assert changed == predicted == (state != before)


def test_fold_join_of_a_participant_changes_nothing():
    s = _settings()
    state = _complete([ME, N[0]])
    snapshot = copy.deepcopy(state)
    assert fold(state, MembershipChange("join", ME), s) is False
    assert state == snapshot


def test_fold_leave_of_a_complete_round():
    s = _settings(min_nodes=2, max_nodes=3)
    state = _complete([ME, N[0], N[1]], round=2)
    assert fold(state, MembershipChange("leave", ME, 1, True), s) is False  # a stale round changes nothing
    assert fold(state, MembershipChange("leave", ME, 3, True), s) is False
    assert ME in state.participants
    assert fold(state, MembershipChange("leave", ME, 2, True), s) is True
    assert ME not in state.participants and state.complete and state.world_size == 3
    assert fold(state, MembershipChange("leave", ME, 2, True), s) is False  # repeated
    assert fold(state, MembershipChange("leave", N[0], 2, True), s) is True
    assert fold(state, MembershipChange("leave", N[1], 2, True), s) is True
    assert state.round == 3 and not state.complete and not state.participants


def test_fold_leave_of_an_incomplete_round_takes_back_the_join():
    s = _settings(min_nodes=2, max_nodes=3)
    state = RendezvousState(round=4, participants={ME: 0, N[0]: 0}, deadline=WALL + 3)
    assert fold(state, MembershipChange("leave", ME, 4, True), s) is False  # it did not see this round complete
    assert fold(state, MembershipChange("leave", ME, 4, False), s) is True
    assert state.participants == {N[0]: 0} and state.round == 4 and not state.complete
    settle(state, s, WALL)
    assert state.deadline is None  # below min_nodes again: the last call is off


def test_take_back_folded_after_the_round_completed_does_not_remove_the_member():
    """Bug: a node whose join timed out while its round was incomplete posts a leave (the rollback
    of ``join_op``); if that round then completed with the node in it (another node folded its
    join and the round filled), the old ``fold_leave`` matched on the round number alone and
    removed the node from the group just formed, so the group lost a member it had ranked. The leave
    now carries ``complete=False`` and no longer applies to the complete round."""
    s = _settings(min_nodes=2, max_nodes=3)
    state = RendezvousState(round=1, participants={ME: 0, N[0]: 0}, deadline=WALL + 30)
    # The node gives up on the incomplete round and posts its take-back...
    take_back = _leave(ME, state)
    assert take_back == MembershipChange("leave", ME, 1, False)
    # ... but before any write folds it, a join fills the round, which completes.
    assert fold(state, MembershipChange("join", N[1]), s)
    settle(state, s, WALL)
    assert state.complete and state.round == 1
    formed = copy.deepcopy(state)
    assert would_fold(state, take_back, s) is False
    assert fold(state, take_back, s) is False
    assert state == formed and ME in state.participants and state.world_size == 3
    # A leave of the complete round itself (the node stopped its workers) still applies.
    assert fold(state, _leave(ME, state), s) is True
    assert ME not in state.participants and state.complete


# --------------------------------------------------------------------------- rejoin


def test_rejoin_op_leaves_only_the_complete_round_it_was_started_in():
    s = _settings(min_nodes=2, max_nodes=3)
    member = _complete([ME, N[0]], round=3)
    assert rejoin_op(3)(_ctx(member, s), _future()) is Action.REJOIN
    assert rejoin_op(3)(_ctx(member, s), _past()) is Action.ERROR_TIMEOUT
    # Its rejoin was folded into round 4, which completed before the node looked again: that is
    # the group it joined, not one to leave.
    assert rejoin_op(3)(_ctx(_complete([ME, N[0]], round=4), s), _future()) is Action.FINISH
    waiting = _complete([N[0], N[1]], round=3)
    waiting.wait_list = {ME}
    assert rejoin_op(3)(_ctx(waiting, s), _future()) is Action.FINISH
    # A participant of an open round stays in it: join_op goes on from there.
    open_round = RendezvousState(round=3, participants={ME: 0, N[0]: 0})
    assert rejoin_op(3)(_ctx(open_round, s), _past()) is Action.FINISH
    assert rejoin_op(3)(_ctx(RendezvousState(round=3), s), _future()) is Action.FINISH


def test_fold_rejoin_leaves_then_joins_the_next_round():
    s = _settings(min_nodes=2, max_nodes=3)
    state = _complete([ME, N[0], N[1]], round=2)
    assert fold(state, MembershipChange("rejoin", ME, 2, True), s) is True
    assert state.round == 2 and state.complete and ME not in state.participants
    assert state.wait_list == {ME} and state.previous_ranks == {ME: 2}
    assert fold(state, MembershipChange("rejoin", ME, 2, True), s) is False  # repeated
    assert fold(state, MembershipChange("rejoin", N[0], 2, True, "zone-a"), s) is True
    assert state.topology == {N[0]: "zone-a"}
    # The last member's leave opens round 3, which its join enters; settle takes in the waiting.
    assert fold(state, MembershipChange("rejoin", N[1], 2, True), s) is True
    assert state.round == 3 and not state.complete and set(state.participants) == {N[1]}
    settle(state, s, WALL)
    assert set(state.participants) == {ME, N[0], N[1]} and not state.wait_list
    assert state.complete  # max_nodes reached


def test_fold_stale_rejoin_still_joins_and_a_closed_run_takes_only_the_leave():
    s = _settings(min_nodes=2, max_nodes=3)
    # The node was dropped as dead from round 2, and round 3 formed without it.
    state = _complete([N[0], N[1]], round=3)
    assert fold(state, MembershipChange("rejoin", ME, 2, True), s) is True
    assert state.wait_list == {ME} and ME not in state.participants
    closed = _complete([ME, N[0]], round=2)
    closed.closed = True
    assert fold(closed, MembershipChange("rejoin", ME, 2, True), s) is True
    assert ME not in closed.participants and ME not in closed.wait_list


def test_a_node_waits_for_the_next_round_only_in_the_wait_list_of_a_complete_open_run():
    waiting = _complete([N[0], N[1]])
    waiting.wait_list = {ME}
    assert waits_for_next_round(waiting, ME)
    assert not waits_for_next_round(waiting, N[0])
    closed = copy.deepcopy(waiting)
    closed.closed = True
    assert not waits_for_next_round(closed, ME)
    assert not waits_for_next_round(RendezvousState(wait_list={ME}), ME)


def test_a_participant_waits_for_members_only_in_an_open_round_without_a_last_call():
    open_round = RendezvousState(participants={ME: 0, N[0]: 0})
    assert waits_for_members(open_round, ME)
    assert not waits_for_members(open_round, N[1])
    last_call = copy.deepcopy(open_round)
    last_call.deadline = 1.0
    assert not waits_for_members(last_call, ME)
    closed = copy.deepcopy(open_round)
    closed.closed = True
    assert not waits_for_members(closed, ME)
    assert not waits_for_members(_complete([ME, N[0]]), ME)
