"""The entry point torchrun loads for ``--rdzv-backend=c10d_rdzv`` (``torchrun.handlers`` in
pyproject.toml)."""

from __future__ import annotations

from typing import TYPE_CHECKING

# torch loads this module while its rendezvous package is still initialising; importing from that
# package at module level would hand torch a half-initialised module.
if TYPE_CHECKING:
    from torch.distributed.elastic.rendezvous import (
        RendezvousHandler,
        RendezvousHandlerCreator,
        RendezvousParameters,
    )


def create_rdzv_handler(params: RendezvousParameters) -> RendezvousHandler:
    """Build a rendezvous handler over the c10d store ``params`` describe; it reports
    ``params.backend`` as its name."""
    from rdzv_common.handler import create_handler_with

    from .factory import create_backend

    return create_handler_with(create_backend, params)


def handler_creator() -> RendezvousHandlerCreator:
    """The creator torchrun registers under ``c10d_rdzv``."""
    return create_rdzv_handler
