"""``watch``: follow a run's keys with an etcd watch and print each change until a count, a timeout
or Ctrl-C."""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import etcd3
import grpc
from etcd3 import etcdrpc
from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from ..client import EtcdClient, fail_over
from .changes import RunWatcher
from .options import CliError
from .output import emit, emit_all
from .runs import prefix_range, read_run_keys

# How often ``watch``'s main thread wakes up to act on a Ctrl-C.
SIGNAL_CHECK_SECONDS = 0.2


def _stamp(revision: int, line: str) -> str:
    return f"{time.strftime('%H:%M:%S')} [rev {revision}] {line}"


@dataclass
class WatchLimits:
    """When ``watch`` stops: after ``count`` changes, at monotonic time ``deadline``, or on ``stop``
    (from another thread), which also cancels the watch stream in progress (``call``)."""

    count: int | None
    deadline: float
    seen: int = 0
    stopped: threading.Event = field(default_factory=threading.Event)
    call: grpc.Future | None = None

    def done(self) -> bool:
        return (
            self.stopped.is_set()
            or (self.count is not None and self.seen >= self.count)
            or time.monotonic() >= self.deadline
        )

    def stop(self) -> None:
        self.stopped.set()
        if self.call is not None:
            self.call.cancel()

    def remaining(self) -> float | None:
        """Seconds left, ``None`` without a deadline."""
        return None if self.deadline == float("inf") else max(0.0, self.deadline - time.monotonic())


def _report(revision: int, lines: list[str], limits: WatchLimits) -> None:
    """Print ``lines`` as one change; they count toward ``--count`` once, if there are any."""
    if lines:
        emit_all(_stamp(revision, line) for line in lines)
        limits.seen += 1


def follow(client: etcd3.MultiEndpointEtcd3Client, watcher: RunWatcher, limits: WatchLimits) -> bool:
    """Stream the events on the run's keys from ``watcher.revision`` and report each change until
    ``limits`` are reached; call it within a request, which resumes from the last change seen.

    The range watched is ``[state key, state key + "0")``: the state key and everything under
    ``<state key>/``, plus keys of runs whose id extends this one (``run-1-b``), which
    ``RunWatcher`` ignores.

    Returns:
        ``False`` if etcd compacted the history the watch started in: re-read the run.

    Raises:
        CliError: etcd cancelled the watch (e.g. for lack of permission).
    """
    _, end = prefix_range(watcher.key + "/")
    create = etcdrpc.WatchCreateRequest(key=watcher.key.encode(), range_end=end, start_revision=watcher.revision)
    done = threading.Event()

    def requests() -> Iterator[etcdrpc.WatchRequest]:
        yield etcdrpc.WatchRequest(create_request=create)
        done.wait()  # ending the request stream would end the watch on the server

    call = etcdrpc.WatchStub(client.channel).Watch(requests(), timeout=limits.remaining(), metadata=client.metadata)
    limits.call = call
    try:
        if limits.done():
            return True
        for response in call:
            if response.compact_revision:
                return False
            if response.canceled:
                reason = response.cancel_reason or "no reason given"
                raise CliError(f"etcd cancelled the watch on {watcher.key}: {reason}")
            for event in response.events:
                if limits.done():
                    break
                _report(event.kv.mod_revision, watcher.on_event(event), limits)
            if limits.done():
                break
        return True
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED or limits.done():
            return True
        fail_over(client, exc)
    finally:
        limits.call = None
        done.set()
        call.cancel()


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
    keys = read_run_keys(etcd, run_id)
    watcher = RunWatcher(keys)
    emit(_stamp(keys.revision, f"watching run '{run_id}': {watcher.describe()}"))
    while not limits.done():
        if not _follow_with_retries(etcd, watcher, limits):
            keys = read_run_keys(etcd, run_id)
            _report(keys.revision, watcher.on_snapshot(keys), limits)


def cmd_watch(etcd: EtcdClient, args: argparse.Namespace) -> int:
    """Print each change to a run until ``--count`` changes, ``--timeout`` or Ctrl-C (exit 0).

    The watch runs in a worker thread while this one waits in short steps (a signal that lands on
    one of gRPC's threads is only acted on once this thread runs Python code): a Ctrl-C raised
    inside gRPC's own code can leave its channel unable to close, so it is taken here, where it
    ends the watch by cancelling it.
    """
    deadline = time.monotonic() + args.timeout if args.timeout is not None else float("inf")
    limits = WatchLimits(args.count, deadline)
    with ThreadPoolExecutor(1, thread_name_prefix="etcd-rdzv-watch") as pool:
        watching = pool.submit(watch_run, etcd, args.run_id, limits)
        try:
            while not watching.done():
                futures.wait([watching], timeout=SIGNAL_CHECK_SECONDS)
        except KeyboardInterrupt:
            limits.stop()
        watching.result()
    return 0
