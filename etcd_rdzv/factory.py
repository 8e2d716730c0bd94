"""Building the etcd backend and store for torchrun from its ``RendezvousParameters``."""

from __future__ import annotations

from torch.distributed.elastic.rendezvous import RendezvousParameters

from . import run
from .backend import EtcdRendezvousBackend
from .config import config_from_params
from .store import EtcdStore


def create_backend(params: RendezvousParameters, name: str = "etcd-v2") -> tuple[EtcdRendezvousBackend, EtcdStore]:
    """The backend of run ``params.run_id`` (reporting ``name``) and its agents' store, each holding
    a use of the process's ``EtcdRun`` until closed (the backend) or collected (the store, which
    torch's agents read after the handler's shutdown). Raises ``ValueError`` for a bad option before
    any request, ``RendezvousConnectionError`` if etcd refused the credentials or is unreachable."""
    config = config_from_params(params)
    store = EtcdStore(run.acquire(config, params.run_id), release=run.release_soon)
    return EtcdRendezvousBackend(run.acquire(config, params.run_id), name=name, release=run.release), store
