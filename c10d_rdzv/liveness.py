"""Heartbeats as one store key per node holding the wall-clock time of its last beat."""

from __future__ import annotations

import math
import time
from collections.abc import Collection

from torch.distributed.elastic.rendezvous.api import RendezvousStateError

from rdzv_common.backend import Liveness

from .calls import StoreCalls
from .keys import RunKeys

# ``forget`` stores the epoch instead of deleting the key: every key of a node that ever beat then
# exists, so ``alive`` keeps to its two-request path (``get`` on an absent key would block).
_FORGOTTEN = b"0"


class C10dLiveness(Liveness):
    """``hb/<node_key>`` holds ``time.time()`` of the node's last beat, as decimal text.

    Nodes compare their own clock against the writer's, so clock skew between machines shortens or
    stretches the effective ttl by that skew.
    """

    def __init__(self, calls: StoreCalls, keys: RunKeys) -> None:
        self._calls = calls
        self._keys = keys

    def beat(self, node_key: str, ttl: float, timeout: float | None = None) -> None:
        self._calls("set", self._keys.heartbeat(node_key), repr(time.time()).encode())

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
        self._calls("set", self._keys.heartbeat(node_key), _FORGOTTEN)


def _beat_time(key: str, value: bytes) -> float:
    try:
        beat = float(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        beat = math.nan
    if not math.isfinite(beat):
        raise RendezvousStateError(f"The heartbeat '{key}' holds {value!r}, which is not a time.")
    return beat
