"""Rendezvous settings and how they are read from torch's ``RendezvousParameters``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.distributed.elastic.rendezvous import RendezvousParameters

# Configuration keys the core reads from ``--rdzv-conf``, with their defaults (seconds or counts).
CORE_KEYS: dict[str, float] = {
    "join_timeout": 600,
    "last_call_timeout": 30,
    "close_timeout": 30,
    "heartbeat_timeout": 5,
    "keep_alive_interval": 5,
    "keep_alive_max_attempt": 3,
}


@dataclass(frozen=True)
class RendezvousSettings:
    """What one handler needs to know about its run. Times are in seconds.

    A node is dead once ``keep_alive_interval * keep_alive_max_attempt`` seconds pass without a
    heartbeat (``liveness_ttl``).
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

    @property
    def liveness_ttl(self) -> float:
        return self.keep_alive_interval * self.keep_alive_max_attempt


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


def settings_from_params(params: RendezvousParameters) -> RendezvousSettings:
    """Read the core's keys (``CORE_KEYS``) from ``params``.

    Raises:
        ValueError: naming the key and the value, for a value that is not positive or not a number.
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
    )
