"""Health-gated admission: a node joins only when its host is out of quarantine and its health
check passes.

Before each join the node waits out its host's quarantine (which any process, or an operator, may
have set), then runs the ``health_check`` executable, if one is configured. A check that fails
keeps the node from announcing itself: it quarantines its host for a cool-down that doubles with
each consecutive failure (``health_cooldown``, twice that, ... up to ``MAX_COOLDOWN``), logs the
check's last output lines, waits the cool-down out and checks again, until the join deadline, when
it fails with an error naming the check and its output. With a check configured, a host whose nodes
lose their liveness ``LAPSES_TO_QUARANTINE`` times within ``LAPSE_WINDOW`` is quarantined the same
way, by the node whose write dropped the last of them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch.distributed.elastic.rendezvous import RendezvousError, RendezvousTimeoutError

from .backend import Quarantine, QuarantineEntry
from .node import NodeDesc
from .settings import RendezvousSettings

logger = logging.getLogger(__name__)

MAX_COOLDOWN = 1800.0
LAPSE_WINDOW = 600.0
LAPSES_TO_QUARANTINE = 2
# How much of a failed check's output is logged and reported.
OUTPUT_LINES = 10
# The longest single sleep while a quarantine runs, so that an operator's removal takes effect soon.
QUARANTINE_POLL_SECONDS = 2.0


@dataclass(frozen=True)
class CheckResult:
    """What one run of the health check said: ``status`` is how it ended, ``output`` its last
    lines (stdout and stderr together)."""

    healthy: bool
    status: str
    output: str

    def describe(self) -> str:
        return f"{self.status}; last output: {self.output!r}" if self.output else f"{self.status}; no output"


def _tail(raw: bytes | None) -> str:
    lines = (raw or b"").decode(errors="replace").strip().splitlines()
    return "\n".join(lines[-OUTPUT_LINES:])


def run_check(path: str, timeout: float, env: dict[str, str]) -> CheckResult:
    """Run the executable at ``path`` with ``env`` added to this process's environment; exit 0
    within ``timeout`` seconds is healthy."""
    try:
        done = subprocess.run(
            [path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            timeout=timeout, env={**os.environ, **env},
        )
    except subprocess.TimeoutExpired as exc:
        return CheckResult(False, f"timed out after {timeout:g}s", _tail(exc.stdout))
    except OSError as exc:
        return CheckResult(False, f"could not be run ({exc})", "")
    return CheckResult(done.returncode == 0, f"exit status {done.returncode}", _tail(done.stdout))


def cooldown(base: float, strikes: int) -> float:
    """The cool-down after ``strikes`` consecutive failures: ``base`` doubled each time, capped."""
    return min(base * 2 ** min(strikes - 1, 32), MAX_COOLDOWN)


class Admission:
    """Decides, for one node, when it may announce a join (``admit``), and turns lapses into
    quarantine (``note_lapses``).

    Args:
        clock, wall_clock, sleep: monotonic time (the join deadline), UNIX time (quarantine ends,
            shared between machines) and how to wait; tests pass fakes.
    """

    def __init__(
        self,
        node: NodeDesc,
        settings: RendezvousSettings,
        quarantine: Quarantine,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._node = node
        self._settings = settings
        self._quarantine = quarantine
        self._clock = clock
        self._wall_clock = wall_clock
        self._sleep = sleep
        # Consecutive failed checks of this node; a passing check resets it.
        self._strikes = 0

    @property
    def host(self) -> str:
        return self._node.addr

    def admits_at_once(self) -> bool:
        """Whether ``admit`` would return at once: no health check is configured and the host is
        not quarantined."""
        return self._settings.health_check is None and self._quarantine.get(self.host) is None

    def admit(self, round_: int, deadline: float) -> None:
        """Return once this node may join round ``round_``.

        Raises:
            RendezvousTimeoutError: ``deadline`` (monotonic) passed while the host was quarantined;
                names the check and its last output, or the quarantine's reason.
        """
        failed: CheckResult | None = None
        while True:
            entry = self._quarantine.get(self.host)
            if entry is not None:
                self._wait(entry, deadline, failed)
                continue
            if self._settings.health_check is None:
                return
            result = run_check(self._settings.health_check, self._settings.health_check_timeout, self._env(round_))
            if result.healthy:
                self._strikes = 0
                return
            failed = result
            self._strikes += 1
            seconds = cooldown(self._settings.health_cooldown, self._strikes)
            reason = f"health check {self._settings.health_check} failed: {result.describe()}"
            entry = QuarantineEntry(self.host, self._wall_clock() + seconds, reason, self._strikes)
            self._quarantine.put(entry)
            logger.warning(
                "The node '%s' stays out of the rendezvous '%s': its health check %s failed (%s, "
                "failure %d in a row); its host %s is quarantined for %.0fs. Last output:\n%s",
                self._node, self._settings.run_id, self._settings.health_check, result.status,
                self._strikes, self.host, seconds, result.output or "(none)",
            )
            self._wait(entry, deadline, failed)

    def _wait(self, entry: QuarantineEntry, deadline: float, failed: CheckResult | None) -> None:
        left = deadline - self._clock()
        if left <= 0:
            if failed is not None:
                raise RendezvousTimeoutError(
                    f"The node '{self._node}' could not join the rendezvous '{self._settings.run_id}' "
                    f"within join_timeout: its health check {self._settings.health_check} kept failing "
                    f"({self._strikes} time(s) in a row; last: {failed.describe()})."
                )
            raise RendezvousTimeoutError(
                f"The node '{self._node}' could not join the rendezvous '{self._settings.run_id}' "
                f"within join_timeout: its host {self.host} is quarantined for "
                f"{max(0.0, entry.until - self._wall_clock()):.0f}s more ({entry.reason})."
            )
        logger.debug(
            "The host %s of node '%s' is quarantined in the rendezvous '%s' for %.0fs more: %s",
            self.host, self._node, self._settings.run_id, entry.until - self._wall_clock(), entry.reason,
        )
        self._sleep(max(0.1, min(entry.until - self._wall_clock(), QUARANTINE_POLL_SECONDS, left)))

    def _env(self, round_: int) -> dict[str, str]:
        return {
            "TORCH_RDZV_RUN_ID": self._settings.run_id,
            "TORCH_RDZV_ROUND": str(round_),
            "TORCH_RDZV_NODE": self._node.key,
            "TORCH_RDZV_HOST": self.host,
        }

    def note_lapses(self, nodes: Iterable[NodeDesc]) -> None:
        """Record the liveness lapse of ``nodes`` (dropped as dead by this node's write) and
        quarantine each host that lapsed too often. Best effort: the write stands either way."""
        for host in sorted({node.addr for node in nodes}):
            try:
                count = self._quarantine.note_lapse(host, LAPSE_WINDOW)
                if count < LAPSES_TO_QUARANTINE:
                    continue
                strikes = count - LAPSES_TO_QUARANTINE + 1
                seconds = cooldown(self._settings.health_cooldown, strikes)
                reason = f"liveness lapsed {count} times within {LAPSE_WINDOW / 60:g} min"
                self._quarantine.put(QuarantineEntry(host, self._wall_clock() + seconds, reason, strikes))
                logger.warning(
                    "Quarantined host %s in the rendezvous '%s' for %.0fs: %s.",
                    host, self._settings.run_id, seconds, reason,
                )
            except RendezvousError as exc:
                logger.warning("Could not record the liveness lapse of host %s: %s", host, exc)
