"""Observability on a real etcd: ``etcd-rdzv exporter`` as a separate process scraped over HTTP,
and torch's event and metric channels receiving what handlers on etcd report."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest
from prometheus_client.parser import text_string_to_metric_families
from torch.distributed.elastic.rendezvous import RendezvousParameters

from etcd_rdzv.plugin import create_handler
from rdzv_common.handler import DynamicRendezvousHandler
from unit_tests.torch_channels import torch_event_log, torch_metric_log

pytestmark = pytest.mark.timeout(90)


def _params(space, run_id: str, min_nodes: int, max_nodes: int, **conf: object) -> RendezvousParameters:
    return RendezvousParameters(
        backend="etcd_rdzv",
        endpoint=space.endpoint,
        run_id=run_id,
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        local_addr="127.0.0.1",
        key_prefix=space.key_prefix,
        read_timeout=10,
        join_timeout=30,
        last_call_timeout=0.5,
        # A node is dropped after 3 s without a heartbeat: not sooner, where a busy machine delays
        # heartbeats; the test's dead node ends its liveness at once, so it waits for none of it.
        keep_alive_interval=1,
        keep_alive_max_attempt=3,
        **conf,
    )


def _rendezvous(handlers: list[DynamicRendezvousHandler]) -> list:
    with ThreadPoolExecutor(len(handlers)) as pool:
        return list(pool.map(lambda h: h.next_rendezvous(), handlers))


class Exporter:
    """``python -m etcd_rdzv exporter`` on a free loopback port, stopped with SIGTERM."""

    def __init__(self, space) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_RDZV_")}
        # The connection comes from the environment, as for every other command.
        env.update(ETCD_RDZV_ENDPOINTS=space.endpoint, ETCD_RDZV_KEY_PREFIX=space.key_prefix)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "etcd_rdzv", "exporter", "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        banner = self.proc.stdout.readline()
        assert " on http://" in banner, (banner, self.proc.stderr.read() if self.proc.poll() is not None else "")
        self.url = banner.strip().rsplit(" on ", 1)[1]

    def scrape(self) -> dict[tuple[str, str], float]:
        """Every sample, keyed by (name, run_id or '')."""
        text = urllib.request.urlopen(self.url, timeout=5).read().decode()
        return {
            (s.name, s.labels.get("run_id", "")): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def wait_for(self, expected: dict[tuple[str, str], float], timeout: float = 15.0) -> dict[tuple[str, str], float]:
        deadline = time.monotonic() + timeout
        while True:
            samples = self.scrape()
            if all(samples.get(k) == v for k, v in expected.items()):
                return samples
            if time.monotonic() > deadline:
                wrong = {k: (samples.get(k), v) for k, v in expected.items() if samples.get(k) != v}
                raise AssertionError(f"(seen, expected) differ: {wrong}")
            time.sleep(0.2)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            # Closing the watch, the HTTP server and the gRPC channel: seconds on a busy machine.
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()
            self.proc.stderr.close()


@pytest.fixture
def exporter(etcd_run) -> Iterator[Exporter]:
    running = Exporter(etcd_run)
    try:
        yield running
    finally:
        running.stop()


def test_exporter_follows_every_run_under_the_prefix(etcd_run, exporter):
    job, other = f"{etcd_run.run_id}/a", f"{etcd_run.run_id}-b"  # ids that need escaping, and a neighbour
    handlers = [create_handler(_params(etcd_run, job, 2, 3)) for _ in range(3)]
    lone = create_handler(_params(etcd_run, other, 1, 1))
    everyone = [*handlers, lone]
    try:
        _rendezvous(handlers)
        _rendezvous([lone])
        samples = exporter.wait_for({
            ("torch_rdzv_round", job): 0, ("torch_rdzv_round_complete", job): 1,
            ("torch_rdzv_world_size", job): 3, ("torch_rdzv_participants", job): 3,
            ("torch_rdzv_live_nodes", job): 3, ("torch_rdzv_closed", job): 0,
            ("torch_rdzv_rounds_completed_total", job): 1,
            ("torch_rdzv_participants", other): 1, ("torch_rdzv_runs", ""): 2,
            ("torch_rdzv_exporter_watch_up", ""): 1,
        })
        assert 0 <= samples[("torch_rdzv_time_since_last_round_completed_seconds", job)] < 30
        first_revision = samples[("torch_rdzv_etcd_revision", "")]
        assert first_revision > 0

        # An operator quarantines a host; a node dies (its heartbeats stop, its lease lapses) and the
        # survivors form round 1 of two.
        quarantine = subprocess.run(
            [sys.executable, "-m", "etcd_rdzv", "--endpoints", etcd_run.endpoint, "--key-prefix",
             etcd_run.key_prefix, "quarantine", job, "--add", "10.9.9.9", "--for", "10m"],
            capture_output=True, text=True, timeout=30,
        )
        assert quarantine.returncode == 0, quarantine.stderr
        dead = handlers.pop()
        dead._stop_heartbeats()
        dead._backend.liveness.forget(dead.node.key)
        _rendezvous(handlers)
        samples = exporter.wait_for({
            ("torch_rdzv_round", job): 1, ("torch_rdzv_world_size", job): 2,
            ("torch_rdzv_live_nodes", job): 2, ("torch_rdzv_rounds_completed_total", job): 2,
            ("torch_rdzv_quarantined_hosts", job): 1, ("torch_rdzv_quarantined_hosts", other): 0,
        })
        assert samples[("torch_rdzv_etcd_revision", "")] > first_revision

        handlers[0].set_closed()
        exporter.wait_for({("torch_rdzv_closed", job): 1})
    finally:
        for handler in everyone:
            handler.shutdown()
    assert exporter.stop() == 0


def test_events_and_timings_reach_torchs_channels_on_etcd(etcd_run):
    with torch_event_log() as events, torch_metric_log() as metric_log:
        handlers = [create_handler(_params(etcd_run, etcd_run.run_id, 2, 2)) for _ in range(2)]
        try:
            infos = _rendezvous(handlers)
        finally:
            for handler in handlers:
                handler.shutdown()
    for handler, info in zip(handlers, infos):
        mine = [e for e in events.events if (e["pid"], e["local_id"]) == (handler.node.pid, handler.node.local_id)]
        names = [e["name"].split(":", 1)[1] for e in mine]
        assert names[0] == "DynamicRendezvousHandler.next_rendezvous"
        assert "_DistributedRendezvousOpExecutor._add_to_participants" in names
        joined = [e for e in mine if "has joined round 0" in e["message"]]
        assert len(joined) == 1 and joined[0]["rank"] == info.rank
        assert all(e["name"].startswith("dynamic_rendezvous.py:") and e["run_id"] == etcd_run.run_id for e in mine)
    assert len(events.named("dynamic_rendezvous.py:_DistributedRendezvousOpExecutor._mark_rendezvous_complete")) == 1
    assert events.named("dynamic_rendezvous.py:_DistributedRendezvousOpExecutor._mark_rendezvous_closed")
    assert metric_log.values("next_rendezvous.success") == [1, 1]
    totals = metric_log.values("next_rendezvous.duration.ms")
    assert sorted(totals) == sorted(round(h.last_timings.total * 1000) for h in handlers)
    assert sum(metric_log.values("next_rendezvous.writes")) == sum(h.last_timings.writes for h in handlers) >= 1


def test_deepspeeds_expressions_on_etcd(etcd_run):
    """What DeepSpeed's ``DSElasticAgent._invoke_run`` reads, on handlers whose liveness is etcd's."""
    handlers = [create_handler(_params(etcd_run, etcd_run.run_id, 2, 2)) for _ in range(2)]
    try:
        infos = _rendezvous(handlers)
        rdzv_handler = handlers[0]
        participants = rdzv_handler._state_holder.state.participants
        assert participants == {h.node: info.rank for h, info in zip(handlers, infos)}
        expire_time = datetime.utcnow() - (
            rdzv_handler._settings.keep_alive_interval * rdzv_handler._settings.keep_alive_max_attempt
        )
        heartbeats = rdzv_handler._state_holder.state.last_heartbeats
        assert set(heartbeats) == {h.node for h in handlers}
        assert [node for node, last_heartbeat in heartbeats.items() if last_heartbeat < expire_time] == []

        # The other node's liveness ends (its process is gone): once liveness is asked afresh it has
        # no heartbeat.
        gone = handlers[1]
        gone._stop_heartbeats()
        gone._backend.liveness.forget(gone.node.key)
        time.sleep(rdzv_handler.settings.keep_alive_interval * 1.5)
        assert set(rdzv_handler._state_holder.state.last_heartbeats) == {rdzv_handler.node}
        assert len(rdzv_handler._state_holder.state.participants) == 2  # the group stays until a new round
    finally:
        for handler in handlers:
            handler.shutdown()
