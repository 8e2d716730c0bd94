"""The behaviour every ``RendezvousBackend`` must show, written once and run against each backend.

A test module subclasses ``BackendContract`` and provides a ``make_backend`` fixture: a callable
``make_backend(run_id) -> RendezvousBackend`` whose backends for the same ``run_id`` share one server.
``liveness_ttl`` is the shortest time-to-live the backend honours (etcd leases round up to seconds).
"""

from __future__ import annotations

import threading
import time

import pytest


class BackendContract:
    liveness_ttl: float = 0.5

    def test_absent_state_reads_none(self, make_backend):
        assert make_backend("run-empty").get_state() is None

    def test_create_only_if_absent(self, make_backend):
        a, b = make_backend("run-create"), make_backend("run-create")
        state, token, has_set = a.set_state(b"first")
        assert (state, has_set) == (b"first", True)
        state2, token2, has_set2 = b.set_state(b"second", None)
        assert (state2, token2, has_set2) == (b"first", token, False)
        assert b.get_state() == (b"first", token)

    def test_compare_and_set_with_current_token(self, make_backend):
        a = make_backend("run-cas")
        _, token, _ = a.set_state(b"v1")
        state, token2, has_set = a.set_state(b"v2", token)
        assert (state, has_set) == (b"v2", True)
        assert token2 != token
        assert a.get_state() == (b"v2", token2)

    def test_stale_token_is_refused_and_current_returned(self, make_backend):
        a, b = make_backend("run-stale"), make_backend("run-stale")
        _, t1, _ = a.set_state(b"v1")
        _, t2, _ = b.set_state(b"v2", t1)
        state, token, has_set = a.set_state(b"v3", t1)
        assert (state, token, has_set) == (b"v2", t2, False)

    def test_runs_are_isolated(self, make_backend):
        a, b = make_backend("run-iso-a"), make_backend("run-iso-b")
        a.set_state(b"a")
        assert b.get_state() is None
        b.set_state(b"b")
        assert a.get_state()[0] == b"a"

    def test_wait_for_change_wakes_on_write(self, make_backend):
        a, b = make_backend("run-wait"), make_backend("run-wait")
        _, token, _ = a.set_state(b"v1")
        writer = threading.Timer(0.3, lambda: b.set_state(b"v2", token))
        writer.start()
        started = time.monotonic()
        try:
            a.wait_for_change(token, timeout=20)
        finally:
            writer.join()
        assert time.monotonic() - started < 10
        assert a.get_state()[0] == b"v2"

    def test_wait_for_change_returns_at_once_when_token_is_stale(self, make_backend):
        a = make_backend("run-wait-stale")
        _, t1, _ = a.set_state(b"v1")
        a.set_state(b"v2", t1)
        started = time.monotonic()
        a.wait_for_change(t1, timeout=20)
        assert time.monotonic() - started < 5

    def test_wait_for_change_honours_timeout(self, make_backend):
        a = make_backend("run-wait-timeout")
        _, token, _ = a.set_state(b"v1")
        started = time.monotonic()
        a.wait_for_change(token, timeout=0.5)
        assert time.monotonic() - started < 5
        assert a.get_state()[1] == token

    def test_mailbox_reads_in_order_from_cursor(self, make_backend):
        a, b = make_backend("run-mail"), make_backend("run-mail")
        if a.mailbox is None:
            pytest.skip("backend has no mailbox")
        assert a.mailbox.read(0) == ([], 0)
        a.mailbox.post(b"one")
        b.mailbox.post(b"two")
        records, cursor = b.mailbox.read(0)
        assert records == [b"one", b"two"]
        a.mailbox.post(b"three")
        later, cursor2 = a.mailbox.read(cursor)
        assert later == [b"three"]
        assert cursor2 > cursor
        assert a.mailbox.read(cursor2) == ([], cursor2)

    def test_mailbox_trim_keeps_later_records(self, make_backend):
        a = make_backend("run-trim")
        if a.mailbox is None:
            pytest.skip("backend has no mailbox")
        a.mailbox.post(b"one")
        _, cursor = a.mailbox.read(0)
        a.mailbox.post(b"two")
        a.mailbox.trim(cursor)
        assert a.mailbox.read(cursor)[0] == [b"two"]

    def test_liveness_beat_forget_and_expiry(self, make_backend):
        a, b = make_backend("run-live"), make_backend("run-live")
        ttl = self.liveness_ttl
        a.liveness.beat("node-a", ttl)
        b.liveness.beat("node-b", ttl)
        assert b.liveness.alive(["node-a", "node-b", "node-x"], ttl) == {"node-a", "node-b"}
        b.liveness.forget("node-b")
        assert a.liveness.alive(["node-a", "node-b"], ttl) == {"node-a"}
        deadline = time.monotonic() + ttl * 6 + 5
        while "node-a" in a.liveness.alive(["node-a"], ttl) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert a.liveness.alive(["node-a"], ttl) == set()
