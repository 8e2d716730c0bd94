"""One benchmark process: a share of the N nodes, each a thread with its own handler.

Started fresh for every run by ``trial.py`` as ``python -m benchmarks.worker '<spec json>'``. It
builds its handlers, reports ``ready``, then obeys JSON commands on stdin, one a line:

* ``{"cmd": "phase", "name": ..., "at": <unix time>, "leaver": <node index or null>, "leave": "crash"
  or "exit"}``: at ``at`` every node except the leaver calls ``next_rendezvous``; the leaver's
  keep-alives stop then, as if it died (``crash``), and with ``exit`` its handler's at-exit hook
  runs too, as when its process exits on SIGTERM. Replies ``phase_done`` once all returned, or at
  ``at + cap`` with what returned by then.
* ``{"cmd": "shutdown"}``: ``shutdown()`` on every handler, bounded; replies ``shutdown_done``.
* ``{"cmd": "exit"}`` or end of stdin: exit at once, abandoning any thread still blocked.

Replies go to stdout as lines starting with ``@@ `` followed by JSON; anything else is noise.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from . import metering
from .backends import build_handler, leave_at_exit, stop_heartbeats

SHUTDOWN_SECONDS = 30.0
BUILD_THREADS = 16


def emit(message: dict) -> None:
    sys.stdout.write("@@ " + json.dumps(message) + "\n")
    sys.stdout.flush()


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:400]


def build(spec: dict) -> dict:
    """Build this process's handlers: the first alone (it patches the metered classes), the rest on
    a few threads, since connecting to a store is mostly waiting. Only the set-up is faster; the
    timed phases do not depend on how the handlers were built."""
    def one(idx: int):
        return build_handler(
            spec["backend"], spec["endpoint"], spec["run_id"], spec["min_nodes"], spec["max_nodes"], spec["conf"]
        )

    first, count = spec["first"], spec["count"]
    handlers, metered = {}, []
    handlers[first], metered = one(first)
    with ThreadPoolExecutor(max_workers=BUILD_THREADS) as pool:
        for idx, (handler, _) in zip(range(first + 1, first + count), pool.map(one, range(first + 1, first + count))):
            handlers[idx] = handler
    return {"handlers": handlers, "metered": metered}


def run_phase(handlers: dict, cmd: dict, cap: float) -> dict:
    leaver = cmd.get("leaver")
    results: dict[int, dict] = {}
    go = threading.Event()

    def node(idx: int, handler) -> None:
        go.wait()
        try:
            info = handler.next_rendezvous()
            end = time.time()
            results[idx] = {"idx": idx, "end": end, "rank": info.rank, "world": info.world_size}
        except BaseException as e:  # a failed node is reported, never raised out of its thread
            results[idx] = {"idx": idx, "end": time.time(), "error": _error(e)}
        timings = getattr(handler, "last_timings", None)
        if timings is not None and idx in results:
            results[idx]["core_writes"] = getattr(timings, "writes", None)
            results[idx]["core_lost_writes"] = getattr(timings, "lost_writes", None)

    threads = [
        threading.Thread(target=node, args=(idx, h), daemon=True, name=f"bench-node-{idx}")
        for idx, h in handlers.items()
        if idx != leaver
    ]
    for t in threads:
        t.start()
    at = cmd["at"]
    time.sleep(max(0.0, at - time.time()))
    metering.take()
    left = exit_hook = exit_s = None
    if leaver in handlers:
        left = stop_heartbeats(handlers[leaver])
        if cmd.get("leave") == "exit":
            # What interpreter exit does for a process that got SIGTERM (no shutdown()): timed from
            # ``at`` like the survivors, who start once it is done (in this worker process).
            t0 = time.time()
            exit_hook = leave_at_exit(handlers[leaver])
            exit_s = time.time() - t0
    go.set()
    deadline = at + cap
    for t in threads:
        t.join(max(0.0, deadline - time.time()))
    counters = metering.take()
    done = dict(results)  # threads still running may add later; report a stable copy
    return {
        "event": "phase_done",
        "name": cmd["name"],
        "nodes": list(done.values()),
        "pending": len(threads) - len(done),
        "counters": counters,
        "leaver_silenced": left,
        "leaver_exit_hook": exit_hook,
        "leaver_exit_s": exit_s,
    }


def shutdown(handlers: dict) -> dict:
    started = time.monotonic()
    outcomes: list[bool] = []

    def one(handler) -> None:
        try:
            outcomes.append(bool(handler.shutdown()))
        except Exception:
            outcomes.append(False)

    threads = [threading.Thread(target=one, args=(h,), daemon=True) for h in handlers.values()]
    for t in threads:
        t.start()
    deadline = started + SHUTDOWN_SECONDS
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return {
        "event": "shutdown_done",
        "seconds": time.monotonic() - started,
        "ok": sum(outcomes),
        "failed": len(outcomes) - sum(outcomes),
        "pending": len(threads) - len(outcomes),
    }


def main() -> None:
    spec = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    started = time.monotonic()
    try:
        built = build(spec)
    except BaseException as e:
        emit({"event": "failed", "error": _error(e)})
        os._exit(1)
    emit({"event": "ready", "build_s": time.monotonic() - started, "metered": built["metered"]})
    handlers = built["handlers"]
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "phase":
            emit(run_phase(handlers, cmd, spec["cap"]))
        elif cmd["cmd"] == "shutdown":
            emit(shutdown(handlers))
        else:
            break
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: abandoned threads and client libraries may block it


if __name__ == "__main__":
    main()
