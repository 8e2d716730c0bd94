"""The join mailbox: one key per announcement, ordered by etcd's revision counter."""

from __future__ import annotations

import logging
import threading
import uuid

import etcd3
import etcd3.utils
from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from rdzv_common.backend import Mailbox

from .client import MAX_TXN_OPS, EtcdClient
from .lease import Session, is_lease_missing
from .runview import ViewBehind, ViewReader

logger = logging.getLogger(__name__)



class EtcdMailbox(Mailbox):
    """Announcements are keys ``<prefix><uuid>``; a record's position is its ``create_revision``.

    A cursor is an etcd revision: ``read(cursor)`` returns the records created after it. Keys are
    written once, so their ``mod_revision`` equals their ``create_revision`` and the server can
    filter on it. Each announcement lives on the poster's session lease, so a poster that dies
    before its join is folded in takes the join with it.
    """

    def __init__(self, etcd: EtcdClient, prefix: str, session: Session, reader: ViewReader) -> None:
        self._etcd = etcd
        self._prefix = prefix.encode()
        self._session = session
        self._reader = reader
        self._lock = threading.Lock()
        # key -> create_revision of the records this mailbox returned, which ``trim`` deletes.
        self._read: dict[bytes, int] = {}

    def post(self, record: bytes) -> None:
        key = self._prefix + uuid.uuid4().hex.encode()

        def put(client: etcd3.MultiEndpointEtcd3Client) -> int:
            lease_id = self._session.lease_id(client)
            try:
                return client.put(key, bytes(record), lease=lease_id).header.revision
            except Exception as exc:
                if is_lease_missing(exc):
                    self._session.lost(lease_id)
                raise

        self._reader.saw(self._etcd.request(put))

    def read(self, cursor: int) -> tuple[list[bytes], int]:
        """The records after ``cursor``, from the process's run view when it is current."""
        try:
            found = self._reader.view().joins(cursor)
        except ViewBehind:
            response = self._etcd.request(
                lambda c: c.get_range_response(
                    self._prefix,
                    etcd3.utils.prefix_range_end(self._prefix),
                    sort_order="ascend",
                    sort_target="create",
                    min_mod_revision=cursor + 1,
                )
            )
            found = [(kv.key, kv.value, kv.create_revision) for kv in response.kvs]
        with self._lock:
            self._read.update((key, revision) for key, _, revision in found)
        # The last record's revision, not the header's: an empty read must leave the cursor alone
        # or every write would move it.
        return [value for _, value, _ in found], max([cursor, *(revision for _, _, revision in found)])

    def trim(self, cursor: int) -> None:
        """Delete the records up to ``cursor`` that this mailbox has read; best effort, since
        records also lapse with their poster's session."""
        with self._lock:
            keys = [key for key, revision in self._read.items() if revision <= cursor]
            for key in keys:
                del self._read[key]
        try:
            for start in range(0, len(keys), MAX_TXN_OPS):
                chunk = keys[start : start + MAX_TXN_OPS]
                self._etcd.request(
                    lambda c, chunk=chunk: c.transaction(
                        compare=[], success=[c.transactions.delete(key) for key in chunk], failure=[]
                    )
                )
        except RendezvousConnectionError as exc:
            logger.warning("Could not trim the join mailbox at %s: %s", self._prefix.decode(), exc)
