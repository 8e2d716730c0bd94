"""The c10d backend's options, read from torch's ``RendezvousParameters`` with the keys and
defaults of torch's own c10d backend, and checked whole before anything touches the network."""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

from rdzv_common.settings import choice_option, flag_option, seconds_option, warn_unknown_keys

DEFAULT_PORT = 29400
DEFAULT_READ_TIMEOUT = 60.0
STORE_TYPES = ("tcp", "file")
# The ``--rdzv-conf`` keys this backend reads.
C10D_KEYS = frozenset({"store_type", "read_timeout", "is_host"})


@dataclass(frozen=True)
class C10dConfig:
    """Which store to open and how.

    Attributes:
        store_type: ``"tcp"`` or ``"file"``.
        read_timeout: seconds a ``TCPStore`` connection and its requests may take.
        is_host: whether this node hosts the ``TCPStore``; ``None`` means infer from ``host``.
        host, port: the ``TCPStore`` endpoint (``store_type="tcp"`` only).
        path: the ``FileStore`` file; ``None`` means a fresh temporary file (``"file"`` only).
    """

    store_type: str
    read_timeout: float
    is_host: bool | None
    host: str = "localhost"
    port: int = DEFAULT_PORT
    path: str | None = None


def config_from_params(params: RendezvousParameters) -> C10dConfig:
    """Read ``store_type`` (default ``tcp``), ``read_timeout`` (seconds, default 60), ``is_host`` and
    the endpoint (``host[:port]``, default port 29400; for ``file`` the file's path, whose
    directory must exist).

    Unknown ``--rdzv-conf`` keys are logged as warnings (the core and torch read keys of their own
    from the same dictionary).

    Values follow the one rule of ``rdzv_common.settings``.

    Raises:
        ValueError: for an invalid option or endpoint, naming it and its value.
    """
    warn_unknown_keys(params, C10D_KEYS, "c10d_rdzv")
    store_type = choice_option(params, "store_type", STORE_TYPES, "tcp")
    read_timeout = seconds_option(params, "read_timeout", DEFAULT_READ_TIMEOUT)
    is_host = flag_option(params, "is_host", None)
    endpoint = (params.endpoint or "").strip()
    if store_type == "file":
        # FileStore retries a file it cannot create for minutes instead of failing.
        if endpoint and not os.path.isdir(os.path.dirname(os.path.abspath(endpoint))):
            raise ValueError(
                f"The rendezvous endpoint '{endpoint}' is the FileStore's path, but its directory "
                "does not exist."
            )
        return C10dConfig(store_type, read_timeout, is_host, path=endpoint or None)
    host, port = parse_rendezvous_endpoint(endpoint, default_port=DEFAULT_PORT)
    return C10dConfig(store_type, read_timeout, is_host, host=host, port=port)

