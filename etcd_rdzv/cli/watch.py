"""``watch``: follow a run's keys with an etcd watch and print each change until a count, a timeout
or Ctrl-C; as text for a person, or (``--json``) one JSON object a line for a program."""

from __future__ import annotations

import argparse
import json
import threading
import time
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import etcd3
from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from ..keys import prefix_range
from ..run import EtcdClient, Watch, WatchCanceled, WatchCompacted
from .changes import RunWatcher, state_summary
from .options import CliError
from .output import emit, emit_all
from .runs import read_run

# How often ``watch``'s main thread wakes up to act on a Ctrl-C.
SIGNAL_CHECK_SECONDS = 0.2


def _stamp(revision: int, line: str) -> str:
    return f"{time.strftime('%H:%M:%S')} [rev {revision}] {line}"


@dataclass
class Printer:
    """Prints ``watch``'s lines: stamped text, or with ``as_json`` one JSON object per line with
    the change's text, the run's state after it (``None`` while there is none, or it is corrupt)
    and the nodes with a liveness key."""

    run_id: str
    as_json: bool

    def __call__(self, revision: int, lines: list[str], watcher: RunWatcher) -> None:
        if not self.as_json:
            emit_all(_stamp(revision, line) for line in lines)
            return
        state = state_summary(watcher.state) if watcher.state is not None else None
        for line in lines:
            doc = {"time": round(time.time(), 3), "revision": revision, "run_id": self.run_id, "change": line,
                   "state": state, "alive": sorted(watcher.alive)}
            emit(json.dumps(doc))


@dataclass
class WatchLimits:
    """When ``watch`` stops: after ``count`` changes, at monotonic time ``deadline``, or on ``stop``
    (from another thread), which also cancels the watch stream in progress (``watch``)."""

    count: int | None
    deadline: float
    printer: Printer
    seen: int = 0
    stopped: threading.Event = field(default_factory=threading.Event)
    watch: Watch | None = None

    def done(self) -> bool:
        return (
            self.stopped.is_set()
            or (self.count is not None and self.seen >= self.count)
            or time.monotonic() >= self.deadline
        )

    def stop(self) -> None:
        self.stopped.set()
        if self.watch is not None:
            self.watch.cancel()

    def remaining(self) -> float | None:
        """Seconds left, ``None`` without a deadline."""
        return None if self.deadline == float("inf") else max(0.0, self.deadline - time.monotonic())


def _report(revision: int, lines: list[str], limits: WatchLimits, watcher: RunWatcher) -> None:
    """Print ``lines`` as one change; they count toward ``--count`` once, if there are any."""
    if lines:
        limits.printer(revision, lines, watcher)
        limits.seen += 1


def follow(client: etcd3.MultiEndpointEtcd3Client, watcher: RunWatcher, limits: WatchLimits) -> bool:
    """Stream the events on the run's keys (its directory) from ``watcher.revision`` and report
    each change until ``limits`` are reached; call it within a request, which resumes from the
    last change seen.

    Returns:
        ``False`` if etcd compacted the history the watch started in: re-read the run.

    Raises:
        CliError: etcd cancelled the watch (e.g. for lack of permission).
    """
    start, end = prefix_range(watcher.layout.root)
    if limits.done():
        return True
    watch = Watch(client, start, end, watcher.revision, timeout=limits.remaining())
    limits.watch = watch
    try:
        for reply in watch:
            for event in reply.events:
                if limits.done():
                    break
                _report(event.kv.mod_revision, watcher.on_event(event), limits, watcher)
            if limits.done():
                break
        return True
    except WatchCompacted:
        return False
    except WatchCanceled as exc:
        raise CliError(f"etcd cancelled the watch on {watcher.layout.root}: {exc}") from None
    finally:
        limits.watch = None
        watch.cancel()


def _follow_with_retries(etcd: EtcdClient, watcher: RunWatcher, limits: WatchLimits) -> bool:
    """``follow`` as a request. A watch that ran longer than ``read_timeout`` before failing gets a
    fresh request, and with it the full retry budget, so that it rides out a short etcd outage."""
    while True:
        began = time.monotonic()
        try:
            return etcd.request(lambda c: follow(c, watcher, limits))
        except RendezvousConnectionError:
            if time.monotonic() - began < etcd.config.read_timeout or limits.done():
                raise


def watch_run(etcd: EtcdClient, run_id: str, limits: WatchLimits) -> None:
    """Print how the run looks, then each change to it, until ``limits`` are reached."""
    keys = read_run(etcd, run_id)
    watcher = RunWatcher(keys)
    limits.printer(keys.revision, [f"watching run '{run_id}': {watcher.describe()}"], watcher)
    while not limits.done():
        if not _follow_with_retries(etcd, watcher, limits):
            keys = read_run(etcd, run_id)
            _report(keys.revision, watcher.on_snapshot(keys), limits, watcher)


def cmd_watch(etcd: EtcdClient, args: argparse.Namespace) -> int:
    """Print each change to a run until ``--count`` changes, ``--timeout`` or Ctrl-C (exit 0).

    The watch runs in a worker thread while this one waits in short steps (a signal that lands on
    one of gRPC's threads is only acted on once this thread runs Python code): a Ctrl-C raised
    inside gRPC's own code can leave its channel unable to close, so it is taken here, where it
    ends the watch by cancelling it.
    """
    deadline = time.monotonic() + args.timeout if args.timeout is not None else float("inf")
    limits = WatchLimits(args.count, deadline, Printer(args.run_id, args.json))
    with ThreadPoolExecutor(1, thread_name_prefix="etcd-rdzv-watch") as pool:
        watching = None
        # From before the watch starts: a Ctrl-C that came before this thread reached its wait
        # left the watch running, and the pool's exit waited for it for ever.
        try:
            watching = pool.submit(watch_run, etcd, args.run_id, limits)
            while not watching.done():
                futures.wait([watching], timeout=SIGNAL_CHECK_SECONDS)
        except KeyboardInterrupt:
            limits.stop()
        if watching is not None:
            watching.result()
    return 0
