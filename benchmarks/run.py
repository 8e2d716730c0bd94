"""Benchmark CLI: rendezvous time vs N for ours (etcd_rdzv, c10d_rdzv) and torch's (etcd-v2, c10d).

    python -m benchmarks.run --quick                 # make bench: a few minutes on 2 cores
    python -m benchmarks.run --full                  # N up to 256, and 1024 for ours
    python -m benchmarks.run --n 8,32 --backends c10d,etcd-v2 --cap 30 --repeat 3 --procs 2

Every (backend, scenario, N, trial) runs in fresh worker processes, capped; once a backend times
out at some N, its larger N are not run. Writes ``<out>/<name>.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from contextlib import ExitStack
from pathlib import Path

# torchrun's plugin registry logs a traceback for every entry point that fails to load (ours, while
# they are being written); the harness reports unavailable backends itself.
logging.getLogger("torch.distributed.elastic.rendezvous.registry").setLevel(logging.ERROR)

from . import report, trial  # noqa: E402
from .trial import LEAVE_SCENARIOS, SCENARIOS  # noqa: E402
from .backends import BACKENDS, unavailable  # noqa: E402
from .servers import EtcdServer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

PRESETS = {
    # Torch's etcd-v2 can take tens of seconds (or far more) at N >= 64 on a 2-core machine, and a
    # capped run costs its whole cap: cap every backend at 20 s. The rejoin/exit scenarios cost a
    # first round plus ~4 s of failure detection per point, so quick runs them at N <= 32 only; the
    # whole quick run is meant to stay near 6 minutes.
    "quick": dict(n=[8, 32, 64, 128, 256], cap=20.0, torch_cap=20.0, torch_max_n=128,
                  rejoin_max_n=32, torch_rejoin_max_n=32),
    "full": dict(n=[8, 32, 64, 128, 256, 1024], cap=300.0, torch_cap=120.0, torch_max_n=256,
                 rejoin_max_n=None, torch_rejoin_max_n=256),
    "custom": dict(n=[8, 32, 64, 128], cap=60.0, torch_cap=None, torch_max_n=None,
                   rejoin_max_n=None, torch_rejoin_max_n=None),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small N, tight caps for torch's backends")
    mode.add_argument("--full", action="store_true", help="N up to 256, and 1024 for ours")
    p.add_argument("--n", help="comma-separated node counts, e.g. 8,32,64")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated subset of {','.join(BACKENDS)}")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)}")
    p.add_argument("--procs", type=int, default=1, help="spread the N nodes over this many processes")
    p.add_argument("--cap", type=float, help="seconds allowed per phase before a run is reported as timed out")
    p.add_argument("--torch-cap", type=float, help="cap for torch's backends (default: --cap)")
    p.add_argument("--torch-max-n", type=int, help="largest N run for torch's backends")
    p.add_argument("--rejoin-max-n", type=int, help="largest N of the rejoin and exit scenarios for every backend")
    p.add_argument("--torch-rejoin-max-n", type=int, help="largest N of the rejoin and exit scenarios for torch's backends")
    p.add_argument("--repeat", type=int, default=1, help="trials per point (the median is reported)")
    p.add_argument("--last-call", type=float, default=1.0, help="rejoin/exit: last_call_timeout")
    p.add_argument("--keep-alive", type=float, default=1.0, help="rejoin/exit: keep_alive_interval")
    p.add_argument("--keep-alive-attempts", type=int, default=3, help="rejoin/exit: keep_alive_max_attempt")
    p.add_argument("--name", help="results file name (default: quick, full or custom)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = p.parse_args(argv)
    preset_name = "quick" if args.quick else "full" if args.full else "custom"
    preset = PRESETS[preset_name]
    args.name = args.name or preset_name
    args.n = sorted({int(x) for x in args.n.split(",")}) if args.n else preset["n"]
    args.cap = args.cap or preset["cap"]
    args.torch_cap = args.torch_cap or preset["torch_cap"] or args.cap
    args.torch_max_n = args.torch_max_n or preset["torch_max_n"] or max(args.n)
    args.rejoin_max_n = args.rejoin_max_n or preset["rejoin_max_n"] or max(args.n)
    args.torch_rejoin_max_n = min(args.torch_rejoin_max_n or preset["torch_rejoin_max_n"] or args.torch_max_n,
                                  args.rejoin_max_n)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for b in args.backends:
        if b not in BACKENDS:
            p.error(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    for s in args.scenarios:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r}; choose from {', '.join(SCENARIOS)}")
    if min(args.n) < 2:
        p.error("N must be at least 2")
    return args


def progress(i: int, total: int, r: dict) -> None:
    head = f"[{i:>3}/{total}] {r['backend']:<10} {r['scenario']:<6} N={r['n']:<5} t{r['trial']}"
    if r["status"] == "ok":
        c = r["phases"][-1]["counters"]
        tail = (f"{r['seconds']:8.2f} s   ranks ok; {c.get('set_state_calls', 0)} set_state "
                f"({c.get('set_state_bytes', 0) / 1024:.1f} KB)")
        if "mailbox_posts" in c:
            tail += f", {c['mailbox_posts']} posts ({c.get('mailbox_bytes', 0) / 1024:.1f} KB)"
        if "requests" in c:
            tail += f"; {c['requests'] / r['n']:.1f} requests/node"
        etcd = r["phases"][-1].get("etcd")
        if etcd:
            tail += (f"; etcd: {etcd.get('raft_entries', 0) / r['n']:.2f} raft entries/node, "
                     f"{etcd.get('cpu_seconds', 0):.2f} CPU s")
        if r["scenario"] == "exit":
            tail += "; leaver's exit hook ran" if r["phases"][-1].get("leaver_exit_hook") else "; no exit hook"
    elif r["status"] == "timeout":
        last = r["phases"][-1] if r["phases"] else {}
        tail = (f"timed out at cap {r['cap']:g} s ({last.get('returned', 0)}/{last.get('expected', r['n'])} "
                f"returned in phase {last.get('phase', '?')})")
    elif r["status"] == "skipped":
        tail = f"not run: {r.get('note', '')}"
    else:
        tail = f"{r['status'].upper()}: {'; '.join(r['errors'][:2])[:300]}"
    print(f"{head}  {tail}", flush=True)


def plan(args: argparse.Namespace, runnable: list[str]) -> list[tuple[str, str, int, int]]:
    items = []
    for n in args.n:
        for scenario in args.scenarios:
            for b in runnable:
                if BACKENDS[b].ours:
                    limit = args.rejoin_max_n if scenario in LEAVE_SCENARIOS else max(args.n)
                else:
                    limit = args.torch_rejoin_max_n if scenario in LEAVE_SCENARIOS else args.torch_max_n
                if n > limit:
                    continue
                items += [(b, scenario, n, t) for t in range(args.repeat)]
    return items


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    notes, runnable = [], []
    for b in args.backends:
        why = unavailable(b)
        if why:
            notes.append(f"{b} skipped: {why}")
            print(f"skipping {b}: {why}", flush=True)
        else:
            runnable.append(b)
    doc = {
        "name": args.name,
        "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": report.machine_info(),
        "settings": {
            "n": args.n, "backends": args.backends, "scenarios": args.scenarios, "procs": args.procs,
            "cap": args.cap, "torch_cap": args.torch_cap, "torch_max_n": args.torch_max_n,
            "rejoin_max_n": args.rejoin_max_n, "torch_rejoin_max_n": args.torch_rejoin_max_n, "repeat": args.repeat, "last_call": args.last_call,
            "keep_alive": args.keep_alive, "keep_alive_attempts": args.keep_alive_attempts,
            "command": " ".join(["python -m benchmarks.run"] + (sys.argv[1:] if argv is None else argv)),
        },
        "notes": notes,
        "runs": [],
    }
    paths = {ext: args.out / f"{args.name}.{ext}" for ext in ("json", "md", "png")}
    items = plan(args, runnable)
    timed_out: dict[tuple[str, str], int] = {}
    with ExitStack() as stack:
        endpoints: dict[str, str | None] = {"tcpstore": None}
        needed = {BACKENDS[b].server for b in runnable}
        for server, v2 in (("etcd-v3", False), ("etcd-v2", True)):
            if server in needed:
                etcd = stack.enter_context(EtcdServer(enable_v2=v2, name=server))
                endpoints[server] = etcd.endpoint
                doc["etcd_version"] = etcd.version
                print(f"started {server} etcd at {etcd.endpoint}", flush=True)
        started = time.monotonic()
        for i, (b, scenario, n, t) in enumerate(items, 1):
            cap = args.cap if BACKENDS[b].ours else args.torch_cap
            if (b, scenario) in timed_out and n >= timed_out[(b, scenario)]:
                r = {"backend": b, "scenario": scenario, "n": n, "trial": t, "cap": cap, "status": "skipped",
                     "seconds": None, "phases": [], "errors": [],
                     "note": f"timed out at N={timed_out[(b, scenario)]}"}
            else:
                settings = trial.Settings(cap=cap, procs=args.procs, last_call=args.last_call,
                                          keep_alive=args.keep_alive, keep_alive_attempts=args.keep_alive_attempts,
                                          setup_timeout=max(120.0, n * 0.5))
                r = trial.run(b, scenario, n, endpoints[BACKENDS[b].server], settings, trial=t)
                if r["status"] == "timeout":
                    timed_out[(b, scenario)] = n
            doc["runs"].append(r)
            progress(i, len(items), r)
            report.write_json(paths["json"], doc)
        doc["elapsed_s"] = time.monotonic() - started
    report.write_json(paths["json"], doc)
    report.write_markdown(paths["md"], doc)
    problem = report.write_plot(paths["png"], doc)
    print(f"wrote {paths['json']}, {paths['md']}" + (f" ({problem})" if problem else f", {paths['png']}"))
    print(f"total {doc['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
