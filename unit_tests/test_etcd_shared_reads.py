"""Reads shared by the nodes of a process (``etcd_rdzv/shared_reads.py``), over a stand-in request."""

from __future__ import annotations

import threading
import time

import pytest
from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from etcd_rdzv.runtime.cache import SharedReads

pytestmark = pytest.mark.timeout(30)


class _Requests:
    """Requests that each wait to be let through, and answer with their own number."""

    def __init__(self, fail_from: int | None = None) -> None:
        self._lock = threading.Lock()
        self.sent = 0
        self.in_air = 0
        self.most_in_air = 0
        self.gates: list[threading.Event] = [threading.Event() for _ in range(10)]
        self._fail_from = fail_from

    def __call__(self) -> int:
        with self._lock:
            self.sent += 1
            number = self.sent
            self.in_air += 1
            self.most_in_air = max(self.most_in_air, self.in_air)
        self.gates[number - 1].wait(10)
        with self._lock:
            self.in_air -= 1
        if self._fail_from is not None and number >= self._fail_from:
            raise RendezvousConnectionError(f"request {number} failed")
        return number

    def wait_sent(self, count: int) -> None:
        deadline = time.monotonic() + 10
        while self.sent < count:
            assert time.monotonic() < deadline, f"only {self.sent} of {count} requests went out"
            time.sleep(0.01)


def _start(shared: SharedReads, kind: str, request, answers: dict, name: str) -> threading.Thread:
    def read() -> None:
        try:
            answers[name] = shared.read(kind, request)
        except Exception as exc:
            answers[name] = exc

    thread = threading.Thread(target=read)
    thread.start()
    return thread


def _boarded(shared: SharedReads, kind: str) -> None:
    """Give the readers just started time to board (they do nothing else before they wait)."""
    time.sleep(0.2)
    assert kind in shared._boarding


def test_readers_that_come_while_a_read_is_in_the_air_share_the_next_one():
    shared, requests, answers = SharedReads(), _Requests(), {}
    first = _start(shared, "state", requests, answers, "first")
    requests.wait_sent(1)
    later = [_start(shared, "state", requests, answers, f"r{i}") for i in range(20)]
    _boarded(shared, "state")
    assert requests.sent == 1  # the next flight waits for the one in the air
    requests.gates[0].set()
    first.join(10)
    requests.wait_sent(2)
    requests.gates[1].set()
    for thread in later:
        thread.join(10)
    assert requests.sent == 2 and requests.most_in_air == 1
    # Each reader is answered by a request sent after it came: the first by its own, the rest by
    # the second, none by the one already in the air when it came.
    assert answers == {"first": 1, **{f"r{i}": 2 for i in range(20)}}


def test_a_failed_read_fails_every_reader_aboard_with_an_error_of_its_own():
    shared, requests, answers = SharedReads(), _Requests(fail_from=2), {}
    first = _start(shared, "state", requests, answers, "first")
    requests.wait_sent(1)
    later = [_start(shared, "state", requests, answers, f"r{i}") for i in range(3)]
    _boarded(shared, "state")
    for gate in requests.gates:
        gate.set()
    for thread in [first, *later]:
        thread.join(10)
    assert answers["first"] == 1
    errors = [answers[f"r{i}"] for i in range(3)]
    assert all(isinstance(e, RendezvousConnectionError) and str(e) == "request 2 failed" for e in errors)
    assert len({id(e) for e in errors}) == 3
    # Nothing is left over: the next reader sends a request of its own.
    assert shared.read("state", lambda: "fresh") == "fresh"


def test_reads_of_different_kinds_do_not_wait_for_each_other():
    shared, requests, answers = SharedReads(), _Requests(), {}
    threads = [_start(shared, kind, requests, answers, kind) for kind in ("state", ("joins", 7), "alive")]
    requests.wait_sent(3)
    assert requests.most_in_air == 3
    for gate in requests.gates:
        gate.set()
    for thread in threads:
        thread.join(10)
    assert sorted(answers.values()) == [1, 2, 3]
    assert shared._boarding == {} and shared._flying == {}


class _Unrebuildable(Exception):
    def __init__(self, code: int, where: str) -> None:
        super().__init__(f"{code} at {where}")


def test_an_error_whose_class_cannot_be_rebuilt_still_reaches_every_reader_aboard():
    shared, requests, answers = SharedReads(), _Requests(), {}
    first = _start(shared, "state", requests, answers, "first")
    requests.wait_sent(1)

    def failing() -> int:
        raise _Unrebuildable(14, "127.0.0.1:2379")

    later = [_start(shared, "state", failing, answers, f"r{i}") for i in range(3)]
    _boarded(shared, "state")
    requests.gates[0].set()
    for thread in [first, *later]:
        thread.join(10)
    assert all(isinstance(answers[f"r{i}"], _Unrebuildable) for i in range(3))
    assert str(answers["r0"]) == "14 at 127.0.0.1:2379"
