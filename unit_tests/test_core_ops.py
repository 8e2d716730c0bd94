"""Operation decisions (join, exit, close, keep-alive) and the state transitions they ask for."""

from __future__ import annotations

import copy
import time

import pytest
from torch.distributed.elastic.rendezvous import RendezvousGracefulExitError

from rdzv_common import ops
from rdzv_common.codec import Announcement
from rdzv_common.ops import (
    ADD_ACTIONS,
    ROLLBACK_PERIOD,
    Action,
    Context,
    apply,
    close_op,
    exit_op,
    fold_join,
    fold_leave,
    join_op,
    keep_alive_op,
    would_fold,
)
from rdzv_common.settings import RendezvousSettings
from rdzv_common.state import NodeDesc, RendezvousState

N = [NodeDesc("10.0.0.1", 100 + i, i % 2) for i in range(8)]
ME = NodeDesc("10.0.0.9", 9, 0)


def _settings(min_nodes=2, max_nodes=3, **kw) -> RendezvousSettings:
    kw.setdefault("last_call_timeout", 0.2)
    return RendezvousSettings("ops-run", min_nodes, max_nodes, **kw)


def _future() -> float:
    return time.monotonic() + 60


def _past(by: float = 1.0) -> float:
    return time.monotonic() - by


def _join(state, settings=None, node=ME, due=False, deadline=None) -> Action:
    ctx = Context(node, state, settings or _settings(), keep_alive_due=due)
    return join_op(ctx, _future() if deadline is None else deadline)


def _complete(members, round=0) -> RendezvousState:
    return RendezvousState(
        round=round, complete=True, participants={n: r for r, n in enumerate(sorted(members))}
    )


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
    state = RendezvousState(participants={ME: 0, N[0]: 0}, deadline=time.time() - 0.01)
    assert _join(state) is Action.MARK_RENDEZVOUS_COMPLETE


@pytest.mark.parametrize("due, expected", [(False, Action.SYNC), (True, Action.KEEP_ALIVE)])
def test_participant_before_last_call_waits(due, expected):
    state = RendezvousState(participants={ME: 0, N[0]: 0}, deadline=time.time() + 30)
    assert _join(state, due=due) is expected


def test_participant_below_min_waits_even_with_stale_deadline():
    state = RendezvousState(participants={ME: 0}, deadline=time.time() - 10)
    assert _join(state) is Action.SYNC
    state = RendezvousState(participants={ME: 0, N[0]: 0}, deadline=None)
    assert _join(state) is Action.SYNC


# --------------------------------------------------------------------------- exit, close, keep-alive


def test_exit_op():
    settings = _settings()
    in_round = Context(ME, _complete([ME, N[0]]), settings)
    assert exit_op(in_round, _future()) is Action.REMOVE_FROM_PARTICIPANTS
    assert exit_op(in_round, _past()) is Action.ERROR_TIMEOUT
    for state in [RendezvousState(), _complete(N[:2]), RendezvousState(wait_list={ME})]:
        assert exit_op(Context(ME, state, settings), _future()) is Action.FINISH
        assert exit_op(Context(ME, state, settings), _past()) is Action.FINISH


def test_close_op():
    settings = _settings()
    assert close_op(Context(ME, RendezvousState(), settings), _future()) is Action.MARK_RENDEZVOUS_CLOSED
    assert close_op(Context(ME, RendezvousState(), settings), _past()) is Action.ERROR_TIMEOUT
    assert close_op(Context(ME, RendezvousState(closed=True), settings), _future()) is Action.FINISH
    assert close_op(Context(ME, RendezvousState(closed=True), settings), _past()) is Action.FINISH


def test_keep_alive_op():
    settings = _settings()
    st = RendezvousState()
    assert keep_alive_op(Context(ME, st, settings, keep_alive_due=True), _future()) is Action.KEEP_ALIVE
    assert keep_alive_op(Context(ME, st, settings, keep_alive_due=True), _past()) is Action.ERROR_TIMEOUT
    assert keep_alive_op(Context(ME, st, settings, keep_alive_due=False), _future()) is Action.FINISH
    assert keep_alive_op(Context(ME, st, settings, keep_alive_due=False), _past()) is Action.FINISH


# --------------------------------------------------------------------------- apply


def test_add_below_min_sets_no_deadline():
    s = _settings(min_nodes=2, max_nodes=3)
    state = RendezvousState()
    apply(Action.ADD_TO_PARTICIPANTS, state, N[0], s)
    assert state.participants == {N[0]: 0}
    assert state.deadline is None and not state.complete


