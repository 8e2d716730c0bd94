"""An in-process backend: the reference implementation of the backend contract, for tests and
for several handlers in one process (threads) sharing one ``MemoryStore``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from torch.distributed.elastic.rendezvous import RendezvousStateError

from .backend import Liveness, LivenessLapsed, Mailbox, Quarantine, QuarantineEntry, Record, RendezvousBackend, Token


class MemoryStore:
    """The shared server side: one state per run, a join log and heartbeat times.

    ``clock`` returns seconds; tests pass a fake one to expire heartbeats without sleeping.
    ``wall_clock`` (UNIX seconds) ends quarantines and ages lapses.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.wall_clock = wall_clock
        # run id -> host -> entry, and run id -> host -> UNIX times of its lapses.
        self.quarantine: dict[str, dict[str, QuarantineEntry]] = {}
        self.lapses: dict[str, dict[str, list[float]]] = {}
        self.changed = threading.Condition()
        self.states: dict[str, tuple[bytes, int]] = {}
        self.logs: dict[str, list[bytes]] = {}
        # (run id, position) of each withdrawn record: a write that folded one of them fails.
        self.withdrawn: set[tuple[str, int]] = set()
        self.beats: dict[str, dict[str, float]] = {}
        # run id -> node key -> (the state's version when the node's current unbroken stretch of
        # beats began, the ttl it beats with): ``held_since`` answers from it.
        self.stretches: dict[str, dict[str, tuple[int, float]]] = {}
        self.writes = 0
        self.bytes_written = 0


class MemoryMailbox(Mailbox):
    """Records are list entries; a record's position and handle are its index plus one."""

    def __init__(self, store: MemoryStore, run_id: str) -> None:
        self._store = store
        self._run_id = run_id

    def post(self, record: bytes, poster: str | None = None) -> Record:
        with self._store.changed:
            log = self._store.logs.setdefault(self._run_id, [])
            log.append(bytes(record))
            self._store.writes += 1
            self._store.bytes_written += len(record)
            return Record(bytes(record), len(log), len(log))

    def read(self, cursor: int) -> list[Record]:
        with self._store.changed:
            log = self._store.logs.get(self._run_id, [])
            if cursor > len(log):
                raise RendezvousStateError(
                    f"The rendezvous state's cursor {cursor} is past the end ({len(log)}) of the mailbox of "
                    f"run '{self._run_id}': the state is corrupt. Reset the run or use a new run id."
                )
            withdrawn = self._store.withdrawn
            return [
                Record(data, i, i)
                for i, data in enumerate(log[cursor:], cursor + 1)
                if (self._run_id, i) not in withdrawn
            ]

    def withdraw(self, handle: Any) -> None:
        with self._store.changed:
            self._store.withdrawn.add((self._run_id, handle))


class MemoryLiveness(Liveness):
    def __init__(self, store: MemoryStore, run_id: str) -> None:
        self._store = store
        self._run_id = run_id

    def beat(self, node_key: str, ttl: float, timeout: float | None = None, announcing: bool = False) -> None:
        with self._store.changed:
            if not self._holds(node_key):
                current = self._store.states.get(self._run_id)
                self._store.stretches.setdefault(self._run_id, {})[node_key] = (current[1] if current else 0, ttl)
            self._store.beats.setdefault(self._run_id, {})[node_key] = self._store.clock()

    def _holds(self, node_key: str) -> bool:
        """Whether the node is alive by the ttl it beats with; call with the store's lock held."""
        beat = self._store.beats.get(self._run_id, {}).get(node_key)
        stretch = self._store.stretches.get(self._run_id, {}).get(node_key)
        return beat is not None and stretch is not None and self._store.clock() - beat <= stretch[1]

    def held_since(self, node_key: str, token, since: float) -> bool:
        """From the version each stretch of beats began at: a stretch that began before the
        write of version ``token`` and holds now covers it."""
        with self._store.changed:
            stretch = self._store.stretches.get(self._run_id, {}).get(node_key)
            return token is not None and self._holds(node_key) and stretch[0] < token

    def alive(self, node_keys: Collection[str], ttl: float, current: bool = False) -> set[str]:
        with self._store.changed:
            beats = self._store.beats.get(self._run_id, {})
            now = self._store.clock()
            return {k for k in node_keys if k in beats and now - beats[k] <= ttl}

    def forget(self, node_key: str) -> None:
        with self._store.changed:
            self._store.beats.get(self._run_id, {}).pop(node_key, None)
            self._store.stretches.get(self._run_id, {}).pop(node_key, None)


