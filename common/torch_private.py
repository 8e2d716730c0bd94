"""The one place that knows torch's versions and reaches past its public API.

Supported: torch 2.6 through 2.14 (``pyproject.toml``; README, "Supported torch versions").
torch 2.6 is the first whose torchrun loads rendezvous handlers from the ``torchrun.handlers``
entry points, the only way this package's backends reach torchrun; torch 2.4 and 2.5 register
their own backends only, so there ``--rdzv-backend=etcd-v2`` stays torch's etcd v2 client and
``c10d_rdzv``/``etcd_rdzv`` are unknown names.

What differs within the supported range: ``Store.clone()`` (``clone_tcp_store``). Everything else
this package uses of torch (``RendezvousHandler`` and its ``use_agent_store``,
``RendezvousStoreInfo.build`` with ``local_addr``, ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE``,
``RendezvousSettings``, the events and metrics API, the stores' other methods) is public and the
same across it; so are the two private names below. The torch matrix (``make test-torch
TORCH=...``) checks all of it on every version it runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch.distributed import TCPStore
# ``_matches_machine_hostname`` is how torch's c10d backend decides whether an endpoint names
# this machine; using torch's own keeps ``c10d_rdzv`` hosting the store exactly where it would.
from torch.distributed.elastic.rendezvous.utils import _matches_machine_hostname as matches_machine_hostname

if TYPE_CHECKING:
    from torch.distributed.elastic.rendezvous import RendezvousHandlerCreator

__all__ = ["clone_tcp_store", "matches_machine_hostname", "registered_creator", "unregister_creator"]


def clone_tcp_store(store: TCPStore) -> TCPStore:
    """A new client connection to ``store``'s server, with its timeout and server implementation.

    torch 2.6 has no ``Store.clone()``; there a client ``TCPStore`` is opened as clone() opens it.
    """
    clone = getattr(store, "clone", None)
    if clone is not None:
        return clone()
    return TCPStore(
        store.host,
        store.port,
        is_master=False,
        timeout=store.timeout,
        wait_for_workers=False,
        use_libuv=store.libuvBackend,
    )


def _creators() -> dict[str, RendezvousHandlerCreator]:
    # torch's registry offers register() and create_handler() only: it refuses a second creator
    # for a name and has no way to drop one, which replacing its ``etcd-v2`` needs.
    # Imported here, not at module level: torch loads the plugins while its rendezvous package is
    # still initialising.
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry

    return rendezvous_handler_registry._registry


def registered_creator(name: str) -> RendezvousHandlerCreator | None:
    """The creator torch's handler registry holds for ``name``, if any."""
    return _creators().get(name)


def unregister_creator(name: str) -> RendezvousHandlerCreator | None:
    """Drop ``name`` from torch's handler registry, so that another creator can be registered
    under it; returns the creator dropped, if any."""
    return _creators().pop(name, None)
