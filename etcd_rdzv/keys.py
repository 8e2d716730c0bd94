"""Where a run's keys live in etcd, and which kind each key is: the one owner of the layout (the
table of keys and their leases: docs/protocol.md). Each run owns one directory below ``key_prefix``,
its id percent-escaped so that two runs' directories never nest: ``state``, ``withdrawn``, ``joins/``,
``alive/``, ``store/``, ``ops/``, ``quarantine/``, ``lapses/<host>/``."""

from __future__ import annotations

import functools
import logging
from collections.abc import Hashable
from dataclasses import dataclass
from urllib.parse import quote, unquote

from .runtime.txn import prefix_end

logger = logging.getLogger(__name__)

# The kinds of key of a run, by their name in the run's directory (a trailing / is a directory).
_NAMES = ("state", "withdrawn", "joins/", "alive/", "store/", "ops/", "quarantine/", "lapses/")
_KINDS = [(name.encode(), name.rstrip("/")) for name in _NAMES]


def prefix_range(prefix: str | bytes) -> tuple[bytes, bytes]:
    """The ``[key, range_end)`` of every key under ``prefix``."""
    raw = prefix.encode() if isinstance(prefix, str) else prefix
    return raw, prefix_end(raw)


def parse(key_prefix: str, key: bytes) -> tuple[str, str, bytes] | None:
    """``(run id, kind, the rest of the key)`` of a key under ``key_prefix``; ``None`` for a key
    of no run. The kind is a name of ``_NAMES`` without its ``/``, or ``"other"``."""
    head = (key_prefix + "/").encode()
    if not key.startswith(head):
        return None
    segment, slash, rest = key[len(head):].partition(b"/")
    if not segment or not slash:
        return None
    return (unquote(segment.decode(errors="replace")), *_kind_of(rest))


def _kind_of(rest: bytes) -> tuple[str, bytes]:
    """The kind of a key by its path in its run's directory, and what follows the kind's name."""
    for name, kind in _KINDS:
        if rest == name or (name.endswith(b"/") and rest.startswith(name)):
            return kind, rest[len(name):]
    return "other", rest


def node_of(rest: bytes) -> str | None:
    """The node key a liveness key names; ``None`` if it is not UTF-8 (not a key of this package)."""
    try:
        return rest.decode()
    except UnicodeDecodeError:
        logger.warning("Ignoring the liveness key %r: it is not UTF-8, so it names no node.", rest)
        return None


@dataclass(frozen=True)
class RunKeys:
    """The keys of run ``run_id`` below ``key_prefix`` (no trailing ``/``), each made once."""

    key_prefix: str
    run_id: str

    @functools.cached_property
    def root(self) -> str:
        """The run's directory: its id as one segment, all but letters, digits and ``_.-~`` escaped."""
        if not self.run_id:
            raise ValueError("The run id must be a non-empty string; pass --rdzv-id.")
        return f"{self.key_prefix}/{quote(self.run_id, safe='')}/"

    _raw_root = functools.cached_property(lambda self: self.root.encode())
    state = functools.cached_property(lambda self: self.root + "state")
    withdrawn = functools.cached_property(lambda self: self.root + "withdrawn")
    joins = functools.cached_property(lambda self: self.root + "joins/")
    alive = functools.cached_property(lambda self: self.root + "alive/")
    store = functools.cached_property(lambda self: self.root + "store/")
    ops = functools.cached_property(lambda self: self.root + "ops/")
    quarantine = functools.cached_property(lambda self: self.root + "quarantine/")

    def alive_key(self, node_key: str) -> str:
        return self.alive + node_key

    def quarantine_key(self, host: str) -> str:
        return self.quarantine + quote(host, safe="")

    def lapses_of(self, host: str) -> str:
        return f"{self.root}lapses/{quote(host, safe='')}/"

    def classify(self, key: bytes) -> tuple[str, Hashable] | None:
        """``(kind, id)`` of a key of this run, as the run's cache keeps it: liveness keys by node
        key, the state and the withdrawal marker by nothing, the rest by key; ``None``: not kept."""
        if not key.startswith(self._raw_root):
            return None
        kind, rest = _kind_of(key[len(self._raw_root):])
        if kind in ("state", "withdrawn"):
            return kind, b""
        if kind == "alive":
            node = node_of(rest)
            return None if node is None else (kind, node)
        return (kind, key) if kind in ("joins", "store", "quarantine") else None
