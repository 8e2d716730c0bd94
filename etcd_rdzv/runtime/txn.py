"""Transactions as data, and the one executor that runs them. A put names its lease as an id or a
lease object (``lessor.SharedLease``, ``liveness.NodeLease``), resolved in each attempt and granted
anew when etcd says it is gone. ``run`` raises the caller's ``Floor`` to what the transaction wrote
or read (``Result.seen``): no caller ever chooses a revision (``cache.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import grpc
from etcd3.etcdrpc import Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, ResponseOp, TxnRequest

from .client import EtcdClient, FailoverClient, Retryable, fail_over


@dataclass(frozen=True)
class Put:
    key: bytes
    value: bytes
    lease: Any = 0  # an id, or an object with ``current(client)`` and ``lost(id)``


@dataclass(frozen=True)
class Get:
    key: bytes
    end: bytes = b""  # a range [key, end) when given
    keys_only: bool = False
    count_only: bool = False
    after: int | None = None  # only keys created after this revision, oldest first


@dataclass(frozen=True)
class Delete:
    key: bytes
    end: bytes = b""
    prev_kv: bool = False


Op = Union[Put, Get, Delete]


def prefix_end(prefix: bytes) -> bytes:
    """etcd's range end for every key under ``prefix``."""
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


def absent(key: bytes) -> Compare:
    return Compare(key=key, target=Compare.CREATE, result=Compare.EQUAL, create_revision=0)


def exists(key: bytes) -> Compare:
    return Compare(key=key, target=Compare.VERSION, result=Compare.GREATER, version=0)


def mod_is(key: bytes, revision: int) -> Compare:
    return Compare(key=key, target=Compare.MOD, result=Compare.EQUAL, mod_revision=revision)


def mod_below(key: bytes, revision: int) -> Compare:
    return Compare(key=key, target=Compare.MOD, result=Compare.LESS, mod_revision=revision)


def lease_is(key: bytes, lease_id: int) -> Compare:
    """The key is on ``lease_id`` (a key that does not exist is on lease 0)."""
    return Compare(key=key, target=Compare.LEASE, result=Compare.EQUAL, lease=lease_id)


@dataclass(frozen=True)
class Txn:
    compare: Sequence[Compare] = ()
    then: Sequence[Op] = ()
    orelse: Sequence[Op] = ()


@dataclass
class Result:
    """What a transaction did: whether its compares held, its revision, and each operation's
    response of the branch that ran (``kvs(i)``, ``count(i)``, ``deleted(i)``)."""

    succeeded: bool
    revision: int
    responses: list = field(repr=False)

    def kvs(self, index: int) -> list:
        return list(self.responses[index].response_range.kvs)

    def kv(self, index: int) -> Any:
        kvs = self.responses[index].response_range.kvs
        return kvs[0] if kvs else None

    def count(self, index: int) -> int:
        return self.responses[index].response_range.count

    def deleted(self, index: int) -> int:
        return self.responses[index].response_delete_range.deleted

    def prev_kvs(self, index: int) -> list:
        return list(self.responses[index].response_delete_range.prev_kvs)

    @property
    def seen(self) -> int:
        """The newest revision of the keys it wrote (its own) or else read (0: none)."""
        if any(r.HasField("response_put") or r.response_delete_range.deleted for r in self.responses):
            return self.revision
        return max((kv.mod_revision for r in self.responses for kv in r.response_range.kvs), default=0)


def run(etcd: EtcdClient, txn: Txn, floor: Any = None, budget: float | None = None) -> Result:
    """Run ``txn`` on ``etcd`` for up to ``budget`` seconds (``read_timeout``), else raise
    ``RendezvousConnectionError``; raise ``floor`` (anything with ``raise_to``) to what it saw."""
    result = etcd.request(lambda client: _attempt(client, txn), budget)
    if floor is not None:
        floor.raise_to(result.seen)
    return result


def _attempt(client: FailoverClient, txn: Txn) -> Result:
    if not txn.compare and not txn.orelse and all(isinstance(op, Get) for op in txn.then):
        return _read(client, txn.then)
    leases: dict[int, Any] = {}
    request = TxnRequest(
        compare=txn.compare,
        success=[_request(client, op, leases) for op in txn.then],
        failure=[_request(client, op, leases) for op in txn.orelse],
    )
    try:
        response = client.kvstub.Txn(request, client.timeout, credentials=client.call_credentials, metadata=client.metadata)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND and leases:  # etcd's only NOT_FOUND: a lease gone
            for lease_id, lease in leases.items():
                lease.lost(lease_id)
            raise Retryable(f"a lease of the transaction expired: {exc.details()}") from exc
        fail_over(client, exc)
    return Result(response.succeeded, response.header.revision, list(response.responses))


def _read(client: FailoverClient, gets: Sequence[Get]) -> Result:
    """Reads only, as ``Range`` requests at one revision: etcd before 3.5.5 crashes when the client
    of a read-only transaction gives up while etcd serves it (etcd-io/etcd#14110)."""
    responses: list[ResponseOp] = []
    revision = 0
    for get in gets:
        request = _request(client, get, {}).request_range
        request.revision = revision  # 0, the newest, for the first: the others read what it read
        try:
            response = client.kvstub.Range(request, client.timeout, credentials=client.call_credentials,
                                           metadata=client.metadata)
        except grpc.RpcError as exc:
            fail_over(client, exc)
        revision = revision or response.header.revision
        responses.append(ResponseOp(response_range=response))
    return Result(True, revision, responses)


def _request(client: FailoverClient, op: Op, leases: dict[int, Any]) -> RequestOp:
    if isinstance(op, Put):
        lease = op.lease
        if not isinstance(lease, int):
            lease_id = lease.current(client)
            leases[lease_id] = lease
            lease = lease_id
        return RequestOp(request_put=PutRequest(key=op.key, value=op.value, lease=lease))
    if isinstance(op, Get):
        request = RangeRequest(key=op.key, range_end=op.end, keys_only=op.keys_only, count_only=op.count_only)
        if op.after is not None:
            request.min_create_revision = op.after + 1
            request.sort_target, request.sort_order = RangeRequest.CREATE, RangeRequest.ASCEND
        return RequestOp(request_range=request)
    return RequestOp(request_delete_range=DeleteRangeRequest(key=op.key, range_end=op.end, prev_kv=op.prev_kv))
