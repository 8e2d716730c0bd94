"""Building the etcd backend and store for torchrun from its ``RendezvousParameters``."""

from __future__ import annotations

from torch.distributed.elastic.rendezvous import RendezvousParameters

from . import run
from .backend import EtcdRendezvousBackend
from .config import config_from_params
from .store import EtcdStore


def create_backend(params: RendezvousParameters, name: str = "etcd-v2") -> tuple[EtcdRendezvousBackend, EtcdStore]:
    """The backend of run ``params.run_id`` (reporting ``name``) and its agents' store.

    Both use the process's one ``EtcdRun`` of the run, each holding a use of it until it is closed
    (the backend, by a call: once ``close`` returns, what it was the last user of is gone) or
    collected (the store, which torch's agents still read after the handler's shutdown).

    Raises:
        ValueError: an option is invalid (``config_from_params``), before any request.
        RendezvousConnectionError: etcd refused the credentials or could not be reached.
    """
    config = config_from_params(params)
    store = EtcdStore(run.acquire(config, params.run_id), release=run.release_soon)
    return EtcdRendezvousBackend(run.acquire(config, params.run_id), name=name, release=run.release), store
