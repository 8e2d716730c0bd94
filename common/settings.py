"""Rendezvous settings, and the one parser of ``--rdzv-conf`` values, for the core and both backends.

torchrun hands every ``--rdzv-conf`` value over as text; the Python API may pass numbers and bools.
One rule reads them all, whichever part of the package owns the key (surrounding spaces in text
are ignored):

* a number of seconds (``join_timeout``, ``read_timeout``, ``ttl``, ...): an int or a float, or text
  of a decimal number (``"30"``, ``"0.5"``, ``"1e3"``); finite and above 0; never a bool;
* a count (``keep_alive_max_attempt``, ``node_unit``): an int, a float with nothing after the point
  (``3.0``), or text of an integer (``"3"``); above 0; never a bool, ``1.5`` or ``"1.5"``;
* a flag (``stable_ranks``, ``is_host``): a bool, the int 1 or 0, or text that torch's
  ``RendezvousParameters.get_as_bool`` reads (true/false, yes/no, t/f, y/n, 1/0, in any case);
* a choice (``rank_order``, ``store_type``, ``protocol``): text, in any case, naming one of the choices;
* text (``key_prefix``, ``username``): a string; blank text counts as unset;
* a file (``ca_cert``, ``health_check``): the path of a file that exists on this node.

A value that breaks its rule raises ``ValueError`` naming the key, the value and what to pass.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from collections.abc import Collection, Iterable, Mapping
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
            raise _refused("rank_order", self.rank_order, _one_of(RANK_ORDERS))
        if self.node_unit < 1:
            raise _refused("node_unit", self.node_unit, _COUNT)
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


_SECONDS = "a positive number of seconds"
_COUNT = "a positive integer"
_FLAG = "a boolean (true/false, yes/no, 1/0)"
_TEXT = "a string"
_TRUE = frozenset({"1", "true", "t", "yes", "y"})
_FALSE = frozenset({"0", "false", "f", "no", "n"})


def _one_of(choices: Collection[str]) -> str:
    return "one of " + ", ".join(choices)


def _refused(key: str, raw: object, must: str, default: object = None) -> ValueError:
    """The error for ``raw``, the value of ``key``, which must be ``must``."""
    default_note = "" if default is None else f" (default {default})"
    return ValueError(f"The rendezvous configuration option '{key}' is {raw!r}; it must be {must}{default_note}.")


def seconds_option(params: RendezvousParameters, key: str, default: float) -> float:
    """The number of seconds ``key`` holds (module docstring), ``default`` when unset."""
    raw = params.get(key, default)
    value = math.nan
    if isinstance(raw, (int, float, str)) and not isinstance(raw, bool):
        try:
            value = float(raw)
        except (ValueError, OverflowError):  # not a number; an int beyond a float's range
            pass
    if not math.isfinite(value) or value <= 0:
        raise _refused(key, raw, _SECONDS, f"{default:g}")
    return value


def count_option(params: RendezvousParameters, key: str, default: int) -> int:
    """The count ``key`` holds (module docstring), ``default`` when unset."""
    raw = params.get(key, default)
    value = 0
    if isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    elif isinstance(raw, float) and raw.is_integer():
        value = int(raw)
    elif isinstance(raw, str):
        try:
            value = int(raw)
        except ValueError:
            pass
    if value <= 0:
        raise _refused(key, raw, _COUNT, default)
    return value


def flag_option(params: RendezvousParameters, key: str, default: bool | None) -> bool | None:
    """The flag ``key`` holds (module docstring); ``default`` when unset. Where ``default`` is
    ``None`` (the key's absence means something of its own), ``None`` passed for it means the same."""
    raw = params.get(key)
    if key not in params.config or (raw is None and default is None):
        return default
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return raw == 1
    text = raw.strip().lower() if isinstance(raw, str) else None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise _refused(key, raw, _FLAG)


def choice_option(params: RendezvousParameters, key: str, choices: Collection[str], default: str) -> str:
    """The choice ``key`` names (module docstring), lower-case; ``default`` when unset."""
    raw = params.get(key, default)
    value = raw.strip().lower() if isinstance(raw, str) else None
    if value not in choices:
        raise _refused(key, raw, _one_of(choices), default)
    return value


def text_option(params: RendezvousParameters, key: str, strip: bool = True, secret: bool = False) -> str | None:
    """The text ``key`` holds, stripped unless ``strip`` is false; ``None`` when unset or blank.
    A ``secret`` value is never shown in the error."""
    raw = params.get(key)
    if raw is None:
        return None
    if not isinstance(raw, str):
        if secret:
            raise ValueError(
                f"The rendezvous configuration option '{key}' is a {type(raw).__name__} (not shown: it is "
                f"secret); it must be {_TEXT}."
            )
        raise _refused(key, raw, _TEXT)
    value = raw.strip() if strip else raw
    return value if value.strip() else None


def existing_file(key: str, raw: object, what: str, executable: bool = False, subject: str | None = None) -> str | None:
    """``raw``, the value of ``key``, as the path of a file on this node (an executable one, with
    ``executable``); ``None`` when unset or blank. ``what`` says what the file is for the fix;
    ``subject`` names where the value came from, if not from ``--rdzv-conf``."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    path = raw.strip() if isinstance(raw, str) else None
    if path is None or not os.path.isfile(path) or (executable and not os.access(path, os.X_OK)):
        subject = subject or f"The rendezvous configuration option '{key}'"
        kind = "an executable file" if executable else "a file"
        raise ValueError(f"{subject} is {raw!r}, which is not {kind} on this node; pass the path of {what}.")
    return path


def _health_check(params: RendezvousParameters, environ: Mapping[str, str]) -> str | None:
    what = "an executable that exits 0 when the node is healthy (chmod +x it)"
    raw = params.get("health_check")
    if raw is not None:
        return existing_file("health_check", raw, what, executable=True)
    subject = f"The environment variable '{HEALTH_CHECK_ENV}'"
    return existing_file(HEALTH_CHECK_ENV, environ.get(HEALTH_CHECK_ENV), what, executable=True, subject=subject)


def _seconds(params: RendezvousParameters, key: str) -> float:
    return seconds_option(params, key, CORE_KEYS[key])


def _count(params: RendezvousParameters, key: str) -> int:
    return count_option(params, key, int(CORE_KEYS[key]))


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
        join_timeout=_seconds(params, "join_timeout"),
        last_call_timeout=_seconds(params, "last_call_timeout"),
        close_timeout=_seconds(params, "close_timeout"),
        heartbeat_timeout=_seconds(params, "heartbeat_timeout"),
        keep_alive_interval=_seconds(params, "keep_alive_interval"),
        keep_alive_max_attempt=_count(params, "keep_alive_max_attempt"),
        rank_order=choice_option(params, "rank_order", RANK_ORDERS, "natural"),
        stable_ranks=flag_option(params, "stable_ranks", True),
        node_unit=_count(params, "node_unit"),
        health_check=_health_check(params, environ),
        health_check_timeout=_seconds(params, "health_check_timeout"),
        health_cooldown=_seconds(params, "health_cooldown"),
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

