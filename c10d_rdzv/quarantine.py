"""Quarantined hosts in a c10d store: one key per host holding its entry and expiry time.

A store has no expiring keys, so an entry holds its end (``until``, UNIX time) and readers ignore
an entry that has ended; ``remove`` deletes the key. ``quarantined`` lists (one quoted host a line)
every host ever quarantined, since a store cannot list keys; ``lapses/<host>`` holds the UNIX times
of the host's liveness lapses, one a line. Times compare across machines, so clock skew between
them shortens or stretches a cool-down by that skew.
"""

from __future__ import annotations

import time
from urllib.parse import quote, unquote

from rdzv_common.backend import Quarantine, QuarantineEntry
from rdzv_common.codec import decode_quarantine_entry, encode_quarantine_entry

from .calls import StoreCalls
from .keys import RunKeys


class C10dQuarantine(Quarantine):
    def __init__(self, calls: StoreCalls, keys: RunKeys) -> None:
        self._calls = calls
        self._keys = keys

    def put(self, entry: QuarantineEntry) -> None:
        self._calls("set", self._keys.quarantine(entry.host), encode_quarantine_entry(entry))
        self._calls("append", self._keys.quarantined, f"{quote(entry.host, safe='')}\n".encode())

    def get(self, host: str) -> QuarantineEntry | None:
        key = self._keys.quarantine(host)
        value = self._calls.peek(key)
        if value is None:
            return None
        entry = decode_quarantine_entry(value, key)
        return entry if entry.until > time.time() else None

    def remove(self, host: str) -> None:
        self._calls("delete_key", self._keys.quarantine(host))

    def entries(self) -> list[QuarantineEntry]:
        listed = self._calls.peek(self._keys.quarantined) or b""
        hosts = sorted({unquote(line) for line in listed.decode(errors="replace").split("\n") if line})
        return [entry for entry in map(self.get, hosts) if entry is not None]

    def note_lapse(self, host: str, window: float) -> int:
        now = time.time()
        self._calls("append", self._keys.lapses(host), f"{now!r}\n".encode())
        log = self._calls.peek(self._keys.lapses(host)) or b""
        times = [float(t) for t in log.decode(errors="replace").split("\n") if _is_time(t)]
        return sum(1 for t in times if now - t < window)


def _is_time(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
