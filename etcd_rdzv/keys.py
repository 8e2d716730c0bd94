"""Where a run's keys live in etcd: the one place that knows the key layout.

Below ``key_prefix`` (default ``/torch/elastic/rendezvous``) each run owns exactly one directory,
named by its run id percent-escaped (so ``/`` and ``%`` never appear in it)::

    <key_prefix>/<run>/state            the state; its mod_revision is the compare-and-set token
    <key_prefix>/<run>/joins/<uuid>     pending join/leave announcements, on the poster's session lease
    <key_prefix>/<run>/withdrawn        rewritten by each withdrawal of an announcement: its
                                        mod_revision fences the writes that fold announcements
    <key_prefix>/<run>/alive/<node>     one key per live node, on that node's own lease
    <key_prefix>/<run>/store/<key>      the agents' ``torch.distributed.Store``
    <key_prefix>/<run>/ops/<uuid>       receipts of store operations that must apply once (``add``),
                                        on the run's lease
    <key_prefix>/<run>/quarantine/<host>  a quarantined host's entry, on a lease of its cool-down
    <key_prefix>/<run>/lapses/<host>/<uuid>  one liveness lapse of a host, on a lease of the window

Escaping makes the directories of two runs disjoint whatever their ids: run ``job`` owns
``<prefix>/job/`` and nothing of run ``job/x`` (``<prefix>/job%2Fx/``), ``job-2`` or ``job.x``, so a
watch, a read or a delete of one run's directory touches that run alone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from urllib.parse import quote, unquote

import etcd3.utils

STATE = "state"
WITHDRAWN = "withdrawn"
# Directories of a run, each below the run's own directory.
JOINS, ALIVE, STORE, OPS = "joins/", "alive/", "store/", "ops/"
QUARANTINE, LAPSES = "quarantine/", "lapses/"


def escape_run_id(run_id: str) -> str:
    """The run id as one path segment: every byte but letters, digits and ``_.-~`` is escaped."""
    if not run_id:
        raise ValueError("The run id must be a non-empty string; pass --rdzv-id.")
    return quote(run_id, safe="")


@dataclass(frozen=True)
class RunKeys:
    """The keys of run ``run_id`` below ``key_prefix`` (which has no trailing ``/``), each made
    once (the liveness checks of a large run name every node's key at each read)."""

    key_prefix: str
    run_id: str

    @functools.cached_property
    def root(self) -> str:
        """The run's directory, with its trailing ``/``: every key of the run starts with it."""
        return f"{self.key_prefix}/{escape_run_id(self.run_id)}/"

    @functools.cached_property
    def state(self) -> str:
        return self.root + STATE

    @functools.cached_property
    def joins(self) -> str:
        return self.root + JOINS

    @functools.cached_property
    def withdrawn(self) -> str:
        return self.root + WITHDRAWN

    @functools.cached_property
    def alive(self) -> str:
        return self.root + ALIVE

    @functools.cached_property
    def store(self) -> str:
        return self.root + STORE

    @functools.cached_property
    def ops(self) -> str:
        return self.root + OPS

    @functools.cached_property
    def quarantine(self) -> str:
        return self.root + QUARANTINE

    def quarantine_key(self, host: str) -> str:
        """The host's quarantine entry; the host is escaped like a run id."""
        return self.quarantine + quote(host, safe="")

    def lapses_of(self, host: str) -> str:
        """The directory of the host's lapse records."""
        return f"{self.root}{LAPSES}{quote(host, safe='')}/"

    def alive_key(self, node_key: str) -> str:
        return self.alive + node_key

    def node_of(self, alive_key: bytes) -> str | None:
        """The node key of a liveness key of this run; ``None`` for a key that is not UTF-8, which no
        node of this package writes (another client's key, or a hostile one: it names no node)."""
        try:
            return alive_key[len(self.alive) :].decode()
        except UnicodeDecodeError:
            return None


def prefix_range(prefix: str | bytes) -> tuple[bytes, bytes]:
    """The ``[key, range_end)`` that etcd reads, watches or deletes for every key under ``prefix``."""
    raw = prefix.encode() if isinstance(prefix, str) else prefix
    return raw, etcd3.utils.prefix_range_end(raw)


def run_of_state_key(key_prefix: str, key: str) -> str | None:
    """The run id whose state key is ``key``, or ``None`` if ``key`` is no run's state key."""
    head = key_prefix + "/"
    if not key.startswith(head) or not key.endswith("/" + STATE):
        return None
    segment = key[len(head) : -len(STATE) - 1]
    return unquote(segment) if segment and "/" not in segment else None


def run_of_key(key_prefix: str, key: str) -> str | None:
    """The run id whose directory holds ``key``, or ``None`` if it is in none."""
    head = key_prefix + "/"
    if not key.startswith(head):
        return None
    segment, sep, _ = key[len(head) :].partition("/")
    return unquote(segment) if segment and sep else None
