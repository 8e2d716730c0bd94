"""Open the c10d store that ``RendezvousParameters`` describe and build the backend over it."""

from __future__ import annotations

import logging
import os
import tempfile
from datetime import timedelta

from torch.distributed import FileStore, Store, TCPStore
from torch.distributed.elastic.events import NodeState, construct_and_record_rdzv_event
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

from rdzv_common.hosting import hosted
from rdzv_common.torch_private import matches_machine_hostname

from .backend import C10dRendezvousBackend
from .config import C10dConfig, config_from_params

logger = logging.getLogger(__name__)


def create_backend(params: RendezvousParameters) -> tuple[C10dRendezvousBackend, Store]:
    """Open the store and return a backend named ``params.backend`` over it, and the store.

    Options as in ``config.config_from_params``. Without ``is_host`` a node hosts the ``TCPStore``
    when the endpoint names this machine (torch's hostname and address matching), and joins as a
    client if hosting fails, since another agent on the machine may host it already.

    Raises:
        ValueError: an option is invalid; raised before any network traffic.
        RendezvousConnectionError: the store could not be opened or reached.
    """
    try:
        config = config_from_params(params)
        store = _file_store(config) if config.store_type == "file" else _tcp_store(config, params.run_id)
        return C10dRendezvousBackend(store, params.run_id, name=params.backend), store
    except Exception as exc:
        construct_and_record_rdzv_event(
            run_id=params.run_id, message=f"{type(exc).__name__}: {exc}", node_state=NodeState.FAILED
        )
        raise


def _tcp_store(config: C10dConfig, run_id: str) -> TCPStore:
    inferred = config.is_host is None
    is_host = matches_machine_hostname(config.host) if inferred else bool(config.is_host)
    if is_host:
        try:
            store = _open_tcp_store(config, is_host=True)
        except RendezvousConnectionError as exc:
            if not inferred:
                raise
            logger.info("%s Connecting to it as a client instead.", exc)
        else:
            message = (
                f"Process {os.getpid()} hosts the TCPStore of the c10d rendezvous at "
                f"{config.host}:{config.port}."
            )
            construct_and_record_rdzv_event(run_id=run_id, message=message, node_state=NodeState.INIT)
            logger.info(message)
            return store
    return _open_tcp_store(config, is_host=False)


def _open_tcp_store(config: C10dConfig, is_host: bool) -> TCPStore:
    try:
        # use_libuv stays at TCPStore's default, as with torch's c10d backend.
        store = TCPStore(
            config.host,
            config.port,
            is_master=is_host,
            multi_tenant=True,
            timeout=timedelta(seconds=config.read_timeout),
        )
        return hosted.add(store) if is_host else store
    except (RuntimeError, TimeoutError, ValueError) as exc:
        role = "host" if is_host else "connect to"
        raise RendezvousConnectionError(
            f"The c10d rendezvous could not {role} the TCPStore at {config.host}:{config.port} "
            f"(read_timeout={config.read_timeout:g}s): {exc}"
        ) from exc


def _file_store(config: C10dConfig) -> FileStore:
    path = config.path
    try:
        if path is None:
            fd, path = tempfile.mkstemp(prefix="c10d_rdzv-")
            os.close(fd)
        return FileStore(path)
    except (OSError, RuntimeError, ValueError) as exc:
        raise RendezvousConnectionError(
            f"The c10d rendezvous could not open the FileStore at {path}: {exc}"
        ) from exc
