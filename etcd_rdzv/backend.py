"""``EtcdRendezvousBackend``: one node's rendezvous backend, a thin view onto the process's
``EtcdRun`` of its run (see ``keys.py`` for the key layout, ``run.py`` for the rules)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import etcd3

from rdzv_common.backend import Liveness, LivenessLapsed, Mailbox, Quarantine, Record, RendezvousBackend, Token

from .keys import prefix_range
from .lease import revoke
from .liveness import EtcdLiveness
from .mailbox import EtcdMailbox
from .quarantine import EtcdQuarantine
from .run import EtcdRun, Floor, Seen


class EtcdRendezvousBackend(RendezvousBackend):
    """One run's state in etcd, compare-and-set by transaction and waited on by watch. etcd keeps
    it, and its leases, through an outage of every member.

    Args:
        run: the process's run object; the backend holds one use of it and ``release``s it on
            ``close`` (``registry.release`` by default).
        name: the rendezvous backend name torchrun was asked for (``etcd-v2`` or ``etcd_rdzv``).
    """

    survives_outages = True

    def __init__(self, run: EtcdRun, name: str = "etcd-v2", release: Any = None) -> None:
        self._run = run
        self._name = name
        self._release = release
        # What this node has written or read of the run: its reads from the view are at least this new.
        self._floor = Floor()
        self._mailbox = EtcdMailbox(run, self._floor)
        self._liveness = EtcdLiveness(run, self._floor)
        self._quarantine = EtcdQuarantine(run, self._floor)
        self._close_lock = threading.Lock()
        self._closed = False

    @property
    def name(self) -> str:
        return self._name

    @property
    def run(self) -> EtcdRun:
        return self._run

    @property
    def floor(self) -> Floor:
        """The newest revision of the run this node has written or read."""
        return self._floor

    @property
    def key(self) -> str:
        """The state key."""
        return self._run.keys.state

    @property
    def location(self) -> str:
        return self._run.describe()

    def get_state(self, timeout: float | None = None) -> tuple[bytes, Token] | None:
        """The state from the process's run view when it can vouch for it, else from etcd (within
        ``timeout`` seconds, if given)."""
        key = self._run.keys.state

        def from_etcd() -> tuple[bytes, Token] | None:
            def get(client: etcd3.MultiEndpointEtcd3Client) -> Seen[tuple[bytes, int] | None]:
                response = client.get_response(key)
                if not response.kvs:
                    return Seen(None)
                kv = response.kvs[0]
                return Seen((kv.value, kv.mod_revision), kv.mod_revision)

            return self._run.read(get, self._floor, shared=("state", timeout), budget=timeout)

        return self._run.viewed(lambda view, floor: view.state(floor), from_etcd, self._floor)

    def set_state(
        self, state: bytes, token: Token | None = None, fence: Sequence[Record] = (), member: str | None = None
    ) -> tuple[bytes, Token, bool] | None:
        """Compare-and-set on the state key's mod revision; a write that folds the records in
        ``fence`` lands only if none of them was withdrawn since it read them (``EtcdMailbox``),
        and one that names a ``member`` only while that node's liveness key is on the lease it
        beats (``EtcdLiveness.member_compare``)."""
        key = self._run.keys.state
        alive_key, alive = self._liveness.member_compare(member) if member is not None else (None, None)
        lapsed = []

        def compare_and_set(client: etcd3.MultiEndpointEtcd3Client, lease_id: int) -> Seen:
            tx = client.transactions
            compare = [tx.create(key) == 0 if token is None else tx.mod(key) == token]
            compare += self._mailbox.fence_compare(client, fence)
            failure = [tx.get(key)]
            if alive is not None:
                compare.append(alive)
                failure.append(tx.get(alive_key))
            succeeded, responses = client.transaction(
                compare=compare,
                success=[tx.put(key, bytes(state), lease=lease_id)],
                failure=failure,
            )
            if succeeded:
                revision = responses[0].response_put.header.revision
                return Seen((bytes(state), revision, True), revision)
            if alive is not None and (not responses[1] or responses[1][0][1].lease_id != alive.value):
                lapsed.append(alive.value)
            if not responses[0]:
                return Seen(None)
            value, meta = responses[0][0]
            return Seen((value, meta.mod_revision, False), meta.mod_revision)

        written = self._run.write(compare_and_set, self._floor)
        if lapsed:
            self._liveness.lapsed(member, lapsed[0])
            raise LivenessLapsed(
                f"the liveness of '{member}' ({self._run.keys.alive_key(member)}) lapsed before its write of "
                f"{self.location} landed"
            )
        return written

    def wait_for_change(self, token: Token | None, timeout: float) -> None:
        """Wait on the process's run view until the state has a revision after ``token``, or
        ``timeout`` (at most a second: the caller looks again). No request is made."""
        self._run.view.wait_state_past(token, timeout)

    @property
    def mailbox(self) -> Mailbox:
        return self._mailbox

    @property
    def liveness(self) -> Liveness:
        return self._liveness

    @property
    def quarantine(self) -> Quarantine:
        return self._quarantine

    def delete_run(self) -> None:
        """Delete every key of the run (its directory) and the run's lease.

        Nodes still in the run see it vanish; use this to reset a run that no node uses.
        """
        start, end = prefix_range(self._run.keys.root)

        def delete(client: etcd3.MultiEndpointEtcd3Client, _: int) -> Seen[None]:
            tx = client.transactions
            _, responses = client.transaction(compare=[], success=[tx.delete(start, end)], failure=[])
            return Seen(None, responses[0].response_delete_range.header.revision)

        self._run.write(delete, self._floor)
        revoke(self._run.etcd, self._run.lease.id)

    def close(self) -> None:
        """Revoke the liveness leases of this backend's nodes and let go of the run. The run's
        shared lease is left to lapse: other nodes still use the state it carries."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._liveness.close()
        finally:
            if self._release is not None:
                self._release(self._run)

