"""``Shared``: one object per key for the backends of a process, closed by its last user."""

from __future__ import annotations

from etcd_rdzv.shared import Shared


def test_one_object_per_key_closed_at_the_last_release():
    made, closed = [], []
    shared = Shared(lambda key: made.append(key) or [key], closed.append)
    a1, a2, b = shared.acquire("a"), shared.acquire("a"), shared.acquire("b")
    assert a1 is a2 and a1 is not b
    assert made == ["a", "b"]
    shared.release("a")
    assert closed == []
    shared.release("a")
    assert closed == [["a"]]
    assert shared.acquire("a") is not a1  # a released key starts afresh
    assert made == ["a", "b", "a"]
