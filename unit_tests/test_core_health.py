"""Health-gated admission: the check, the doubling cool-down, quarantine shared through the
backend, and lapses that quarantine a host. Time is faked: sleeping advances both clocks."""

from __future__ import annotations

import logging

import pytest
from torch.distributed.elastic.rendezvous import RendezvousError

from rdzv_common.backend import QuarantineEntry
from rdzv_common.health import MAX_COOLDOWN, Admission, cooldown, run_check
from rdzv_common.memory import MemoryBackend, MemoryStore
from rdzv_common.settings import RendezvousSettings
from rdzv_common.state import NodeDesc

NODE = NodeDesc("10.0.0.5", 42, 0)


class FakeTime:
    def __init__(self) -> None:
        self.now = 1_000.0
        self.slept: list[float] = []
        self.on_sleep = lambda: None

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        self.on_sleep()


def _script(tmp_path, body: str) -> str:
    path = tmp_path / "check.sh"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def _admission(tmp_path, body: str | None, fake: FakeTime, **kw):
    check = _script(tmp_path, body) if body is not None else None
    settings = RendezvousSettings("health-run", 1, 2, health_check=check, health_cooldown=10, **kw)
    store = MemoryStore(wall_clock=fake.wall)
    backend = MemoryBackend(store, "health-run")
    return Admission(NODE, settings, backend.quarantine, fake.monotonic, fake.wall, fake.sleep), backend


def test_check_sees_run_round_and_node_and_passing_admits(tmp_path):
    fake = FakeTime()
    out = tmp_path / "env.txt"
    admission, backend = _admission(
        tmp_path, f'echo "$TORCH_RDZV_RUN_ID $TORCH_RDZV_ROUND $TORCH_RDZV_NODE $TORCH_RDZV_HOST" > {out}\n', fake
    )
    admission.admit(3, fake.now + 60)
    assert out.read_text().split() == ["health-run", "3", NODE.key, NODE.addr]
    assert backend.quarantine.entries() == [] and fake.slept == []


def test_failing_check_quarantines_with_doubling_cooldown_then_fails_naming_check_and_output(tmp_path, caplog):
    fake = FakeTime()
    admission, backend = _admission(tmp_path, "echo starting\necho 'GPU 3 missing' >&2\nexit 3\n", fake)
    seen: list[QuarantineEntry] = []
    put = backend.quarantine.put
    backend.quarantine.put = lambda entry: (seen.append(entry), put(entry))
    with caplog.at_level(logging.WARNING), pytest.raises(RendezvousError) as info:
        admission.admit(0, fake.now + 65)
    # 10 s, then 20 s, then 40 s (which the deadline cuts short).
    assert [round(e.until - w) for e, w in zip(seen, [1_700_001_000.0, 1_700_001_010.0, 1_700_001_030.0])] == [10, 20, 40]
    assert [e.strikes for e in seen] == [1, 2, 3]
    assert all(e.host == NODE.addr and "GPU 3 missing" in e.reason for e in seen)
    message = str(info.value)
    assert "check.sh" in message and "exit status 3" in message and "GPU 3 missing" in message
    assert "GPU 3 missing" in caplog.text and "quarantined for 10s" in caplog.text
    assert fake.now >= 1_065.0


def test_check_passes_after_a_failure_and_resets_the_cooldown(tmp_path):
    fake = FakeTime()
    flag = tmp_path / "healthy"
    admission, backend = _admission(tmp_path, f"test -e {flag}\n", fake)
    fake.on_sleep = flag.touch
    admission.admit(0, fake.now + 60)
    assert sum(fake.slept) == pytest.approx(10)
    # The next failure starts the cool-down from the base again.
    flag.unlink()
    fake.on_sleep = lambda: None
    with pytest.raises(RendezvousError):
        admission.admit(1, fake.now + 1)
    assert backend.quarantine.get(NODE.addr).strikes == 1


def test_a_quarantined_host_waits_even_if_its_check_passes(tmp_path):
    fake = FakeTime()
    admission, backend = _admission(tmp_path, "exit 0\n", fake)
    backend.quarantine.put(QuarantineEntry(NODE.addr, fake.wall() + 7, "operator"))
    admission.admit(0, fake.now + 60)
    assert sum(fake.slept) == pytest.approx(7)


def test_quarantine_without_a_check_also_blocks_and_times_out_naming_the_reason(tmp_path):
    fake = FakeTime()
    admission, backend = _admission(tmp_path, None, fake)
    backend.quarantine.put(QuarantineEntry(NODE.addr, fake.wall() + 600, "liveness lapsed 2 times"))
    with pytest.raises(RendezvousError, match=r"host 10.0.0.5 is quarantined for 595s more \(liveness lapsed 2 times\)"):
        admission.admit(0, fake.now + 5)


def test_timeout_and_unrunnable_checks_fail(tmp_path):
    result = run_check(_script(tmp_path, "echo slow\nsleep 5\n"), 0.5, {})
    assert not result.healthy and "timed out after 0.5s" in result.status
    result = run_check(str(tmp_path / "missing"), 1, {})
    assert not result.healthy and "could not be run" in result.status


def test_only_the_last_output_lines_are_kept(tmp_path):
    result = run_check(_script(tmp_path, "for i in $(seq 1 50); do echo line$i; done\nexit 1\n"), 5, {})
    assert result.output.splitlines() == [f"line{i}" for i in range(41, 51)]


def test_cooldown_doubles_and_is_capped():
    assert [cooldown(60, k) for k in range(1, 7)] == [60, 120, 240, 480, 960, 1800]
    assert cooldown(60, 1000) == MAX_COOLDOWN


def test_a_host_whose_liveness_lapses_twice_is_quarantined(tmp_path):
    fake = FakeTime()
    admission, backend = _admission(tmp_path, "exit 0\n", fake)
    other = NodeDesc("10.0.0.8", 1, 0)
    admission.note_lapses([other])
    assert backend.quarantine.get("10.0.0.8") is None
    admission.note_lapses([NodeDesc("10.0.0.8", 2, 0), NodeDesc("10.0.0.9", 1, 0)])
    entry = backend.quarantine.get("10.0.0.8")
    assert entry is not None and "liveness lapsed 2 times within 10 min" in entry.reason
    assert entry.until - fake.wall() == pytest.approx(10)
    assert backend.quarantine.get("10.0.0.9") is None
    # Lapses older than the window no longer count.
    fake.now += 601
    admission.note_lapses([other])
    assert backend.quarantine.get("10.0.0.8") is None
