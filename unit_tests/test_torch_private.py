"""What ``torch_private`` relies on in the installed torch: torchrun's loading of the
``torchrun.handlers`` entry points, and the private names it reaches for. Part of the torch matrix
(``make test-torch``), where a torch that lacks one fails here first, by name."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
from torch.distributed import TCPStore

import c10d_rdzv.plugin
import etcd_rdzv.plugin
from rdzv_common.torch_private import (
    clone_tcp_store,
    matches_machine_hostname,
    registered_creator,
    unregister_creator,
)


def test_torch_registers_the_plugins_from_their_entry_points():
    import torch.distributed.elastic.rendezvous  # noqa: F401 (loads the plugins)

    found = {name: registered_creator(name) for name in ("c10d_rdzv", "etcd_rdzv")}
    assert found == {"c10d_rdzv": c10d_rdzv.plugin.create_rdzv_handler, "etcd_rdzv": etcd_rdzv.plugin.create_handler}, (
        "torch did not load this package's torchrun.handlers entry points: torchrun cannot use its backends "
        "(torch registers out-of-tree handlers from 2.6 on)"
    )


def test_a_dropped_creator_can_be_registered_again():
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry

    def creator(params):
        raise AssertionError("never called")

    rendezvous_handler_registry.register("compat-test", creator)
    try:
        with pytest.raises(ValueError):
            rendezvous_handler_registry.register("compat-test", etcd_rdzv.plugin.create_handler)
        assert unregister_creator("compat-test") is creator
        assert registered_creator("compat-test") is None
        rendezvous_handler_registry.register("compat-test", etcd_rdzv.plugin.create_handler)
        assert registered_creator("compat-test") is etcd_rdzv.plugin.create_handler
    finally:
        unregister_creator("compat-test")


def test_this_machine_is_recognised_by_name_and_loopback_address():
    assert matches_machine_hostname("localhost")
    assert matches_machine_hostname("127.0.0.2")
    assert matches_machine_hostname(socket.gethostname())
    assert not matches_machine_hostname("192.0.2.1")  # TEST-NET-1, never this machine's


class _WithoutClone:
    """A ``TCPStore`` as torch 2.6 has it, with no ``clone()``."""

    def __init__(self, store: TCPStore) -> None:
        self.host, self.port, self.timeout, self.libuvBackend = store.host, store.port, store.timeout, store.libuvBackend


@pytest.mark.parametrize("has_clone", [True, False], ids=["clone", "without-clone"])
def test_a_cloned_tcp_store_is_a_second_client_of_the_same_server(has_clone):
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=7))
    clone = clone_tcp_store(server if has_clone else _WithoutClone(server))
    assert (clone.host, clone.port, clone.timeout) == ("127.0.0.1", server.port, timedelta(seconds=7))
    clone.set("written-by-the-clone", "1")
    assert server.get("written-by-the-clone") == b"1"
    server.set("written-by-the-server", "2")
    assert clone.get("written-by-the-server") == b"2"
