"""The behaviour every ``RendezvousBackend`` must show, written once and run against each backend.

A test module subclasses ``BackendContract`` and provides a ``make_backend`` fixture: a callable
``make_backend(run_id) -> RendezvousBackend`` whose backends for the same ``run_id`` share one server.
``liveness_ttl`` is the shortest time-to-live the backend honours (etcd leases round up to seconds).
``fences_withdrawn`` says whether the backend can withdraw mailbox records and fence writes on them
(``Mailbox.withdraw``, ``RendezvousBackend.set_state(..., fence)``); one that cannot must accept
both and ignore them. ``fences_member`` says whether it can fence a write on the liveness of the
member that writes it (``set_state(..., member=...)``); one that cannot accepts and ignores it.
"""

from __future__ import annotations

import threading
import time

from rdzv_common.backend import Record


def _read_until(mailbox, cursor: int, datas: list[bytes], timeout: float = 5.0) -> list[Record]:
    """The mailbox's records after ``cursor`` once their data is ``datas``: a node sees its own
    posts at once, another node's as soon as they reach it (through a watch, say)."""
    deadline = time.monotonic() + timeout
    while True:
        records = mailbox.read(cursor)
        if [r.data for r in records] == datas or time.monotonic() > deadline:
            return records
        time.sleep(0.02)


