"""A silent (half-open) connection: the nodes' one connection to etcd stays open and carries
nothing, while etcd itself is healthy and a new connection would pass. Package defaults, one
endpoint, the handlers driven as torchrun's agent drives them while its workers train."""

from __future__ import annotations

import threading
import time

import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters

from benchmarks.invariants import etcd_client
from etcd_rdzv.keys import RunKeys
from etcd_rdzv.plugin import create_handler
from integration_tests.nemesis import Proxy

pytestmark = pytest.mark.timeout(120)

# What the issue measured: the liveness of the node lapsed 14.5 s into the silence (TTL 15 s), and
# gRPC dialled a new connection after about 72 s.
SILENT_SECONDS = 45.0


def test_a_45s_silent_connection_costs_no_liveness_and_surfaces_nothing(etcd_run):
    run_id, prefix = etcd_run.run_id, etcd_run.key_prefix
    keys = RunKeys(prefix, run_id)
    admin = etcd_client(etcd_run.endpoints[0])
    with Proxy.to(etcd_run.endpoints[0]) as proxy:
        # Package defaults: keep_alive_interval=5, keep_alive_max_attempt=3 (a 15 s TTL), read_timeout=60.
        params = RendezvousParameters("etcd-v2", proxy.endpoint, run_id, 2, 2, local_addr="127.0.0.1", key_prefix=prefix)
        handlers = [create_handler(params) for _ in range(2)]
        try:
            threads = [threading.Thread(target=h.next_rendezvous) for h in handlers]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert all(h.last_timings is not None for h in handlers), "the group of two did not form"
            alive_keys = [keys.alive_key(h.node.key) for h in handlers]
            assert all(admin.get(key)[0] is not None for key in alive_keys)
            state_before = admin.get(keys.state)[1].mod_revision

            silenced = proxy.connections()
            assert silenced, "the handlers' connection does not go through the proxy"
            for connection in silenced:
                connection.stall()
            stalled_at = time.monotonic()

            lapses: list[str] = []
            new_connection_after: list[float] = []
            stop = threading.Event()

            def watch() -> None:
                # Straight to etcd, past the proxy: the nodes' liveness keys, and the proxy's
                # connections (a new one is the client's way out).
                while not stop.wait(0.25):
                    lapses.extend(key for key in alive_keys if admin.get(key)[0] is None)
                    if not new_connection_after and any(c not in silenced for c in proxy.connections()):
                        new_connection_after.append(time.monotonic() - stalled_at)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            failures, slowest = [], 0.0
            try:
                # torchrun's agent while its workers train: num_nodes_waiting() every monitor interval.
                while time.monotonic() - stalled_at < SILENT_SECONDS:
                    for handler in handlers:
                        started = time.monotonic()
                        try:
                            assert handler.num_nodes_waiting() == 0
                            assert handler.is_closed() is False
                        except Exception as exc:  # noqa: BLE001 - what torchrun would get
                            failures.append(f"{time.monotonic() - stalled_at:.1f}s: {exc!r}")
                        slowest = max(slowest, time.monotonic() - started)
                    time.sleep(0.5)
            finally:
                stop.set()
                watcher.join(5)
            print(
                f"silent connection: a new connection {new_connection_after[0] if new_connection_after else None}s "
                f"into the silence; slowest monitoring call {slowest:.1f}s"
            )
            assert failures == []
            assert lapses == [], f"a liveness key lapsed during the silence: {sorted(set(lapses))}"
            assert new_connection_after, "no new connection was dialled"
            # Nobody was dropped, nothing was rewritten: the group stands as it was.
            assert admin.get(keys.state)[1].mod_revision == state_before
            assert all(admin.get(key)[0] is not None for key in alive_keys)
        finally:
            for connection in proxy.connections():
                connection.resume()
            for handler in handlers:
                handler.shutdown()
            admin.close()
