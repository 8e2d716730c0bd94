"""How to build one node's rendezvous handler for each benchmarked backend.

Each backend names the server it needs (``etcd-v3``, ``etcd-v2`` or ``tcpstore``, all started by
the harness) and a builder that turns ``RendezvousParameters`` into a handler, the way torchrun
would. Ours are imported lazily so the harness still runs torch's while ours are missing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from . import metering


@dataclass(frozen=True)
class Backend:
    name: str                 # label in results, also ``RendezvousParameters.backend``
    server: str               # "etcd-v3" | "etcd-v2" | "tcpstore"
    ours: bool
    pair: str                 # the other side of the natural comparison
    modules: tuple[str, ...]  # must import for the backend to run
    conf: dict                # backend-specific ``RendezvousParameters`` conf


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("etcd_rdzv", "etcd-v3", True, "etcd-v2", ("rdzv_common.handler", "etcd_rdzv.factory"), {}),
        Backend("c10d_rdzv", "tcpstore", True, "c10d", ("rdzv_common.handler", "c10d_rdzv.factory"),
                {"store_type": "tcp", "is_host": False}),
        Backend("etcd-v2", "etcd-v2", False, "etcd_rdzv",
                ("etcd", "torch.distributed.elastic.rendezvous.etcd_rendezvous_backend"), {}),
        Backend("c10d", "tcpstore", False, "c10d_rdzv",
                ("torch.distributed.elastic.rendezvous.c10d_rendezvous_backend",),
                {"store_type": "tcp", "is_host": False}),
    )
}
OURS = tuple(name for name, b in BACKENDS.items() if b.ours)
TORCH = tuple(name for name, b in BACKENDS.items() if not b.ours)


def unavailable(name: str) -> str | None:
    """Why ``name`` cannot run here (a failed import), or ``None`` when it can."""
    for module in BACKENDS[name].modules:
        try:
            importlib.import_module(module)
        except Exception as e:  # an import that fails for any reason means "skip, with the reason"
            return f"import {module} failed: {type(e).__name__}: {e}"
    return None


def _ours_etcd(params):
    from etcd_rdzv.factory import create_backend

    return create_backend(params, name=params.backend)


def _ours_c10d(params):
    from c10d_rdzv.factory import create_backend

    return create_backend(params)


def _torch_etcd_v2(params):
    from torch.distributed.elastic.rendezvous.etcd_rendezvous_backend import create_backend

    return create_backend(params)


def _torch_c10d(params):
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import create_backend

    return create_backend(params)


_FACTORIES: dict[str, Callable] = {
    "etcd_rdzv": _ours_etcd,
    "c10d_rdzv": _ours_c10d,
    "etcd-v2": _torch_etcd_v2,
    "c10d": _torch_c10d,
}


def _create_handler(name: str):
    if BACKENDS[name].ours:
        from rdzv_common.handler import create_handler
    else:
        from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler
    return create_handler


def build_handler(name: str, endpoint: str, run_id: str, min_nodes: int, max_nodes: int, conf: dict):
    """One node's handler for backend ``name``; returns ``(handler, metered)``.

    ``conf`` holds the timeouts shared by all backends; ``metered`` lists what write counting covers.
    """
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    params = RendezvousParameters(
        backend=name,
        endpoint=endpoint,
        run_id=run_id,
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        local_addr="127.0.0.1",
        **{**BACKENDS[name].conf, **conf},
    )
    backend, store = _FACTORIES[name](params)
    metered = metering.instrument(backend)
    return _create_handler(name)(store, backend, params), metered


def stop_heartbeats(handler) -> bool:
    """Silence ``handler`` as if its node died: no more keep-alives. False if it cannot be done."""
    stop = getattr(handler, "_stop_heartbeats", None)
    if stop is None:
        return False
    stop()
    return True


def leave_at_exit(handler) -> bool:
    """Run what interpreter exit runs for ``handler`` when its process exits without ``shutdown()``.

    Ours registers that as ``handler._abandoned`` (a ``weakref.finalize`` that ends the node's
    liveness at once); torch's handlers have nothing of the kind, so for them this does nothing and
    returns False: their departed node stays until its heartbeat times out.
    """
    hook = getattr(handler, "_abandoned", None)
    if hook is None or not callable(hook):
        return False
    hook()
    return True