def test_add_reaching_min_sets_the_last_call_deadline():
    s = _settings(min_nodes=2, max_nodes=3, last_call_timeout=7)
    state = RendezvousState(participants={N[0]: 0})
    before = time.time()
    apply(Action.ADD_TO_PARTICIPANTS, state, N[1], s)
    after = time.time()
    assert before + 7 <= state.deadline <= after + 7
    assert not state.complete


def test_add_reaching_max_completes_with_sorted_ranks():
    s = _settings(min_nodes=1, max_nodes=4)
    members = [N[5], N[2], N[7], N[0]]
    state = RendezvousState(wait_list={N[0]}, redundancy_list={N[7]})
    for n in members:
        apply(Action.ADD_TO_PARTICIPANTS, state, n, s)
    assert state.complete and state.deadline is None
    assert state.participants == {n: r for r, n in enumerate(sorted(members))}
    assert not state.wait_list and not state.redundancy_list


def test_add_to_participants_takes_the_node_off_other_lists():
    s = _settings()
    state = RendezvousState(wait_list={ME, N[1]}, redundancy_list={N[2]})
    apply(Action.ADD_TO_PARTICIPANTS, state, ME, s)
    assert ME in state.participants and state.wait_list == {N[1]}


def test_add_to_wait_list_and_redundancy_list():
    s = _settings()
    state = _complete(N[:3])
    apply(Action.ADD_TO_REDUNDANCY_LIST, state, ME, s)
    assert state.redundancy_list == {ME}
    apply(Action.ADD_TO_WAIT_LIST, state, ME, s)
    assert state.wait_list == {ME} and state.redundancy_list == set()
    apply(Action.REMOVE_FROM_WAIT_LIST, state, ME, s)
    assert state.wait_list == set()
    apply(Action.ADD_TO_REDUNDANCY_LIST, state, ME, s)
    apply(Action.REMOVE_FROM_REDUNDANCY_LIST, state, ME, s)
    assert state.redundancy_list == set()
    assert state.participants == _complete(N[:3]).participants


def test_remove_from_participants_below_min_clears_deadline():
    s = _settings(min_nodes=2, max_nodes=4)
    state = RendezvousState(participants={N[0]: 0, N[1]: 0}, deadline=time.time() + 5)
    apply(Action.REMOVE_FROM_PARTICIPANTS, state, N[1], s)
    assert state.participants == {N[0]: 0}
    assert state.deadline is None and state.round == 0 and not state.complete


def test_remove_from_participants_at_min_keeps_deadline():
    s = _settings(min_nodes=2, max_nodes=4)
    deadline = time.time() + 5
    state = RendezvousState(participants={N[0]: 0, N[1]: 0, N[2]: 0}, deadline=deadline)
    apply(Action.REMOVE_FROM_PARTICIPANTS, state, N[2], s)
    assert state.deadline == deadline


def test_complete_round_keeps_ranks_until_it_empties_then_advances():
    s = _settings(min_nodes=2, max_nodes=3)
    state = _complete(N[:3], round=5)
    state.wait_list = {ME}
    ranks = dict(state.participants)
    apply(Action.REMOVE_FROM_PARTICIPANTS, state, N[0], s)
    assert state.complete and state.round == 5
    assert state.participants == {n: ranks[n] for n in N[1:3]}  # survivors keep their ranks
    apply(Action.REMOVE_FROM_PARTICIPANTS, state, N[1], s)
    apply(Action.REMOVE_FROM_PARTICIPANTS, state, N[2], s)
    assert state.round == 6 and not state.complete and not state.participants
    assert state.wait_list == {ME}  # the waiters carry over to the next round
    assert _join(state, s) is Action.ADD_TO_PARTICIPANTS


def test_mark_complete_and_closed():
    s = _settings()
    state = RendezvousState(participants={N[3]: 0, N[1]: 0}, deadline=time.time())
    apply(Action.MARK_RENDEZVOUS_COMPLETE, state, N[1], s)
    assert state.complete and state.deadline is None
    assert state.participants == {N[1]: 0, N[3]: 1}
    apply(Action.MARK_RENDEZVOUS_CLOSED, state, N[1], s)
    assert state.closed


