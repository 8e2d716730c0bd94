"""The join mailbox: one append-only store key holding length-prefixed records."""

from __future__ import annotations

from torch.distributed.elastic.rendezvous.api import RendezvousStateError

from rdzv_common.backend import Mailbox, Record

from .calls import StoreCalls


def frame(record: bytes) -> bytes:
    """``record`` as ``<decimal length>:<record>,`` (a netstring), so any bytes delimit themselves."""
    return b"%d:%s," % (len(record), record)


def unframe(log: bytes, cursor: int, key: str) -> list[Record]:
    """The records in ``log`` from byte offset ``cursor`` (a record boundary) to its end, each
    with the offset just past it as its position.

    Raises:
        RendezvousStateError: ``log`` is no sequence of frames from ``cursor``; names ``key``.
    """
    records = []
    while cursor < len(log):
        colon = log.find(b":", cursor, cursor + 21)
        if colon < 0 or not log[cursor:colon].isdigit():
            raise _corrupt(key, cursor, "no length prefix")
        start = colon + 1
        end = start + int(log[cursor:colon])
        if log[end : end + 1] != b",":
            raise _corrupt(key, cursor, "a truncated or unterminated record")
        cursor = end + 1
        records.append(Record(log[start:end], cursor))
    return records


def _corrupt(key: str, offset: int, problem: str) -> RendezvousStateError:
    return RendezvousStateError(f"The mailbox '{key}' is corrupt: {problem} at byte {offset}.")


class C10dMailbox(Mailbox):
    """Posts are single ``append`` calls, which both ``TCPStore`` and ``FileStore`` apply atomically,
    so records never interleave; cursors are byte offsets into the log.

    A store can neither report where an ``append`` landed nor fence a write on other keys, so a
    posted record has no position or handle, and ``withdraw`` is the base class's no-op: a node
    that gives up ends its liveness instead, and the next write drops whatever was folded of it.
    """

    def __init__(self, calls: StoreCalls, key: str) -> None:
        self._calls = calls
        self._key = key

    def post(self, record: bytes) -> Record:
        self._calls("append", self._key, frame(bytes(record)))
        return Record(bytes(record), None)

    def read(self, cursor: int) -> list[Record]:
        log = self._calls.peek(self._key)
        if log is None or cursor >= len(log):
            return []
        return unframe(log, cursor, self._key)

    def trim(self, cursor: int) -> None:
        """Keep every record: the shared state holds cursors as absolute byte offsets, which
        dropping a prefix would shift, and a store offers no atomic cut of a key's head."""
