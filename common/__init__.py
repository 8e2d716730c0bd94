"""The backend-agnostic core of the rendezvous: state, codec, ops, executor and handler."""

from .backend import Liveness, Mailbox, RendezvousBackend
from .events import RendezvousTimings
from .handler import DynamicRendezvousHandler, create_handler
from .node import NodeDesc
from .settings import RendezvousSettings, settings_from_params
from .state import RendezvousState

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
