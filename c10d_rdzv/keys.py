"""The names of one run's keys in a c10d store; the layout is described in ``backend``."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

PREFIX = "torch.rendezvous.c10d_rdzv/"


@dataclass(frozen=True)
class RunKeys:
    """Every key of one run, all under ``root``."""

    root: str

    @classmethod
    def for_run(cls, run_id: str) -> RunKeys:
        """The keys of ``run_id``; the run id is percent-quoted so no run's keys nest in another's."""
        return cls(f"{PREFIX}{quote(run_id, safe='')}/")

    @property
    def state(self) -> str:
        return self.root + "state"

    @property
    def generation(self) -> str:
        return self.root + "generation"

    @property
    def log(self) -> str:
        return self.root + "log"

    def changed(self, generation: int) -> str:
        return f"{self.root}changed/{generation}"

    def heartbeat(self, node_key: str) -> str:
        return f"{self.root}hb/{node_key}"

    @property
    def quarantined(self) -> str:
        return self.root + "quarantined"

    def quarantine(self, host: str) -> str:
        return f"{self.root}quarantine/{quote(host, safe='')}"

    def lapses(self, host: str) -> str:
        return f"{self.root}lapses/{quote(host, safe='')}"
