"""Where a join's client time goes: N nodes as threads of this one process against a fresh etcd,
each node's ``next_rendezvous()`` under a profiler of its own, the profiles merged.

    python -m benchmarks.profile_join --n 256 [--top 25] [--sort tottime]

The profiler slows the nodes down about twofold, so the time it prints is not a benchmark figure;
the ranking of functions is what it is for. Only the nodes' own calls are profiled: the threads
of the watch, the keep-alive streams and gRPC's are not (``python -m benchmarks.run`` times the
whole).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from .backends import build_handler
from .servers import EtcdServer, etcd_counters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_join", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=256, help="nodes (min = max = N)")
    parser.add_argument("--top", type=int, default=25, help="functions to list")
    parser.add_argument("--sort", default="tottime", help="a pstats sort key: tottime, cumtime, ncalls")
    args = parser.parse_args(argv)
    conf = {"join_timeout": 300, "read_timeout": 300, "last_call_timeout": 1}
    with EtcdServer(name="profile") as etcd:
        run_id = f"profile-{uuid.uuid4().hex[:8]}"
        handlers = [build_handler("etcd_rdzv", etcd.endpoint, run_id, args.n, args.n, conf)[0] for _ in range(args.n)]
        profiles = [cProfile.Profile() for _ in handlers]
        start = threading.Barrier(args.n)

        def join(i: int):
            start.wait()
            return profiles[i].runcall(handlers[i].next_rendezvous)

        before, began = etcd_counters(etcd.endpoint), time.monotonic()
        with ThreadPoolExecutor(args.n) as pool:
            worlds = {info.world_size for info in pool.map(join, range(args.n))}
        seconds, after = time.monotonic() - began, etcd_counters(etcd.endpoint)
        for handler in handlers:
            handler.shutdown()
    stats = pstats.Stats(profiles[0])
    for profile in profiles[1:]:
        stats.add(profile)
    paid = {name: after[name] - before[name] for name in before}
    print(f"N={args.n}: formed worlds {sorted(worlds)} in {seconds:.2f} s under the profiler; etcd paid "
          f"{paid.get('raft_entries', 0) / args.n:.2f} raft entries a node and {paid.get('cpu_seconds', 0):.2f} CPU s")
    stats.sort_stats(args.sort).print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
