"""The announcement mailbox: one key per announcement, ordered by etcd's revision counter."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

import etcd3
from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousStateError

from rdzv_common.backend import Mailbox, Record

from .client import MAX_TXN_OPS, Retryable
from .keys import prefix_range
from .lease import is_lease_missing
from .run import EtcdRun, Floor, Seen
from .view import Announcement

logger = logging.getLogger(__name__)


class EtcdMailbox(Mailbox):
    """Announcements are keys ``<run>/joins/<uuid>``; a record's position is its create revision.

    A cursor is an etcd revision: ``read(cursor)`` returns the records created after it. A post
    only creates its key (a retry whose first attempt landed finds it and changes nothing), but a
    key's ``mod_revision`` is never taken for its place: another client may put it again. Each
    announcement lives on the poster's session lease, so a poster that dies before it is folded
    takes it with it.

    Fencing takes one compare, however many records a write folds: ``withdraw`` deletes the
    record and rewrites ``<run>/withdrawn`` in one transaction, and a write that folds records
    requires that key to be no newer than the oldest ``seen_at`` of its records (``fence_compare``):
    a revision at which the record existed, and which is no older than any withdrawal its reader
    saw. A withdrawal after the read fails the write, whichever record it took back; the writer
    reads again and folds what is left. The run view hands every node of the process the same
    record objects, so a read costs no work per record.
    """

    def __init__(self, run: EtcdRun, floor: Floor) -> None:
        self._run = run
        self._floor = floor

    def post(self, record: bytes) -> Record:
        key = (self._run.keys.joins + uuid.uuid4().hex).encode()
        session = self._run.session

        def create(client: etcd3.MultiEndpointEtcd3Client, _: int) -> Seen[int]:
            lease_id = session.lease_id(client)
            tx = client.transactions
            try:
                created, responses = client.transaction(
                    compare=[tx.create(key) == 0],
                    success=[tx.put(key, bytes(record), lease=lease_id)],
                    failure=[tx.get(key)],
                )
            except Exception as exc:
                if is_lease_missing(exc):
                    session.lost(lease_id)
                    raise Retryable(f"session lease {lease_id:x} expired") from exc
                raise
            if created:
                revision = responses[0].response_put.header.revision
                return Seen(revision, revision)
            # An earlier attempt created it and its response was lost: the record stands as it was.
            _, meta = responses[0][0]
            return Seen(meta.create_revision, meta.mod_revision)

        revision = self._run.write(create, self._floor)
        return Record(bytes(record), revision, Announcement(key, revision))

    def read(self, cursor: int) -> list[Record]:
        """The records after ``cursor``, from the process's run view when it can vouch for them.

        Raises:
            RendezvousStateError: ``cursor`` is past the newest revision of etcd: no state written
                by this package holds such a cursor.
        """
        start, end = prefix_range(self._run.keys.joins)

        def from_etcd() -> tuple[list[Record], int]:
            def get(client: etcd3.MultiEndpointEtcd3Client) -> Seen[tuple[list[Record], int]]:
                # Every record created after the cursor was last modified after it too; etcd cannot
                # filter on the create revision here, so the records modified later are dropped here.
                response = client.get_range_response(
                    start, end, sort_order="ascend", sort_target="create", min_mod_revision=cursor + 1
                )
                seen_at = response.header.revision
                found = [
                    Record(kv.value, kv.create_revision, Announcement(kv.key, seen_at))
                    for kv in response.kvs
                    if kv.create_revision > cursor
                ]
                # Seeing these records, the process must not decide on a view that lacks them.
                return Seen((found, seen_at), max((record.position for record in found), default=0))

            return self._run.read(get, self._floor, shared=("joins", cursor))

        records, head = self._run.viewed(lambda view, floor: view.joins(cursor, floor), from_etcd, self._floor)
        if cursor > head:
            raise RendezvousStateError(
                f"The rendezvous state of run '{self._run.run_id}' ({self._run.describe()}) is corrupt: its "
                f"cursor {cursor} is past etcd's newest revision {head}, so it names records that were "
                "never written. Reset the run (`etcd-rdzv reset RUN_ID --yes`) or use a new run id."
            )
        return records

    def fence_compare(self, client: etcd3.MultiEndpointEtcd3Client, folded: Sequence[Record]) -> list[Any]:
        """The compares that keep a write folding ``folded`` from landing after a withdrawal of
        any of them: no withdrawal since they were all seen to exist."""
        if not folded:
            return []
        seen_at = min(record.handle.seen_at for record in folded)
        return [client.transactions.mod(self._run.keys.withdrawn) < seen_at + 1]

    def withdraw(self, handle: Announcement) -> None:
        """Delete the record, if it is still there, and mark the withdrawal (``fence_compare``)."""
        marker = self._run.keys.withdrawn

        def delete(client: etcd3.MultiEndpointEtcd3Client, lease_id: int) -> Seen[None]:
            tx = client.transactions
            withdrawn, responses = client.transaction(
                compare=[tx.version(handle.key) > 0],
                success=[tx.delete(handle.key), tx.put(marker, b"", lease=lease_id)],
                failure=[],
            )
            return Seen(None, responses[1].response_put.header.revision if withdrawn else 0)

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
