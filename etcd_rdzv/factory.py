"""Building the etcd backend and store for torchrun from its ``RendezvousParameters``."""

from __future__ import annotations

from torch.distributed.elastic.rendezvous import RendezvousParameters

from .backend import EtcdRendezvousBackend
from .config import config_from_params
from .registry import registry
from .store import EtcdStore


def create_backend(params: RendezvousParameters, name: str = "etcd-v2") -> tuple[EtcdRendezvousBackend, EtcdStore]:
    """Create the backend of run ``params.run_id`` and its agents' store.

    Both use the process's one ``EtcdRun`` of the run (``registry``), and each holds it until it
    is closed (the backend) or collected (the store), so the store keeps working after the
    handler's ``shutdown`` (torch's agents still read it then).

    Args:
        name: the backend name torchrun was asked for, which the handler must report.

    Raises:
        ValueError: an option is invalid (see ``config_from_params``); raised before any request.
        RendezvousConnectionError: etcd refused the configured credentials or could not be reached.
    """
    config = config_from_params(params)
    run = registry.acquire(config, params.run_id)
    store = EtcdStore(registry.acquire(config, params.run_id), release=registry.release_soon)
    # The backend is closed by a call (a handler's shutdown, or the thread an abandoned handler's
    # finalizer starts), never by a finalizer itself: it releases at once, so that once close()
    # returns, the session, view and connection it was the last user of are gone. A store's
    # release runs from its finalizer, on whatever thread collected it: ``release_soon``.
    return EtcdRendezvousBackend(run, name=name, release=registry.release), store
