"""Rendezvous settings and how they are read from torch's ``RendezvousParameters``."""

from __future__ import annotations

import difflib
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch.distributed.elastic.rendezvous import RendezvousParameters

from .ranks import RANK_ORDERS

logger = logging.getLogger(__name__)

# Configuration keys the core reads from ``--rdzv-conf``, with their defaults (seconds or counts).
CORE_KEYS: dict[str, float] = {
    "join_timeout": 600,
    "last_call_timeout": 30,
    "close_timeout": 30,
    "heartbeat_timeout": 5,
    "keep_alive_interval": 5,
    "keep_alive_max_attempt": 3,
    "health_check_timeout": 60,
    "health_cooldown": 60,
    "node_unit": 1,
}
# Every key the core reads: the numbers above and the options of rank order and admission.
CORE_OPTIONS = frozenset(CORE_KEYS) | {"rank_order", "stable_ranks", "health_check"}
# Keys torch's launcher puts into the configuration itself (``timeout``: launcher/api.py;
# ``rank``: run.py for static rendezvous) or that its other backends document and a user may carry
# over when switching backends; none deserves a warning.
TORCH_KEYS = frozenset({"timeout", "rank", "is_host", "store_type", "local_addr"})
# The environment variable that names the health check when ``health_check`` is not set
# (``--rdzv-conf`` cannot carry a value with a comma).
HEALTH_CHECK_ENV = "TORCH_RDZV_HEALTH_CHECK"


@dataclass(frozen=True)
class RendezvousSettings:
    """What one handler needs to know about its run. Times are in seconds.

    A node is dead once ``keep_alive_interval * keep_alive_max_attempt`` seconds pass without a
    heartbeat (``liveness_ttl``).

    A round forms a group whose size is a multiple of ``node_unit`` within
    ``min_nodes..max_nodes``; ``max_world`` is the largest such size. ``rank_order`` and
    ``stable_ranks`` choose the ranks (``RendezvousState.assign_ranks``). ``health_check`` is
    the path of an executable run before each join (``health.py``).
    """

    run_id: str
    min_nodes: int
    max_nodes: int
    join_timeout: float = CORE_KEYS["join_timeout"]
    last_call_timeout: float = CORE_KEYS["last_call_timeout"]
    close_timeout: float = CORE_KEYS["close_timeout"]
    heartbeat_timeout: float = CORE_KEYS["heartbeat_timeout"]
    keep_alive_interval: float = CORE_KEYS["keep_alive_interval"]
    keep_alive_max_attempt: int = int(CORE_KEYS["keep_alive_max_attempt"])
    rank_order: str = "natural"
    stable_ranks: bool = True
    node_unit: int = int(CORE_KEYS["node_unit"])
    health_check: str | None = None
    health_check_timeout: float = CORE_KEYS["health_check_timeout"]
    health_cooldown: float = CORE_KEYS["health_cooldown"]

    def __post_init__(self) -> None:
        if not self.run_id:
            raise ValueError("The run id must be a non-empty string; pass --rdzv-id.")
        if self.min_nodes < 1:
            raise ValueError(f"min_nodes is {self.min_nodes}; it must be at least 1.")
        if self.max_nodes < self.min_nodes:
            raise ValueError(
                f"max_nodes ({self.max_nodes}) is less than min_nodes ({self.min_nodes}); "
                "use --nnodes=MIN:MAX with MIN <= MAX."
            )
        if self.rank_order not in RANK_ORDERS:
            raise ValueError(
                f"The rendezvous configuration option 'rank_order' is {self.rank_order!r}; it must be "
                f"one of {', '.join(RANK_ORDERS)}."
            )
        if self.node_unit < 1:
            raise ValueError(
                f"The rendezvous configuration option 'node_unit' is {self.node_unit!r}; it must be a "
                "positive integer."
            )
        if self.max_world < self.min_nodes:
            raise ValueError(
                f"min_nodes ({self.min_nodes}) and max_nodes ({self.max_nodes}) admit no multiple of "
                f"node_unit ({self.node_unit}); choose --nnodes=MIN:MAX with a multiple of "
                f"{self.node_unit} between MIN and MAX, or a node_unit that divides a size in that range."
            )

    @property
    def liveness_ttl(self) -> float:
        return self.keep_alive_interval * self.keep_alive_max_attempt

    @property
    def max_world(self) -> int:
        """The largest group a round forms: the largest multiple of ``node_unit`` up to ``max_nodes``."""
        return self.max_nodes - self.max_nodes % self.node_unit

    def group_size(self, joined: int) -> int:
        """The size of the group ``joined`` participants can form: whole units, at most ``max_world``."""
        return min(joined - joined % self.node_unit, self.max_world)