class BackendContract:
    liveness_ttl: float = 0.5
    fences_withdrawn: bool = False
    fences_member: bool = False

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
        # It must wait the whole timeout (an early return would make every waiter poll), and not
        # much longer (a node would miss its own deadlines); "much" allows for a busy machine.
        a = make_backend("run-wait-timeout")
        _, token, _ = a.set_state(b"v1")
        timeout = 0.5
        started = time.monotonic()
        a.wait_for_change(token, timeout=timeout)
        took = time.monotonic() - started
        assert timeout - 0.05 <= took < timeout + 3.0, took
        assert a.get_state()[1] == token

    def test_mailbox_reads_in_order_from_cursor(self, make_backend):
        a, b = make_backend("run-mail"), make_backend("run-mail")
        assert a.mailbox.read(0) == []
        posted = [a.mailbox.post(b"one"), b.mailbox.post(b"two")]
        assert [p.data for p in posted] == [b"one", b"two"]
        records = _read_until(b.mailbox, 0, [b"one", b"two"])
        assert all(isinstance(r, Record) for r in records)
        assert [r.data for r in records] == [b"one", b"two"]
        # Each record's position is the cursor just past it: reading from it skips the record.
        assert 0 < records[0].position < records[1].position
        assert [r.data for r in _read_until(a.mailbox, records[0].position, [b"two"])] == [b"two"]
        for post, read in zip(posted, records):
            # A poster that learns where its record landed learns what every reader sees.
            assert post.position in (None, read.position)
        cursor = records[-1].position
        assert a.mailbox.read(cursor) == []
        a.mailbox.post(b"three")
        later = a.mailbox.read(cursor)
        assert [r.data for r in later] == [b"three"]
        assert later[0].position > cursor
        assert a.mailbox.read(later[0].position) == []

    def test_mailbox_trim_keeps_later_records(self, make_backend):
        a = make_backend("run-trim")
        a.mailbox.post(b"one")
        (first,) = a.mailbox.read(0)
        a.mailbox.post(b"two")
        a.mailbox.trim(first.position)
        assert [r.data for r in a.mailbox.read(first.position)] == [b"two"]

    def test_empty_fence_does_not_stop_a_write(self, make_backend):
        a = make_backend("run-fence-empty")
        _, token, has_set = a.set_state(b"v1", None, ())
        assert has_set
        state, token2, has_set = a.set_state(b"v2", token, [])
        assert (state, has_set) == (b"v2", True) and token2 != token

    def test_write_fenced_on_live_records_succeeds(self, make_backend):
        a, b = make_backend("run-fence-live"), make_backend("run-fence-live")
        _, token, _ = a.set_state(b"v1")
        b.mailbox.post(b"join")
        state, _, has_set = a.set_state(b"v2", token, a.mailbox.read(0))
        assert (state, has_set) == (b"v2", True)

    def test_withdrawn_record_fences_writes_that_folded_it(self, make_backend):
        a, b = make_backend("run-fence"), make_backend("run-fence")
        _, token, _ = a.set_state(b"v1")
        posted = b.mailbox.post(b"join")
        b.mailbox.post(b"other")
        seen = _read_until(a.mailbox, 0, [b"join", b"other"])
        assert [r.data for r in seen] == [b"join", b"other"]
        b.mailbox.withdraw(posted.handle)
        result = a.set_state(b"v2", token, seen)
        if not self.fences_withdrawn:
            # The backend cannot fence: it must say so by writing (and keeping the record).
            assert result[0] == b"v2" and result[2] is True
            assert [r.data for r in a.mailbox.read(0)] == [b"join", b"other"]
            return
        # The write read the record before it was withdrawn: it must not land, and the state and
        # token that stand are returned.
        assert result == (b"v1", token, False)
        assert a.get_state() == (b"v1", token)
        # A reader after the withdrawal no longer sees it, and its write (fenced on what it saw)
        # lands.
        again = _read_until(a.mailbox, 0, [b"other"])
        assert [r.data for r in again] == [b"other"]
        assert again[0].position == seen[1].position
        state, _, has_set = a.set_state(b"v3", token, again)
        assert (state, has_set) == (b"v3", True)

    def test_withdraw_of_a_folded_record_leaves_later_writes_alone(self, make_backend):
        a = make_backend("run-fence-late")
        _, token, _ = a.set_state(b"v1")
        posted = a.mailbox.post(b"join")
        (record,) = a.mailbox.read(0)
        _, token, has_set = a.set_state(b"v2", token, [record])
        assert has_set
        a.mailbox.withdraw(posted.handle)
        # Writes that fold nothing, or only later records, are not fenced by it.
        a.mailbox.post(b"later")
        later = a.mailbox.read(record.position)
        assert [r.data for r in later] == [b"later"]
        state, _, has_set = a.set_state(b"v3", token, later)
        assert (state, has_set) == (b"v3", True)

    def test_liveness_beat_forget_and_expiry(self, make_backend):
        a, b = make_backend("run-live"), make_backend("run-live")
        ttl = self.liveness_ttl
        a.liveness.beat("node-a", ttl)
        b.liveness.beat("node-b", ttl)
        assert b.liveness.alive(["node-a", "node-b", "node-x"], ttl) == {"node-a", "node-b"}
        b.liveness.forget("node-b")
        # A current answer comes from the server itself: another backend's forget shows at once.
        assert a.liveness.alive(["node-a", "node-b"], ttl, current=True) == {"node-a"}
        assert a.liveness.alive(["node-a", "node-b"], ttl) == {"node-a"}
        deadline = time.monotonic() + ttl * 6 + 5
        while "node-a" in a.liveness.alive(["node-a"], ttl) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert a.liveness.alive(["node-a"], ttl) == set()

    def test_a_node_beating_before_it_announces_is_alive_once_its_post_or_its_next_beat_is_in(self, make_backend):
        a, b = make_backend("run-announcing"), make_backend("run-announcing")
        ttl = self.liveness_ttl
        a.liveness.beat("node-a", ttl, announcing=True)
        a.mailbox.post(b"join", poster="node-a")
        assert b.liveness.alive(["node-a"], ttl, current=True) == {"node-a"}
        b.liveness.beat("node-b", ttl, announcing=True)  # no post follows
        b.liveness.beat("node-b", ttl)
        assert a.liveness.alive(["node-b"], ttl, current=True) == {"node-b"}

    def _lapse(self, backend, node: str) -> None:
        """Wait until ``node`` (which stopped beating) is dead on the server."""
        ttl = self.liveness_ttl
        deadline = time.monotonic() + ttl * 6 + 5
        while node in backend.liveness.alive([node], ttl, current=True) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert backend.liveness.alive([node], ttl, current=True) == set()

    def test_liveness_held_through_a_write_made_while_the_node_beat(self, make_backend):
        a = make_backend("run-held")
        a.liveness.beat("node-a", self.liveness_ttl)
        since = time.monotonic()
        _, token, _ = a.set_state(b"v1", member="node-a")
        assert a.liveness.held_since("node-a", token, since)
        assert not a.liveness.held_since("node-x", token, since)

    def test_liveness_that_lapsed_since_a_write_did_not_hold_through_it(self, make_backend):
        a = make_backend("run-held-lapsed")
        a.liveness.beat("node-a", self.liveness_ttl)
        since = time.monotonic()
        _, token, _ = a.set_state(b"v1")
        self._lapse(a, "node-a")
        a.liveness.beat("node-a", self.liveness_ttl)  # alive again: a new stretch, after the write
        assert a.liveness.alive(["node-a"], self.liveness_ttl, current=True) == {"node-a"}
        assert not a.liveness.held_since("node-a", token, since)
        # A state written after it beat again is covered.
        _, later, _ = a.set_state(b"v2", token)
        assert a.liveness.held_since("node-a", later, time.monotonic())

    def test_a_write_naming_a_lapsed_member_does_not_land(self, make_backend):
        from rdzv_common.backend import LivenessLapsed

        a = make_backend("run-member")
        a.liveness.beat("node-a", self.liveness_ttl)
        _, token, _ = a.set_state(b"v1", member="node-a")
        self._lapse(a, "node-a")
        if not self.fences_member:
            assert a.set_state(b"v2", token, member="node-a")[2]
            return
        try:
            a.set_state(b"v2", token, member="node-a")
        except LivenessLapsed as lapse:
            assert "node-a" in str(lapse)
        else:
            raise AssertionError("a write naming a lapsed member landed")
        assert a.get_state() == (b"v1", token)
        a.liveness.beat("node-a", self.liveness_ttl)
        state, _, has_set = a.set_state(b"v2", token, member="node-a")
        assert (state, has_set) == (b"v2", True)

    # Quarantine: entries are shared by every backend of the run, end by themselves, and are
    # private to their run.

    def test_quarantine_is_shared_and_isolated(self, make_backend):
        from rdzv_common.backend import QuarantineEntry

        a, b, other = make_backend("run-q"), make_backend("run-q"), make_backend("run-q-other")
        assert a.quarantine.get("10.0.0.7") is None
        entry = QuarantineEntry("10.0.0.7", time.time() + 60, "health check failed: exit status 1", 2)
        a.quarantine.put(entry)
        seen = _soon(lambda: b.quarantine.get("10.0.0.7"), lambda e: e is not None)
        assert (seen.host, seen.reason, seen.strikes) == ("10.0.0.7", entry.reason, 2)
        assert abs(seen.until - entry.until) < 2
        assert [e.host for e in b.quarantine.entries()] == ["10.0.0.7"]
        assert other.quarantine.get("10.0.0.7") is None and other.quarantine.entries() == []
        b.quarantine.remove("10.0.0.7")
        assert _soon(lambda: a.quarantine.get("10.0.0.7"), lambda e: e is None) is None
        assert a.quarantine.entries() == []

    def test_quarantine_ends_by_itself(self, make_backend):
        from rdzv_common.backend import QuarantineEntry

        a = make_backend("run-q-end")
        a.quarantine.put(QuarantineEntry("host-a", time.time() + self.liveness_ttl, "operator"))
        assert a.quarantine.get("host-a") is not None
        deadline = time.monotonic() + self.liveness_ttl + 5
        while a.quarantine.get("host-a") is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert a.quarantine.get("host-a") is None
        assert a.quarantine.entries() == []

    def test_lapses_are_counted_per_host_within_the_window(self, make_backend):
        a, b = make_backend("run-lapse"), make_backend("run-lapse")
        assert a.quarantine.note_lapse("host-a", 600) == 1
        assert b.quarantine.note_lapse("host-a", 600) == 2
        assert b.quarantine.note_lapse("host-b", 600) == 1
        time.sleep(self.liveness_ttl + 0.1)
        assert a.quarantine.note_lapse("host-a", self.liveness_ttl) == 1


def _soon(read, done, timeout: float = 5.0):
    """``read()`` once ``done`` holds for it, or its last value after ``timeout`` seconds: another
    backend's quarantine change may take a moment to reach this one (the etcd backend's run view)."""
    deadline = time.monotonic() + timeout
    while not done(value := read()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value
