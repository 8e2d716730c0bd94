"""Receivers installed on torch's elastic event and metric channels, as a user of torch installs
them, for the tests that check what our handlers report there."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed.elastic.events as torch_events
import torch.distributed.elastic.events.handlers as torch_event_handlers
from torch.distributed.elastic import metrics


class EventLog(logging.Handler):
    """A logging handler for torch's ``dynamic_rendezvous`` event destination; keeps each event
    as the JSON dict torch serialises it to."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append(json.loads(record.getMessage()))

    def named(self, name: str) -> list[dict]:
        return [e for e in self.events if e["name"] == name]


@contextmanager
def torch_event_log() -> Iterator[EventLog]:
    """Install an ``EventLog`` as torch's handler of rendezvous events for the block."""
    log = EventLog()
    saved_handlers = dict(torch_event_handlers._log_handlers)
    saved_loggers = dict(torch_events._events_loggers)
    torch_event_handlers._log_handlers["dynamic_rendezvous"] = log
    # torch builds its events logger once per destination: drop it so it is built with ours.
    torch_events._events_loggers.pop("dynamic_rendezvous", None)
    try:
        yield log
    finally:
        logging.getLogger("torchelastic-events-dynamic_rendezvous").removeHandler(log)
        torch_event_handlers._log_handlers.clear()
        torch_event_handlers._log_handlers.update(saved_handlers)
        torch_events._events_loggers.clear()
        torch_events._events_loggers.update(saved_loggers)


class MetricLog(metrics.MetricHandler):
    """A torch metric handler that keeps every data point as (group, name, value)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.points: list[tuple[str, str, int]] = []

    def emit(self, metric_data: metrics.MetricData) -> None:
        with self._lock:
            self.points.append((metric_data.group_name, metric_data.name, metric_data.value))

    def values(self, name: str, group: str = "rdzv") -> list[int]:
        with self._lock:
            return [v for g, n, v in self.points if (g, n) == (group, name)]


@contextmanager
def torch_metric_log(group: str = "rdzv") -> Iterator[MetricLog]:
    """Configure a ``MetricLog`` as torch's metric handler of ``group`` for the block."""
    log = MetricLog()
    metrics.configure(log, group)
    try:
        yield log
    finally:
        metrics.configure(metrics.NullMetricHandler(), group)
