"""The announcement mailbox: one key per announcement, ordered by etcd's revision counter."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import etcd3
from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from rdzv_common.backend import Mailbox, Record

from .client import MAX_TXN_OPS, Retryable
from .keys import prefix_range
from .lease import is_lease_missing
from .run import EtcdRun, Floor, Seen

logger = logging.getLogger(__name__)


class EtcdMailbox(Mailbox):
    """Announcements are keys ``<run>/joins/<uuid>``; a record's position is its create revision
    and its handle its key.

    A cursor is an etcd revision: ``read(cursor)`` returns the records created after it. Keys are
    written once, so their ``mod_revision`` equals their ``create_revision`` and the server can
    filter on it. Each announcement lives on the poster's session lease, so a poster that dies
    before it is folded takes it with it. A write that folds records is fenced on their keys (one
    compare each, within etcd's limit of operations per transaction), so ``withdraw`` (deleting the
    key) keeps a record from ever being folded.
    """

    # One compare of a fencing write is the state's token; etcd allows MAX_TXN_OPS per transaction.
    batch_limit = MAX_TXN_OPS - 1

    def __init__(self, run: EtcdRun, floor: Floor) -> None:
        self._run = run
        self._floor = floor

    def post(self, record: bytes) -> Record:
        key = (self._run.keys.joins + uuid.uuid4().hex).encode()
        session = self._run.session

        def put(client: etcd3.MultiEndpointEtcd3Client, _: int) -> Seen[int]:
            lease_id = session.lease_id(client)
            try:
                revision = client.put(key, bytes(record), lease=lease_id).header.revision
            except Exception as exc:
                if is_lease_missing(exc):
                    session.lost(lease_id)
                    raise Retryable(f"session lease {lease_id:x} expired") from exc
                raise
            return Seen(revision, revision)

        return Record(bytes(record), self._run.write(put, self._floor), key)

    def read(self, cursor: int) -> list[Record]:
        """The records after ``cursor``, from the process's run view when it can vouch for them."""
        start, end = prefix_range(self._run.keys.joins)

        def from_etcd() -> list[tuple[bytes, bytes, int]]:
            def get(client: etcd3.MultiEndpointEtcd3Client) -> Seen[list[tuple[bytes, bytes, int]]]:
                response = client.get_range_response(
                    start, end, sort_order="ascend", sort_target="create", min_mod_revision=cursor + 1
                )
                found = [(kv.key, kv.value, kv.create_revision) for kv in response.kvs]
                # Seeing these records, the process must not decide on a view that lacks them.
                return Seen(found, max((rev for *_, rev in found), default=0))

            return self._run.read(get, self._floor)

        found = self._run.viewed(lambda view, floor: view.joins(cursor, floor), from_etcd, self._floor)
        return [Record(value, revision, key) for key, value, revision in found]

    def withdraw(self, handle: Any) -> None:
        """Delete the record; a fencing write that folded it fails from now on."""

        def delete(client: etcd3.MultiEndpointEtcd3Client, _: int) -> Seen[None]:
            response = client.delete(handle, return_response=True)
            return Seen(None, response.header.revision if response.deleted else 0)

        self._run.write(delete, self._floor)

    def trim(self, cursor: int) -> None:
        """Delete the records up to ``cursor`` that the view knows of; best effort, since records
        also lapse with their poster's session."""
        keys = self._run.view.join_keys_up_to(cursor)
        try:
            for start in range(0, len(keys), MAX_TXN_OPS):
                chunk = keys[start : start + MAX_TXN_OPS]

                def delete(client: etcd3.MultiEndpointEtcd3Client, _: int, chunk: list[bytes] = chunk) -> Seen[None]:
                    tx = client.transactions
                    _, responses = client.transaction(
                        compare=[], success=[tx.delete(key) for key in chunk], failure=[]
                    )
                    revision = responses[0].response_delete_range.header.revision if responses else 0
                    return Seen(None, revision)

                self._run.write(delete, self._floor)
        except RendezvousConnectionError as exc:
            logger.warning("Could not trim the mailbox at %s: %s", self._run.keys.joins, exc)
