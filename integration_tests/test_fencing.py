"""Fencing: no node is ever told a round it is not in, even when its liveness lapsed inside the
very write that completed the round (a process stalled by a long GC pause, a swapping host, a
SIGSTOP).

The scenario: A and B join a round (min 2, max 3); A is the first in line to complete it once the
last call ends. A's process stalls for 5 s between its liveness check and its compare-and-set,
heartbeats included, so its liveness (3 s) lapses. B, meanwhile, drops A as dead. Before the
fence, A's write landed and A was told "round 0, rank 0, world 2" while B dropped it, went looking
for a rank 0 that was gone, and timed out in round 1. Every answer is checked against the state
stored when it was given.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from torch.distributed import TCPStore
from torch.distributed.elastic.rendezvous import RendezvousParameters

from benchmarks.invariants import etcd_client
from c10d_rdzv.backend import C10dRendezvousBackend
from etcd_rdzv.keys import RunKeys
from etcd_rdzv.plugin import create_handler as create_etcd_handler
from integration_tests.faultrun import lapse_inside_the_completing_write
from rdzv_common import create_handler, ops
from rdzv_common.codec import decode_state

pytestmark = pytest.mark.timeout(120)

CONF = {
    "join_timeout": 40,
    "last_call_timeout": 1,
    "keep_alive_interval": 1,
    "keep_alive_max_attempt": 3,
    "read_timeout": 10,
}
STALL_SECONDS = 5.0  # longer than the 3 s liveness TTL
HEARTBEAT_LAG = 1.5  # the heartbeat thread is scheduled after the writer


class Etcd:
    def __init__(self, etcd_run) -> None:
        self.space = etcd_run
        self.admin = etcd_client(etcd_run.endpoint)
        self.key = RunKeys(etcd_run.key_prefix, etcd_run.run_id).state

    def handler(self):
        params = self.space.params(local_addr="127.0.0.1", **CONF)
        params.min_nodes, params.max_nodes = 2, 3
        return create_etcd_handler(params)

    def stored(self):
        value, _ = self.admin.get(self.key)
        return decode_state(value)

    def close(self) -> None:
        self.admin.close()


class C10d:
    def __init__(self) -> None:
        self.server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
        self.run_id = "fencing"
        self.reader = C10dRendezvousBackend(self._client(), self.run_id)

    def _client(self) -> TCPStore:
        return TCPStore("127.0.0.1", self.server.port, is_master=False, timeout=timedelta(seconds=30))

    def handler(self):
        store = self._client()
        params = RendezvousParameters(
            "c10d_rdzv", f"127.0.0.1:{self.server.port}", self.run_id, 2, 3, local_addr="127.0.0.1", **CONF
        )
        return create_handler(store, C10dRendezvousBackend(store, self.run_id), params)

    def stored(self):
        return decode_state(self.reader.get_state()[0])

    def close(self) -> None:
        self.reader.close()


@pytest.fixture(params=["etcd", "c10d"])
def world(request):
    made = Etcd(request.getfixturevalue("etcd_run")) if request.param == "etcd" else C10d()
    yield made
    made.close()


def test_a_node_whose_liveness_lapsed_inside_its_completing_write_is_told_no_round_it_is_not_in(world, monkeypatch):
    # Only the first in line completes the round within the test: the others' turns come 30 s
    # after the last call (so B cannot complete it while A stalls).
    monkeypatch.setattr(ops, "COMPLETE_STEP", 30.0)
    a, b = world.handler(), world.handler()
    assert a.node < b.node  # a is first in the state's order, so first in line
    over = lapse_inside_the_completing_write(a, STALL_SECONDS, HEARTBEAT_LAG)
    told: dict[str, tuple] = {}

    def rendezvous(handler):
        info = handler.next_rendezvous()
        stored = world.stored()  # the state when the answer was given
        told[handler.node.key] = (handler.last_timings.round, info.rank, info.world_size, stored)
        return info

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(rendezvous, h) for h in (a, b)]
        try:
            infos = [f.result(timeout=60) for f in futures]
        finally:
            for h in (a, b):
                h.shutdown()
    assert over.is_set(), "the stall was never injected"
    for node, (round_, rank, world_size, stored) in told.items():
        members = {n.key: r for n, r in stored.participants.items()}
        assert stored.round == round_ and stored.complete and members.get(node) == rank, (
            f"{node} was told round {round_}, rank {rank}, but the state stored then is round "
            f"{stored.round} with {members}"
        )
        assert world_size == stored.world_size
    assert sorted(i.rank for i in infos) == [0, 1]
    assert {t[0] for t in told.values()} == {told[a.node.key][0]}
