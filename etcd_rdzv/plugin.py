"""Entry points for torchrun's ``torchrun.handlers`` group: ``etcd_rdzv``, and ``etcd-v2``, which
replaces torch's backend of that name (etcd's v2 API, removed in etcd 3.6) so that existing
command lines move to the v3 API unchanged (``TORCH_RDZV_ETCD_V2_OVERRIDE=0`` keeps torch's)."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

# Importing torch's rendezvous package loads the plugins, this module among them: a top-level
# import of it here would hand torch a half-initialised module.
if TYPE_CHECKING:
    from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousHandlerCreator, RendezvousParameters

logger = logging.getLogger(__name__)

OVERRIDE_ENV = "TORCH_RDZV_ETCD_V2_OVERRIDE"


def create_handler(params: RendezvousParameters) -> RendezvousHandler:
    """Build a rendezvous handler on etcd v3 that reports ``params.backend`` as its name."""
    from rdzv_common.handler import create_handler_with

    from .factory import create_backend

    return create_handler_with(lambda p: create_backend(p, name=p.backend), params)


def handler_creator() -> RendezvousHandlerCreator:
    """The creator torchrun registers under ``etcd_rdzv``."""
    return create_handler


def etcd_v2_override() -> RendezvousHandlerCreator:
    """The creator torchrun registers under ``etcd-v2``: torch's registry, which refuses a second
    creator for a name, loses torch's own first, unless the override is off (then it stands)."""
    from rdzv_common.torch_private import registered_creator, unregister_creator

    if os.environ.get(OVERRIDE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return registered_creator("etcd-v2")
    unregister_creator("etcd-v2")
    logger.debug("etcd-v2 rendezvous now uses the etcd v3 API (set %s=0 to keep torch's).", OVERRIDE_ENV)
    return create_handler
