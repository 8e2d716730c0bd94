"""Heartbeats as one store key per node holding the wall-clock time of its last beat."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Collection

from torch.distributed.elastic.rendezvous.api import RendezvousStateError

from rdzv_common.backend import Liveness, Token

from .calls import StoreCalls
from .keys import RunKeys

# ``forget`` stores the epoch instead of deleting the key: every key of a node that ever beat then
# exists, so ``alive`` keeps to its two-request path (``get`` on an absent key would block).
_FORGOTTEN = b"0"


class C10dLiveness(Liveness):
    """``hb/<node_key>`` holds ``time.time()`` of the node's last beat, as decimal text.

    Nodes compare their own clock against the writer's, so clock skew between machines shortens or
    stretches the effective ttl by that skew.

    A store cannot say when a write happened, so ``held_since`` answers from this node's own beats:
    another node may have seen it dead once a beat's reply came more than ``ttl`` after the
    previous beat was sent (its stored time was older than ``ttl`` before the new one landed).
    """

    def __init__(self, calls: StoreCalls, keys: RunKeys) -> None:
        self._calls = calls
        self._keys = keys
        self._lock = threading.Lock()
        # node key -> (monotonic time the last beat that landed was sent, when its unbroken
        # stretch of beats began, the ttl it beats with).
        self._beats: dict[str, tuple[float, float, float]] = {}

    def beat(self, node_key: str, ttl: float, timeout: float | None = None, announcing: bool = False) -> None:
        sent = time.monotonic()
        self._calls("set", self._keys.heartbeat(node_key), repr(time.time()).encode())
        replied = time.monotonic()
        with self._lock:
            last = self._beats.get(node_key)
            unbroken = last is not None and replied - last[0] <= last[2]
            self._beats[node_key] = (sent, last[1] if unbroken else sent, ttl)

    def held_since(self, node_key: str, token: Token, since: float) -> bool:
        with self._lock:
            last = self._beats.get(node_key)
        return last is not None and last[1] <= since and time.monotonic() - last[0] <= last[2]

    def alive(self, node_keys: Collection[str], ttl: float, current: bool = False) -> set[str]:
        """One ``check`` and one ``multi_get`` when every node has beaten; one request per node when
        some never did. Always read from the store, so always ``current``."""
        nodes = list(node_keys)
        if not nodes:
            return set()
        keys = [self._keys.heartbeat(node) for node in nodes]
        if self._calls("check", keys):
            values: list[bytes | None] = self._calls("multi_get", keys)
        else:
            values = [self._calls.peek(key) for key in keys]
        now = time.time()
        return {
            node
            for node, key, value in zip(nodes, keys, values)
            if value is not None and now - _beat_time(key, value) <= ttl
        }

    def forget(self, node_key: str) -> None:
        with self._lock:
            self._beats.pop(node_key, None)
        self._calls("set", self._keys.heartbeat(node_key), _FORGOTTEN)


def _beat_time(key: str, value: bytes) -> float:
    try:
        beat = float(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        beat = math.nan
    if not math.isfinite(beat):
        raise RendezvousStateError(f"The heartbeat '{key}' holds {value!r}, which is not a time.")
    return beat
