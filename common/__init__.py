"""The backend-agnostic core of the rendezvous: state, codec, ops, executor and handler."""

from .backend import Liveness, Mailbox, RendezvousBackend
from .handler import DynamicRendezvousHandler, RendezvousTimings, create_handler
from .settings import RendezvousSettings, settings_from_params
from .state import NodeDesc, RendezvousState

__all__ = [
    "DynamicRendezvousHandler",
    "Liveness",
    "Mailbox",
    "NodeDesc",
    "RendezvousBackend",
    "RendezvousSettings",
    "RendezvousState",
    "RendezvousTimings",
    "create_handler",
    "settings_from_params",
]
