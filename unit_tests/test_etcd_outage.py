"""How the etcd client reports an outage (``outage.py``) and tells a silent connection from a slow
etcd (``silence.py``), on a clock the test moves."""

from __future__ import annotations

import logging

from etcd_rdzv.runtime.client import MIN_SILENT_SECONDS, WARN_AFTER_SECONDS, Hearing, Unanswered, silent_after


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_outage_is_warned_of_once_a_few_seconds_in_and_its_end_told(caplog):
    """An unreachable etcd was first reported when the third request that waited it out gave up
    (124 s with the defaults); a leader election must not be reported at all."""
    caplog.set_level(logging.INFO, logger="etcd_rdzv.runtime.client")
    clock = Clock()
    unanswered = Unanswered("etcd at http://h:2379", "read_timeout=60s", clock)
    for _ in range(4):
        unanswered.failed("UNAVAILABLE: Connection refused")
        clock.now += WARN_AFTER_SECONDS / 4
    assert caplog.records == []
    unanswered.failed("UNAVAILABLE: Connection refused")
    for _ in range(10):
        clock.now += 1
        unanswered.failed("UNAVAILABLE: Connection refused")
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "etcd at http://h:2379 has served no request for 3s" in warning.getMessage()
    assert "Connection refused" in warning.getMessage() and "read_timeout=60s" in warning.getMessage()
    unanswered.answered()
    assert caplog.records[-1].getMessage() == "etcd at http://h:2379 answers again, after 13.0s."
    # A short stretch after it is not reported; a long one is, again.
    caplog.clear()
    unanswered.failed("x")
    unanswered.answered()
    assert caplog.records == []
    unanswered.failed("x")
    clock.now += WARN_AFTER_SECONDS
    unanswered.failed("x")
    assert len(caplog.records) == 1


def test_a_renewal_waits_a_fifth_of_its_leases_ttl_on_a_silent_connection():
    assert silent_after(15, 15) == 3.0  # the default liveness TTL: 5 s x 3
    assert silent_after(10, 15) == MIN_SILENT_SECONDS  # the session's
    assert silent_after(7200, 15) == 15  # the run's lease: an attempt's timeout
    assert silent_after(None, 2.5) == 2.5


def test_hearing_counts_the_quiet_since_the_last_word_on_each_endpoint():
    clock = Clock()
    hearing = Hearing(clock)
    hearing.heard("a:1")
    clock.now += 4
    hearing.heard("b:1")
    assert hearing.quiet_for("a:1") == 4 and hearing.quiet_for("b:1") == 0
    assert hearing.quiet_for("c:1") == float("inf")