def _positive(params: RendezvousParameters, key: str, integral: bool) -> float:
    raw = params.get(key, CORE_KEYS[key])
    kind = "a positive integer" if integral else "a positive number of seconds"
    try:
        value = int(raw) if integral else float(raw)
        if integral and isinstance(raw, float) and raw != value:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ValueError(
            f"The rendezvous configuration option '{key}' is {raw!r}; it must be {kind}."
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"The rendezvous configuration option '{key}' is {raw!r}; it must be {kind}.")
    return value


def _choice(params: RendezvousParameters, key: str, default: str) -> str:
    raw = params.get(key, default)
    return raw.strip().lower() if isinstance(raw, str) else raw


def _flag(params: RendezvousParameters, key: str, default: bool) -> bool:
    try:
        value = params.get_as_bool(key, default)
    except ValueError:
        value = None
    if value is None:
        raise ValueError(
            f"The rendezvous configuration option '{key}' is {params.get(key)!r}; it must be a boolean "
            "(true/false, yes/no, 1/0)."
        )
    return value


def _health_check(params: RendezvousParameters, environ: Mapping[str, str]) -> str | None:
    key, raw = "health_check", params.get("health_check")
    if raw is None:
        key, raw = HEALTH_CHECK_ENV, environ.get(HEALTH_CHECK_ENV)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    path = raw.strip() if isinstance(raw, str) else raw
    if not isinstance(path, str) or not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise ValueError(
            f"The health check '{key}' is {raw!r}, which is not an executable file on this node; pass "
            "the path of an executable that exits 0 when the node is healthy (chmod +x it)."
        )
    return path


def settings_from_params(
    params: RendezvousParameters, environ: Mapping[str, str] = os.environ
) -> RendezvousSettings:
    """Read the core's keys (``CORE_OPTIONS``) from ``params``; the health check may also come from
    ``TORCH_RDZV_HEALTH_CHECK`` in ``environ``.

    Raises:
        ValueError: naming the key and the value, for a value that is not valid, and the fix.
    """
    return RendezvousSettings(
        run_id=params.run_id,
        min_nodes=params.min_nodes,
        max_nodes=params.max_nodes,
        join_timeout=_positive(params, "join_timeout", False),
        last_call_timeout=_positive(params, "last_call_timeout", False),
        close_timeout=_positive(params, "close_timeout", False),
        heartbeat_timeout=_positive(params, "heartbeat_timeout", False),
        keep_alive_interval=_positive(params, "keep_alive_interval", False),
        keep_alive_max_attempt=int(_positive(params, "keep_alive_max_attempt", True)),
        rank_order=_choice(params, "rank_order", "natural"),
        stable_ranks=_flag(params, "stable_ranks", True),
        node_unit=int(_positive(params, "node_unit", True)),
        health_check=_health_check(params, environ),
        health_check_timeout=_positive(params, "health_check_timeout", False),
        health_cooldown=_positive(params, "health_cooldown", False),
    )


def warn_unknown_keys(params: RendezvousParameters, backend_keys: Iterable[str], backend: str) -> None:
    """Log a warning for each ``--rdzv-conf`` key that neither ``backend`` (whose own keys are
    ``backend_keys``), the core nor torch reads, with the known key it is closest to: a typo must
    not pass silently, and need not be hunted for."""
    known = frozenset(backend_keys) | CORE_OPTIONS
    for key in sorted(set(params.config) - known - TORCH_KEYS):
        closest = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f" Did you mean '{closest[0]}'?" if closest else ""
        logger.warning(
            "The rendezvous configuration option '%s' is not known to the %s backend and is ignored.%s "
            "Known options: %s.",
            key,
            backend,
            hint,
            ", ".join(sorted(known)),
        )

