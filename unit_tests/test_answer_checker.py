"""The answer checker (``benchmarks.answers``) on synthetic histories."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from benchmarks.answers import (
    Answer,
    AnswerLog,
    Closed,
    check,
    check_worker_results,
    record_close,
    record_rendezvous,
)

S1, S2 = "127.0.0.1:4001", "127.0.0.1:4002"


def round_of(round_: int, ranks: dict[str, int], store: str = S1, t: float = 0.0, world: int | None = None) -> list[Answer]:
    world = len(ranks) if world is None else world
    return [Answer(node, round_, rank, world, store, t + i * 0.01) for i, (node, rank) in enumerate(ranks.items())]


def history() -> list[Answer | Closed]:
    """Three nodes, then one leaves and the other two form round 2; a node closes at t=5."""
    return [
        *round_of(1, {"a": 0, "b": 1, "c": 2}, S1, t=1.0),
        *round_of(2, {"a": 0, "b": 1}, S2, t=3.0),
        Closed("a", 5.0),
    ]


def test_a_sound_history_passes():
    assert check(history()) == []
    assert check(history(), {1: {"a": 0, "b": 1, "c": 2}, 2: {"a": 0, "b": 1}}) == []


def test_a_round_partly_answered_passes():
    # Only two of three members returned so far (the third is slow or died afterwards).
    assert check(round_of(4, {"a": 2, "c": 0}, world=3)) == []


def test_stored_groups_may_be_invariant_checker_groups():
    group = SimpleNamespace(ranks={"a": 0, "b": 1}, world_size=2)
    assert check(round_of(7, {"a": 0, "b": 1}), {7: group}) == []


def test_node_handed_back_its_old_round():
    events = [*history()[:5], Answer("a", 1, 0, 3, S1, 4.0)]
    problems = check(events)
    assert any("node a: handed round 1" in p and "round 2" in p for p in problems), problems


def test_node_handed_the_same_round_twice():
    events = [*round_of(3, {"a": 0, "b": 1}, t=1.0), Answer("a", 3, 0, 2, S1, 2.0)]
    assert any("node a: handed round 3" in p for p in check(events))


def test_two_groups_in_one_round():
    # Two disjoint pairs both told "round 5, world 2": dense ranks each, but four members.
    events = [*round_of(5, {"a": 0, "b": 1}, S1), *round_of(5, {"c": 0, "d": 1}, S1, t=1.0)]
    problems = check(events)
    assert any("rank 0 given to ['a', 'c']" in p for p in problems), problems
    assert any("4 members answered for a world of size 2" in p for p in problems), problems


def test_two_world_sizes_in_one_round():
    events = [*round_of(5, {"a": 0, "b": 1}), Answer("c", 5, 2, 3, S1, 1.0)]
    assert any("round 5: world sizes [2, 3]" in p for p in check(events))


def test_duplicate_rank():
    problems = check(round_of(2, {"a": 0, "b": 0, "c": 2}))
    assert problems == ["round 2: rank 0 given to ['a', 'b']"]


def test_rank_outside_the_world():
    problems = check(round_of(2, {"a": 0, "b": 2}))
    assert problems == ["round 2: rank 2 of ['b'] outside 0..1"]


def test_different_store_in_one_round():
    events = [Answer("a", 1, 0, 2, S1, 0.0), Answer("b", 1, 1, 2, S2, 0.0)]
    problems = check(events)
    assert len(problems) == 1 and "bootstrap stores" in problems[0] and S1 in problems[0] and S2 in problems[0]


def test_answer_after_close():
    events = [*history(), Answer("c", 3, 0, 1, S1, 7.0)]
    problems = check(events)
    assert problems == ["node c: answered round 3 2.00s after a closed the run"]
    # An answer on its way when the run closed is fine.
    assert check([*history(), Answer("c", 3, 0, 1, S1, 5.5)]) == []
    assert check([*history(), Answer("c", 3, 0, 1, S1, 7.0)], grace=3.0) == []


def test_mismatch_with_the_stored_group():
    answers = round_of(1, {"a": 0, "b": 1})
    assert check(answers, {1: {"a": 1, "b": 0}}) == [
        "round 1: a was told rank 0, the stored group gives it rank 1",
        "round 1: b was told rank 1, the stored group gives it rank 0",
    ]
    problems = check(answers, {1: {"a": 0, "c": 1}})
    assert problems == ["round 1: b was answered but is not in the stored group {'a': 0, 'c': 1}"]
    problems = check(answers, {1: {"a": 0, "b": 1, "c": 2}})
    assert len(problems) == 2 and all("stored group has 3" in p for p in problems)
    problems = check(answers, {})
    assert problems == ["round 1: answered to a: rank 0 world_size 2, b: rank 1 world_size 2 but never stored as complete"]


def test_log_is_thread_safe_and_keeps_order():
    log = AnswerLog()

    def add(node: str, rank: int) -> None:
        for i in range(200):
            log.add(Answer(node, i, rank, 4, S1, float(i)))

    threads = [threading.Thread(target=add, args=(n, r)) for r, n in enumerate("abcd")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(log.answers) == 800
    assert check(log) == []
    for node in "abcd":
        assert [a.round for a in log.answers if a.node == node] == list(range(200))


class FakeHandler:
    """The parts of ``DynamicRendezvousHandler`` that the recorders use."""

    def __init__(self, key: str, round_: int, rank: int, world: int) -> None:
        self.node = SimpleNamespace(key=key)
        self.last_timings = None
        self._answer = (round_, rank, world)
        self.shut = False

    def next_rendezvous(self):
        round_, rank, world = self._answer
        self.last_timings = SimpleNamespace(round=round_)
        store = SimpleNamespace(master_addr="127.0.0.1", master_port=4001)
        return SimpleNamespace(rank=rank, world_size=world, bootstrap_store_info=store)

    def shutdown(self) -> bool:
        self.shut = True
        return True


def test_recorders_log_what_the_handler_said():
    log = AnswerLog()
    handler = FakeHandler("10.0.0.1_7_0", 3, 1, 2)
    info = record_rendezvous(handler, log)
    assert info.rank == 1
    assert record_close(handler, log) and handler.shut
    answer, closed = log.events
    assert (answer.node, answer.round, answer.rank, answer.world_size, answer.store) == ("10.0.0.1_7_0", 3, 1, 2, S1)
    assert closed.node == "10.0.0.1_7_0" and closed.t >= answer.t


# -- torchrun workers ----------------------------------------------------------------------------


def worker(rank: int, world: int, master: str = S1, **extra) -> dict:
    return {"rank": rank, "world_size": world, "master": master, "sum": world * (world + 1) / 2, **extra}


def test_workers_of_two_restarts_pass():
    results = [worker(0, 2), worker(1, 2), worker(0, 3, S2), worker(1, 3, S2), worker(2, 3, S2)]
    assert check_worker_results(results) == []


def test_workers_with_split_address_fields():
    results = [{"rank": r, "world_size": 2, "master_addr": "h", "master_port": 1} for r in (0, 1)]
    assert check_worker_results(results) == []


def test_workers_duplicate_rank_in_one_store():
    problems = check_worker_results([worker(0, 2), worker(0, 2)])
    assert len(problems) == 1 and "rank 0 given to" in problems[0]


def test_workers_different_world_sizes_in_one_store():
    problems = check_worker_results([worker(0, 2), worker(1, 3)])
    assert problems == [f"workers of store {S1}: world sizes [2, 3]"]


def test_workers_wrong_sum():
    problems = check_worker_results([worker(0, 2), {**worker(1, 2), "sum": 6.0}])
    assert problems == [f"workers of store {S1}: rank 1 reduced 6.0 in a world of 2"]


# Fencing and the monitor path: answers against the stored states.


def _stored(round_: int, ranks: dict[str, int], complete: bool = True, waiting: tuple[str, ...] = ()):
    from rdzv_common.state import NodeDesc, RendezvousState

    def node(key: str) -> NodeDesc:
        addr, pid, local_id = key.rsplit("_", 2)
        return NodeDesc(addr, int(pid), int(local_id))

    return RendezvousState(
        round=round_,
        complete=complete,
        participants={node(k): r for k, r in ranks.items()},
        wait_list={node(k) for k in waiting},
        world_size=len(ranks) if complete else 0,
    )


def test_an_answer_the_state_stored_when_it_was_given_does_not_back_is_a_fencing_violation():
    from benchmarks.answers import Waiting  # noqa: F401 - the log's other kind

    states = [
        (10, _stored(0, {"a_1_0": 0, "b_1_0": 1})),
        # b saw a dead and dropped it from the group a was told: a's liveness lapsed.
        (12, _stored(0, {"b_1_0": 1})),
    ]
    told_a = Answer("a_1_0", 0, 0, 2, S1, 1.0, revision=12)
    told_b = Answer("b_1_0", 0, 1, 2, S1, 1.1, revision=11)
    problems = check([told_a, told_b], states=states)
    assert len(problems) == 1 and "a_1_0" in problems[0] and "rev 12" in problems[0], problems
    assert check([told_b, Answer("a_1_0", 0, 0, 2, S1, 1.0, revision=11)], states=states) == []


def test_a_monitor_answer_above_the_wait_list_it_read_is_a_violation():
    from benchmarks.answers import Waiting

    states = [(10, _stored(0, {"a_1_0": 0, "b_1_0": 1}, waiting=("c_1_0",)))]
    assert check([Waiting("a_1_0", 1, 10, 1.0), Waiting("b_1_0", 0, 10, 1.0)], states=states) == []
    problems = check([Waiting("a_1_0", 2, 10, 1.0)], states=states)
    assert len(problems) == 1 and "num_nodes_waiting() said 2" in problems[0]
    assert check([Waiting("a_1_0", 1, None, 1.0)], states=states) != []
