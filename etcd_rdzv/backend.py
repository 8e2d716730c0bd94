"""``EtcdRendezvousBackend``: one node's rendezvous backend on the process's ``EtcdRun``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from rdzv_common.backend import Liveness, LivenessLapsed, Mailbox, Quarantine, Record, RendezvousBackend, Token

from .keys import prefix_range
from .liveness import EtcdLiveness
from .mailbox import EtcdMailbox
from .quarantine import EtcdQuarantine
from .run import EtcdRun, Floor
from .runtime.lessor import revoke
from .runtime.txn import Delete, Get, Put, Txn, absent, lease_is, mod_is


class EtcdRendezvousBackend(RendezvousBackend):
    """The run's state compare-and-set by transaction on its ``mod_revision``, read from and waited
    on in the process's cache; etcd keeps it through an outage of every member. The backend holds
    one use of ``run``, handed to ``release`` on ``close``; ``name`` is the one torchrun asked for."""

    survives_outages = True

    def __init__(self, run: EtcdRun, name: str = "etcd-v2", release: Callable[[EtcdRun], None] | None = None) -> None:
        self._run, self._name, self._release = run, name, release
        self.floor = Floor()  # what this node wrote or read of the run
        self._liveness = EtcdLiveness(run, self.floor)
        self._mailbox = EtcdMailbox(run, self.floor, self._liveness)
        self._quarantine = EtcdQuarantine(run, self.floor)
        self._close_lock = threading.Lock()
        self._closed = False

    name: str = property(lambda self: self._name)
    run: EtcdRun = property(lambda self: self._run)
    key: str = property(lambda self: self._run.keys.state)
    location: str = property(lambda self: self._run.describe())
    mailbox: Mailbox = property(lambda self: self._mailbox)
    liveness: Liveness = property(lambda self: self._liveness)
    quarantine: Quarantine = property(lambda self: self._quarantine)

    def get_state(self, timeout: float | None = None) -> tuple[bytes, Token] | None:
        """From the cache when it can vouch for this node's floor, else from etcd (within ``timeout``)."""

        def state(kv) -> tuple[bytes, int] | None:
            return None if kv is None else (kv.value, kv.mod_revision)

        request = Txn(then=[Get(self.key.encode())])
        return self._run.cache.answer(
            lambda cache: state(cache.get("state", b"")),
            lambda: state(self._run.cache.fetch(request, self.floor, "state", timeout).kv(0)),
            self.floor,
        )

    def set_state(
        self, state: bytes, token: Token | None = None, fence: Sequence[Record] = (), member: str | None = None
    ) -> tuple[bytes, Token, bool] | None:
        """Lands only on ``token``, if no record of ``fence`` was withdrawn since it was read
        (``EtcdMailbox.fence``), and while ``member``'s liveness key is on the lease it beats."""
        key = self.key.encode()
        compare = [absent(key) if token is None else mod_is(key, token), *self._mailbox.fence(fence)]
        orelse = [Get(key)]
        if member is not None:
            alive_key, lease_id = self._liveness.member_lease(member)
            compare.append(lease_is(alive_key, lease_id))
            orelse.append(Get(alive_key))
        result = self._run.txn(Txn(compare, [Put(key, bytes(state), self._run.lease)], orelse), self.floor)
        if result.succeeded:
            return bytes(state), result.revision, True
        alive = result.kv(1) if member is not None else None
        if member is not None and (alive is None or alive.lease != lease_id):
            self._liveness.lapsed(member, lease_id)
            raise LivenessLapsed(f"the liveness of '{member}' lapsed before its write of {self.location} landed")
        current = result.kv(0)
        return None if current is None else (current.value, current.mod_revision, False)

    def wait_for_change(self, token: Token | None, timeout: float) -> None:
        """Until the state changed after ``token``, or ``timeout`` (a second at most), on the cache."""
        self._run.cache.wait_changed("state", token or 0, timeout)

    def delete_run(self) -> None:
        """Delete every key of the run and its lease; nodes still in the run see it vanish."""
        self._run.txn(Txn(then=[Delete(*prefix_range(self._run.keys.root))]), self.floor)
        revoke(self._run.etcd, self._run.lease.id)

    def close(self) -> None:
        """Revoke this backend's nodes' liveness leases and let go of the run. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._liveness.close()
        finally:
            if self._release is not None:
                self._release(self._run)
