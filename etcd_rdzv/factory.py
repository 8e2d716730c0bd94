"""Building the etcd backend and store for torchrun from its ``RendezvousParameters``."""

from __future__ import annotations

from torch.distributed.elastic.rendezvous import RendezvousParameters

from .backend import EtcdRendezvousBackend, state_key, store_prefix
from .client import EtcdClient
from .config import config_from_params
from .lease import RunLease
from .store import EtcdStore


def create_backend(params: RendezvousParameters, name: str = "etcd-v2") -> tuple[EtcdRendezvousBackend, EtcdStore]:
    """Create the backend of run ``params.run_id`` and its agents' store (``store_prefix``).

    Both share one client and the run's lease; closing the backend closes the client, so close it
    after the last use of the store (torch's agent does: its exit barrier runs before shutdown).

    Args:
        name: the backend name torchrun was asked for, which the handler must report.

    Raises:
        ValueError: an option is invalid (see ``config_from_params``); raised before any request.
        RendezvousConnectionError: etcd refused the configured credentials or could not be reached.
    """
    config = config_from_params(params)
    etcd = EtcdClient(config)
    run_lease = RunLease(state_key(config.key_prefix, params.run_id), config.ttl)
    backend = EtcdRendezvousBackend(etcd, params.run_id, name=name, run_lease=run_lease)
    store = EtcdStore(
        etcd, store_prefix(config.key_prefix, params.run_id), run_lease=run_lease, view=backend.reader
    )
    return backend, store
