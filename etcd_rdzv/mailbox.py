"""The announcement mailbox: one key per announcement, ordered by etcd's revision counter."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousStateError

from rdzv_common.backend import Mailbox, Record

from .keys import prefix_range
from .liveness import EtcdLiveness
from .run import EtcdRun, Floor
from .runtime.txn import Delete, Get, Put, Txn, absent, exists, mod_below

logger = logging.getLogger(__name__)


class Batch(list):
    """Records as one read returned them, with the revision of the last withdrawal it had seen."""

    def __init__(self, records: Sequence[Record], withdrawn_at: int) -> None:
        super().__init__(records)
        self.withdrawn_at = withdrawn_at


class EtcdMailbox(Mailbox):
    """Announcements are keys ``<run>/joins/<uuid>`` on the poster's liveness lease (the run's,
    without a poster); a record's position is its create revision, a cursor a revision. A post only
    creates its key, so a retry whose first attempt landed changes nothing. A withdrawal deletes its
    record and rewrites ``<run>/withdrawn``; a folding write requires that key unchanged since its
    read (``fence``)."""

    def __init__(self, run: EtcdRun, floor: Floor, liveness: EtcdLiveness) -> None:
        self._run, self._floor, self._liveness = run, floor, liveness

    def post(self, record: bytes, poster: str | None = None) -> Record:
        """Create the record; the poster's liveness key goes with it when not put yet."""
        key = (self._run.keys.joins + uuid.uuid4().hex).encode()
        lease = self._liveness.lease_of(poster) if poster is not None else None
        alive = self._liveness.first_put(poster, lease) if lease is not None else []
        put = Txn([absent(key)], [Put(key, bytes(record), lease or self._run.lease), *alive], [Get(key)])
        result = self._run.txn(put, self._floor)
        if alive:
            self._liveness.put_done(poster)
        return Record(bytes(record), result.revision if result.succeeded else result.kv(0).create_revision, key)

    def read(self, cursor: int) -> Batch:
        """The records after ``cursor``, from the cache when it can vouch for them; a cursor past
        etcd's newest revision (no state of this package holds one) raises ``RendezvousStateError``."""
        marker = self._run.keys.withdrawn.encode()
        request = Txn(then=[Get(*prefix_range(self._run.keys.joins), after=cursor), Get(marker)])

        def from_etcd() -> tuple[Batch, int]:
            found = self._run.cache.fetch(request, self._floor, ("joins", cursor))
            records = [Record(kv.value, kv.create_revision, kv.key) for kv in found.kvs(0)]
            return Batch(records, found.kv(1).mod_revision if found.kv(1) else 0), found.revision

        def cached(cache) -> tuple[Batch, int]:
            withdrawn = cache.get("withdrawn", b"")
            return Batch(cache.items("joins", cursor), withdrawn.mod_revision if withdrawn else 0), cache.applied

        records, head = self._run.cache.answer(cached, from_etcd, self._floor)
        if cursor > head:
            raise RendezvousStateError(
                f"The rendezvous state of run '{self._run.run_id}' ({self._run.describe()}) is corrupt: its "
                f"cursor {cursor} is past etcd's newest revision {head}, so it names records that were "
                "never written. Reset the run (`etcd-rdzv reset RUN_ID --yes`) or use a new run id."
            )
        return records

    def fence(self, folded: Sequence[Record]) -> list:
        """The compare that keeps a write folding ``folded`` (a ``read``) from landing after any
        withdrawal since that read."""
        if not folded:
            return []
        seen = getattr(folded, "withdrawn_at", None)
        if seen is None:  # not a read's: no withdrawal since the oldest record is known of
            seen = min(record.position for record in folded) - 1
        return [mod_below(self._run.keys.withdrawn.encode(), seen + 1)]

    def withdraw(self, handle: bytes) -> None:
        """Delete the record, if still there, and mark the withdrawal (``fence``)."""
        marker = self._run.keys.withdrawn.encode()
        self._run.txn(Txn([exists(handle)], [Delete(handle), Put(marker, b"", self._run.lease)]), self._floor)

    def trim(self, cursor: int) -> None:
        """Delete the records up to ``cursor`` the cache knows of; best effort, records also lapse
        with their poster's liveness."""
        keys = self._run.cache.peek(lambda cache: [r.handle for r in cache.items("joins") if r.position <= cursor])
        try:
            self._run.txns([Delete(key) for key in keys], self._floor)
        except RendezvousConnectionError as exc:
            logger.warning("Could not trim the mailbox at %s: %s", self._run.keys.joins, exc)
