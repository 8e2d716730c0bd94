"""The join mailbox: one store key holding length-prefixed records, trimmed of its folded prefix."""

from __future__ import annotations

from torch.distributed.elastic.rendezvous.api import RendezvousStateError

from rdzv_common.backend import Mailbox, Record

from .calls import StoreCalls

# ``trim`` cuts the log only once this many bytes of it are folded: each cut costs one request that
# carries the whole log twice, so the log stays under about this size plus its unfolded records,
# and a read costs that much however old the run.
TRIM_MIN_BYTES = 4096

# The first byte of a header frame, ``@<base>,``. A record frame starts with a digit, and a store
# value this package writes never starts with NUL (see ``calls._ABSENT``), so neither is taken for it.
HEADER_MARK = b"@"

# Digits of a header's base: more than any log could reach (2**64 has 20).
_MAX_BASE_DIGITS = 20


def frame(record: bytes) -> bytes:
    """``record`` as ``<decimal length>:<record>,`` (a netstring), so any bytes delimit themselves."""
    return b"%d:%s," % (len(record), record)


def header(base: int) -> bytes:
    """The frame that starts a trimmed log whose first kept byte sits at absolute offset ``base``."""
    return HEADER_MARK + b"%d," % base


def split(log: bytes, key: str) -> tuple[int, int]:
    """``(base, start)``: the absolute offset of the first kept byte of ``log`` and the index in
    ``log`` where its record frames start. A log without a header (never trimmed, or written before
    trimming existed) has base 0 and starts at 0.

    Raises:
        RendezvousStateError: ``log`` starts a header that does not parse; names ``key``.
    """
    if not log.startswith(HEADER_MARK):
        return 0, 0
    comma = log.find(b",", 1, 2 + _MAX_BASE_DIGITS)
    if comma < 0 or not log[1:comma].isdigit():
        raise _corrupt(key, 0, "a malformed header")
    return int(log[1:comma]), comma + 1


def unframe(log: bytes, cursor: int, key: str) -> list[Record]:
    """The records in ``log`` from absolute offset ``cursor`` (a record boundary) to its end, each
    with the absolute offset just past it as its position. A ``cursor`` below the log's base reads
    from its first kept record.

    Raises:
        RendezvousStateError: ``log`` is no header and sequence of frames from ``cursor``, or
            ``cursor`` is past its end (no state this package wrote holds such a cursor); names ``key``.
    """
    base, start = split(log, key)
    shift = base - start  # absolute offset = index in ``log`` + shift
    if cursor > len(log) + shift:
        raise RendezvousStateError(
            f"The rendezvous state's cursor {cursor} is past the end ({len(log) + shift}) of the mailbox "
            f"'{key}', so it names records that were never written: the state is corrupt. Reset the run "
            "(delete its keys, or restart the store) or use a new run id."
        )
    offset = max(start, cursor - shift)
    records = []
    while offset < len(log):
        start, end = _frame_at(log, offset, key)
        offset = end + 1
        records.append(Record(log[start:end], offset + shift))
    return records


def _frame_at(log: bytes, offset: int, key: str) -> tuple[int, int]:
    """The slice ``log[start:end]`` of the record whose frame starts at ``offset``; its frame ends
    at ``end + 1``."""
    colon = log.find(b":", offset, offset + 21)
    if colon < 0 or not log[offset:colon].isdigit():
        raise _corrupt(key, offset, "no length prefix")
    start = colon + 1
    end = start + int(log[offset:colon])
    if log[end : end + 1] != b",":
        raise _corrupt(key, offset, "a truncated or unterminated record")
    return start, end


def _corrupt(key: str, offset: int, problem: str) -> RendezvousStateError:
    return RendezvousStateError(f"The mailbox '{key}' is corrupt: {problem} at byte {offset}.")


class C10dMailbox(Mailbox):
    """Posts are single ``append`` calls, which both ``TCPStore`` and ``FileStore`` apply atomically,
    so records never interleave; cursors are absolute byte offsets into the log as if it had never
    been trimmed.

    ``trim`` replaces the log, in one ``compare_set`` against the whole value it read, by a header
    frame ``@<base>,`` (``base``: the absolute offset of the first byte kept) and the records after
    the cursor. An ``append`` that lands first makes that ``compare_set`` fail, so a trim never
    drops a record it did not see; it then tries once more on the value the store returned, and
    otherwise leaves the cut to the next trim.

    A store can neither report where an ``append`` landed nor fence a write on other keys, so a
    posted record has no position or handle, and ``withdraw`` is the base class's no-op: a node
    that gives up ends its liveness instead, and the next write drops whatever was folded of it.
    """

    def __init__(self, calls: StoreCalls, key: str) -> None:
        self._calls = calls
        self._key = key
        # The log as this mailbox last read or wrote it: the folding write's ``read`` just fetched
        # it, so ``trim`` needs no request of its own to learn the value to compare against.
        self._seen: bytes | None = None

    def post(self, record: bytes, poster: str | None = None) -> Record:
        self._calls("append", self._key, frame(bytes(record)))
        return Record(bytes(record), None)

    def read(self, cursor: int) -> list[Record]:
        """The records after ``cursor``. A cursor below the log's base (a node whose state predates
        the write that trimmed) reads from the first record kept. That is safe: the records cut
        were folded by a state written after that node's, so its compare-and-set on its old token
        fails, whatever it folded; it then reads the current state, whose cursor is at or past
        the base."""
        log = self._calls.peek(self._key)
        self._seen = log
        if log is None:
            return []
        return unframe(log, cursor, self._key)

    def trim(self, cursor: int) -> None:
        """Drop the records up to ``cursor`` (a position ``read`` returned, stored in the state just
        written) once they hold ``TRIM_MIN_BYTES`` or more; at most two requests, none below that."""
        log = self._seen
        fresh = log is None
        if fresh:
            log = self._calls.peek(self._key)
        for _ in range(2):
            if log is None:
                return
            base, start = split(log, self._key)
            if cursor - base < TRIM_MIN_BYTES:
                return  # Too little to be worth a request, or trimmed past ``cursor`` already.
            cut = start + cursor - base
            if cut > len(log):
                if fresh:
                    return  # Not a position of this log.
                log, fresh = self._calls.peek(self._key), True  # read before the records to cut
                continue
            if not _is_boundary(log, start, cut, self._key):
                return
            swapped, log = self._calls.replace(self._key, log, header(cursor) + log[cut:])
            if swapped:
                self._seen = log
                return
            fresh = True


def _is_boundary(log: bytes, start: int, cut: int, key: str) -> bool:
    """Whether a record frame of ``log`` ends at ``cut``, walking its frames from ``start``."""
    offset = start
    while offset < cut:
        offset = _frame_at(log, offset, key)[1] + 1
    return offset == cut
