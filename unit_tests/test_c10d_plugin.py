"""The ``c10d_rdzv`` torchrun plugin, end to end through torch's handler registry."""

from __future__ import annotations

import socket
import threading

from torch.distributed.elastic.rendezvous import RendezvousParameters, rendezvous_handler_registry

from c10d_rdzv.plugin import create_rdzv_handler, handler_creator
from unit_tests.torch_channels import torch_event_log, torch_metric_log


def test_plugin_builds_a_handler_reporting_the_requested_name(tmp_path):
    assert handler_creator() is create_rdzv_handler
    params = RendezvousParameters("my-c10d", str(tmp_path / "rdzv"), "run", 1, 2, store_type="file")
    assert create_rdzv_handler(params).get_backend() == "my-c10d"


def test_two_nodes_meet_over_a_tcp_store():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ranks: dict[int, tuple[int, int]] = {}
    errors: list[BaseException] = []
    # The host keeps its handler (and so the store's server) until both nodes are through.
    both_done = threading.Barrier(2, timeout=30)

    def node(index: int) -> None:
        try:
            params = RendezvousParameters(
                "c10d_rdzv",
                f"127.0.0.1:{port}",
                "two-nodes",
                2,
                2,
                is_host=str(index == 0),
                read_timeout="30",
                join_timeout="20",
                last_call_timeout="1",
            )
            handler = rendezvous_handler_registry.create_handler(params)
            assert handler.get_backend() == "c10d_rdzv"
            info = handler.next_rendezvous()
            ranks[index] = (info.rank, info.world_size)
            both_done.wait()
            handler.shutdown()
        except BaseException as exc:
            errors.append(exc)
            both_done.abort()

    # The guest's TCPStore client retries its connection until the host serves the port.
    nodes = [threading.Thread(target=node, args=(index,)) for index in (0, 1)]
    for thread in nodes:
        thread.start()
    for thread in nodes:
        thread.join(40)
    assert not errors, errors
    assert sorted(ranks.values()) == [(0, 2), (1, 2)]


def test_events_and_timings_reach_torchs_channels_without_etcd(tmp_path):
    params = RendezvousParameters(
        "c10d_rdzv", str(tmp_path / "rdzv"), "c10d-metrics", 1, 1, store_type="file", last_call_timeout="0.1"
    )
    with torch_event_log() as events, torch_metric_log() as metric_log:
        handler = create_rdzv_handler(params)
        try:
            info = handler.next_rendezvous()
        finally:
            handler.shutdown()
    assert (info.rank, info.world_size) == (0, 1)
    assert metric_log.values("next_rendezvous.success") == [1]
    assert metric_log.values("next_rendezvous.duration.ms") == [round(handler.last_timings.total * 1000)]
    joined = [e for e in events.named("dynamic_rendezvous.py:DynamicRendezvousHandler.next_rendezvous") if e["rank"] == 0]
    assert len(joined) == 1 and joined[0]["run_id"] == "c10d-metrics"
    assert events.named("dynamic_rendezvous.py:_DistributedRendezvousOpExecutor._mark_rendezvous_complete")
