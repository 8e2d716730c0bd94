"""``EtcdRun``: what a process holds of one run on one cluster, shared by its handlers and stores;
and the runtime names the rest of the package (the CLI, the exporter) uses."""

from __future__ import annotations

from typing import Any

from rdzv_common.backend import Record

from .config import EtcdConfig
from .keys import RunKeys
from .runtime import txn
from .runtime.cache import Cache, Floor
from .runtime.client import MAX_TXN_OPS, EtcdClient
from .runtime.fork import Cluster, registry
from .runtime.lessor import SharedLease
from .runtime.watch import Watch, WatchCanceled, WatchCompacted

__all__ = ["Cache", "EtcdClient", "EtcdRun", "Floor", "Watch", "WatchCanceled", "WatchCompacted", "acquire", "release",
           "release_soon"]


class EtcdRun:
    """The run's keys, its shared lease (every key of the run but the announcements, liveness and
    quarantine keys is on it) and the process's cache of its directory. Build it with ``acquire``."""

    def __init__(self, cluster: Cluster, run_id: str) -> None:
        self.etcd = cluster.etcd
        self.keys = RunKeys(self.etcd.config.key_prefix, run_id)
        self.lease = SharedLease(self.keys.state, self.etcd.config.ttl)
        self.cache = Cache(self.etcd, self.keys.root.encode(), self.keys.classify, _item)

    @property
    def run_id(self) -> str:
        return self.keys.run_id

    def describe(self, key: str | None = None) -> str:
        """Where ``key`` (the state key by default) is, for messages."""
        return f"etcd key '{key or self.keys.state}' at {self.etcd.config.describe_endpoints()}"

    def txn(self, request: txn.Txn, floor: Floor, budget: float | None = None) -> txn.Result:
        return txn.run(self.etcd, request, floor, budget)

    def txns(self, ops: list, floor: Floor) -> list[txn.Result]:
        """``ops`` in transactions of at most ``MAX_TXN_OPS`` operations, one after another."""
        return [self.txn(txn.Txn(then=ops[i : i + MAX_TXN_OPS]), floor) for i in range(0, len(ops), MAX_TXN_OPS)]

    def pause(self, timeout: float) -> None:
        self.cache.pause(timeout)

    def resume(self) -> None:
        self.cache.resume()

    def close(self) -> None:
        """Stop the cache's stream; the run's lease is left to lapse, other nodes use it."""
        self.cache.close()


def _item(kind: str, kv: Any) -> Any:
    """What the run's cache keeps of a key: the announcements as the records every node of the
    process is handed (one object per record, not per read), only the existence of store keys."""
    if kind == "joins":
        return Record(kv.value, kv.create_revision, kv.key)
    return True if kind == "store" else kv


def acquire(config: EtcdConfig, run_id: str) -> EtcdRun:
    """The process's ``EtcdRun`` of ``run_id`` (made on first use); ``release`` it when done.
    Raises ``RendezvousConnectionError`` if etcd could not be reached or refused the credentials."""
    return registry.acquire(config, run_id, lambda cluster: EtcdRun(cluster, run_id))


release, release_soon = registry.release, registry.release_soon