class MemoryQuarantine(Quarantine):
    def __init__(self, store: MemoryStore, run_id: str) -> None:
        self._store = store
        self._run_id = run_id

    def _live(self) -> dict[str, QuarantineEntry]:
        now = self._store.wall_clock()
        entries = self._store.quarantine.setdefault(self._run_id, {})
        for host in [h for h, e in entries.items() if e.until <= now]:
            del entries[host]
        return entries

    def put(self, entry: QuarantineEntry) -> None:
        with self._store.changed:
            self._live()[entry.host] = entry

    def get(self, host: str) -> QuarantineEntry | None:
        with self._store.changed:
            return self._live().get(host)

    def remove(self, host: str) -> None:
        with self._store.changed:
            self._live().pop(host, None)

    def entries(self) -> list[QuarantineEntry]:
        with self._store.changed:
            return [e for _, e in sorted(self._live().items())]

    def note_lapse(self, host: str, window: float) -> int:
        with self._store.changed:
            now = self._store.wall_clock()
            times = self._store.lapses.setdefault(self._run_id, {}).setdefault(host, [])
            times[:] = [t for t in times if now - t < window] + [now]
            return len(times)


class MemoryBackend(RendezvousBackend):
    """A backend over a ``MemoryStore``; the token is a version number that grows on each write.
    Like etcd's, its writes are fenced on the records they fold (``withdraw``) and on the liveness
    of the member that writes them."""

    def __init__(self, store: MemoryStore, run_id: str, name: str = "memory") -> None:
        self._store = store
        self._run_id = run_id
        self._name = name
        self._mailbox = MemoryMailbox(store, run_id)
        self._liveness = MemoryLiveness(store, run_id)
        self._quarantine = MemoryQuarantine(store, run_id)

    @property
    def name(self) -> str:
        return self._name

    def get_state(self, timeout: float | None = None) -> tuple[bytes, Token] | None:
        with self._store.changed:
            return self._store.states.get(self._run_id)

    def set_state(
        self, state: bytes, token: Token | None = None, fence: Sequence[Record] = (), member: str | None = None
    ) -> tuple[bytes, Token, bool] | None:
        with self._store.changed:
            if member is not None and not self._liveness._holds(member):
                raise LivenessLapsed(f"the liveness of '{member}' in run '{self._run_id}' lapsed")
            current = self._store.states.get(self._run_id)
            fenced = any((self._run_id, record.handle) in self._store.withdrawn for record in fence)
            if not fenced and ((current is None and token is None) or (current is not None and current[1] == token)):
                version = 1 if current is None else current[1] + 1
                self._store.states[self._run_id] = (bytes(state), version)
                self._store.writes += 1
                self._store.bytes_written += len(state)
                self._store.changed.notify_all()
                return bytes(state), version, True
            if current is None:
                return None
            return current[0], current[1], False

    def wait_for_change(self, token: Token | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._store.changed:
            while True:
                current = self._store.states.get(self._run_id)
                if (current[1] if current else None) != token:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._store.changed.wait(remaining)

    @property
    def mailbox(self) -> Mailbox:
        return self._mailbox

    @property
    def liveness(self) -> Liveness:
        return self._liveness

    @property
    def quarantine(self) -> Quarantine:
        return self._quarantine