@pytest.mark.parametrize("action", [Action.SYNC, Action.KEEP_ALIVE, Action.FINISH, Action.ERROR_CLOSED, Action.ERROR_TIMEOUT])
def test_apply_refuses_non_state_actions(action):
    with pytest.raises(ValueError):
        apply(action, RendezvousState(), ME, _settings())


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
            apply(action, state, ME, _settings())
        else:
            with pytest.raises(ValueError):
                apply(action, state, ME, _settings())
    assert ADD_ACTIONS == {Action.ADD_TO_PARTICIPANTS, Action.ADD_TO_WAIT_LIST, Action.ADD_TO_REDUNDANCY_LIST}


# --------------------------------------------------------------------------- fold_join / fold_leave


def test_fold_join_places_as_the_node_itself_would():
    s = _settings(min_nodes=2, max_nodes=3)
    state = RendezvousState()
    assert fold_join(state, N[0], s) is Action.ADD_TO_PARTICIPANTS
    assert fold_join(state, N[1], s) is Action.ADD_TO_PARTICIPANTS
    assert state.deadline is not None
    assert fold_join(state, N[2], s) is Action.ADD_TO_PARTICIPANTS
    assert state.complete and sorted(state.participants.values()) == [0, 1, 2]
    assert fold_join(state, N[3], s) is Action.ADD_TO_REDUNDANCY_LIST
    apply(Action.REMOVE_FROM_PARTICIPANTS, state, N[0], s)
    assert fold_join(state, N[4], s) is Action.ADD_TO_WAIT_LIST


@pytest.mark.parametrize("setup", ["incomplete", "complete", "waiting", "redundant", "closed"])
def test_fold_join_is_idempotent(setup):
    s = _settings(min_nodes=2, max_nodes=3)
    if setup == "incomplete":
        state = RendezvousState(participants={N[0]: 0})
    elif setup == "complete":
        state = _complete(N[:2])
    elif setup == "waiting":
        state = _complete(N[:2])
    elif setup == "redundant":
        state = _complete(N[:3])
    else:
        state = RendezvousState(closed=True)
    first = fold_join(state, ME, s)
    snapshot = copy.deepcopy(state)
    assert fold_join(state, ME, s) is None
    assert fold_join(state, ME, s) is None
    assert state == snapshot
    if setup == "closed":
        assert first is None and state == RendezvousState(closed=True)
    else:
        assert first is not None and ME in state.nodes()


@pytest.mark.parametrize("setup", ["incomplete", "complete", "waiting", "redundant", "closed"])
@pytest.mark.parametrize("kind", ["join", "leave-this-round", "leave-old-round"])
def test_would_fold_says_whether_folding_changes_the_state(setup, kind):
    s = _settings(min_nodes=2, max_nodes=3)
    state = {
        "incomplete": RendezvousState(participants={N[0]: 0}),
        "complete": _complete(N[:2]),
        "waiting": _complete(N[:2]),
        "redundant": _complete(N[:3]),
        "closed": RendezvousState(closed=True),
    }[setup]
    node = N[0] if kind.startswith("leave") else ME
    if setup == "waiting":
        fold_join(state, ME, s)
    if kind == "join":
        announcement = Announcement("join", node)
    else:
        announcement = Announcement("leave", node, state.round if kind == "leave-this-round" else state.round + 1)
    predicted = would_fold(state, announcement, s)
    before = copy.deepcopy(state)
    if kind == "join":
        fold_join(state, node, s)
    else:
        fold_leave(state, node, announcement.round, s)
    assert predicted == (state != before)


def test_fold_join_of_a_participant_changes_nothing():
    s = _settings()
    state = _complete([ME, N[0]])
    snapshot = copy.deepcopy(state)
    assert fold_join(state, ME, s) is None
    assert state == snapshot


def test_fold_leave_if_present():
    fold_leave = getattr(ops, "fold_leave", None)
    if fold_leave is None:
        pytest.skip("this release has no leave announcements")
    s = _settings(min_nodes=2, max_nodes=3)
    state = _complete([ME, N[0], N[1]], round=2)
    assert fold_leave(state, ME, 1, s) is False  # a stale round changes nothing
    assert ME in state.participants
    assert fold_leave(state, ME, 2, s) is True
    assert ME not in state.participants
    assert fold_leave(state, ME, 2, s) is False  # repeated
    fold_leave(state, N[0], 2, s)
    fold_leave(state, N[1], 2, s)
    assert state.round == 3 and not state.complete
