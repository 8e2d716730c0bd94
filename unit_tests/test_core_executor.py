"""OpExecutor: who folds the pending announcements, and what a node does when its own is gone."""

from __future__ import annotations

import pytest

from rdzv_common import executor as executor_module
from rdzv_common.codec import encode_state
from rdzv_common.executor import FOLD_FALLBACK_FIRST, FOLD_FALLBACK_STEP, OpExecutor
from rdzv_common.holder import StateHolder
from rdzv_common.memory import MemoryBackend, MemoryStore
from rdzv_common.ops import Action
from rdzv_common.settings import RendezvousSettings
from rdzv_common.state import NodeDesc

RUN = "executor-run"
NODES = [NodeDesc("10.0.0.1", 100 + i, 0) for i in range(4)]


class WaitRecordingBackend(MemoryBackend):
    """Records the timeout of each ``wait_for_change`` and returns at once (nobody writes)."""

    def __init__(self, store: MemoryStore) -> None:
        super().__init__(store, RUN)
        self.waits: list[float] = []

    def wait_for_change(self, token, timeout: float) -> None:
        self.waits.append(timeout)


def _executor(store: MemoryStore, node: NodeDesc) -> tuple[OpExecutor, StateHolder, WaitRecordingBackend]:
    settings = RendezvousSettings(RUN, 2, 4)
    backend = WaitRecordingBackend(store)
    holder = StateHolder(backend, settings, node)
    executor = OpExecutor(node, holder, backend, settings)
    holder.sync()
    executor.beat()
    return executor, holder, backend


@pytest.fixture(autouse=True)
def _no_jitter(monkeypatch):
    monkeypatch.setattr(executor_module.random, "uniform", lambda a, b: 1.0)


def test_the_oldest_poster_folds_at_once():
    store = MemoryStore()
    first, holder, backend = _executor(store, NODES[0])
    first._announce(Action.ADD_TO_PARTICIPANTS)
    assert first._await_fold() is False
    assert backend.waits == []  # no waiting: it is first in line
    assert holder.sync() is True
    assert NODES[0] in holder.state.participants


def test_a_later_poster_waits_longer_the_further_back_it_is():
    store = MemoryStore()
    executors = [_executor(store, node) for node in NODES[:3]]
    for executor, _, _ in executors:
        executor._announce(Action.ADD_TO_PARTICIPANTS)
    for place, (executor, holder, backend) in enumerate(executors[1:], start=1):
        # Nobody ahead folded within the wait, so this node folds the whole batch itself.
        assert executor._await_fold() is False
        assert backend.waits == [pytest.approx(FOLD_FALLBACK_FIRST + FOLD_FALLBACK_STEP * place)]
    last_holder = executors[2][1]
    assert last_holder.sync() is True
    assert set(last_holder.state.participants) == set(NODES[:3])


def test_repeated_joins_of_placed_nodes_do_not_hold_up_the_line():
    store = MemoryStore()
    placed, placed_holder, _ = _executor(store, NODES[0])
    placed._announce(Action.ADD_TO_PARTICIPANTS)
    placed_holder.mark_dirty()
    placed_holder.sync()
    # A second join record of the already placed node, older than the next joiner's.
    store_backend = MemoryBackend(store, RUN)
    store_backend.mailbox.post(store_backend.mailbox.read(0)[0][0])
    joiner, holder, backend = _executor(store, NODES[1])
    joiner._announce(Action.ADD_TO_PARTICIPANTS)
    assert joiner._await_fold() is False
    assert backend.waits == []


def test_a_node_whose_join_was_undone_announces_again():
    store = MemoryStore()
    executor, holder, backend = _executor(store, NODES[0])
    executor._announce(Action.ADD_TO_PARTICIPANTS)
    holder.mark_dirty()
    assert holder.sync() is True
    # Another node dropped it (e.g. it was thought dead) and the record is folded: none is pending.
    state = holder.state.copy()
    del state.participants[NODES[0]]
    other = MemoryBackend(store, RUN)
    _, token, won = other.set_state(encode_state(state), holder.token)
    assert won
    holder.sync()
    posted_before = len(other.mailbox.read(0)[0])
    assert executor._await_fold() is False
    executor._announce(Action.ADD_TO_PARTICIPANTS)
    assert len(other.mailbox.read(0)[0]) == posted_before + 1
