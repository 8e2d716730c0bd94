"""``EtcdRendezvousBackend``: the rendezvous state of one run in etcd v3.

Key layout, below ``key_prefix`` (default ``/torch/elastic/rendezvous``)::

    <key_prefix>/<run_id>                   the state; its fencing token is the key's mod_revision
    <key_prefix>/<run_id>/joins/<uuid hex>  join announcements, on the posting process's session lease
    <key_prefix>/<run_id>/alive/<node key>  liveness, each on its node's own lease
    <key_prefix>/<run_id>/store/<key>       the agents' store (``EtcdStore``)

Everything of a run is below its state key, so runs are isolated by run id and key prefix alike.
The state key and the store's keys live on the run's shared lease (``RunLease``).
"""

from __future__ import annotations

import threading

import etcd3
import etcd3.utils

from rdzv_common.backend import Liveness, Mailbox, RendezvousBackend, Token

from .client import EtcdClient
from .lease import RunLease, is_lease_missing, revoke, sessions
from .liveness import EtcdLiveness
from .mailbox import EtcdMailbox
from .runview import ViewBehind, ViewReader


def state_key(key_prefix: str, run_id: str) -> str:
    """The key that holds ``run_id``'s state."""
    return f"{key_prefix}/{run_id}"


def store_prefix(key_prefix: str, run_id: str) -> str:
    """The key directory of ``run_id``'s agents' store."""
    return f"{state_key(key_prefix, run_id)}/store"


class EtcdRendezvousBackend(RendezvousBackend):
    """One run's state in etcd, compare-and-set by transaction and waited on by watch.

    Args:
        etcd: the client; the backend owns it from now on and closes it in ``close``.
        run_id: the run, which names the state key.
        name: the rendezvous backend name torchrun was asked for (``etcd-v2`` or ``etcd_rdzv``).
        run_lease: the run's shared lease; one is made for the run if not given.
    """

    def __init__(
        self,
        etcd: EtcdClient,
        run_id: str,
        name: str = "etcd-v2",
        run_lease: RunLease | None = None,
    ) -> None:
        self._etcd = etcd
        self._name = name
        self._run_id = run_id
        self._key = state_key(etcd.config.key_prefix, run_id)
        self._run_lease = run_lease or RunLease(self._key, etcd.config.ttl)
        self._reader = ViewReader(etcd.config, self._key)
        # Open the run's view now, so that it has loaded by the first rendezvous.
        self._reader.view()
        self._session = sessions.acquire(etcd.config)
        self._mailbox = EtcdMailbox(etcd, f"{self._key}/joins/", self._session, self._reader)
        self._liveness = EtcdLiveness(etcd, f"{self._key}/alive/", self._run_lease, self._reader)
        self._close_lock = threading.Lock()
        self._closed = False

    @property
    def name(self) -> str:
        return self._name

    @property
    def key(self) -> str:
        """The state key."""
        return self._key

    @property
    def location(self) -> str:
        return f"etcd key '{self._key}' at {self._etcd.config.describe_endpoints()}"

    @property
    def reader(self) -> ViewReader:
        """This backend's reader of the process's shared view of the run."""
        return self._reader

    @property
    def run_lease(self) -> RunLease:
        return self._run_lease

    def get_state(self) -> tuple[bytes, Token] | None:
        """The state from the process's run view when it is current (no request), else from etcd."""
        try:
            return self._reader.view().state()
        except ViewBehind:
            pass
        response = self._etcd.request(lambda c: c.get_response(self._key))
        if not response.kvs:
            return None
        kv = response.kvs[0]
        self._reader.saw(kv.mod_revision)
        return kv.value, kv.mod_revision

    def set_state(self, state: bytes, token: Token | None = None) -> tuple[bytes, Token, bool] | None:
        def compare_and_set(client: etcd3.MultiEndpointEtcd3Client) -> tuple[bool, list]:
            lease_id = self._run_lease.current(client)
            tx = client.transactions
            compare = tx.create(self._key) == 0 if token is None else tx.mod(self._key) == token
            try:
                return client.transaction(
                    compare=[compare],
                    success=[tx.put(self._key, bytes(state), lease=lease_id)],
                    failure=[tx.get(self._key)],
                )
            except Exception as exc:
                if is_lease_missing(exc):
                    self._run_lease.lost()
                raise

        succeeded, responses = self._etcd.request(compare_and_set)
        if succeeded:
            revision = responses[0].response_put.header.revision
            self._reader.saw(revision)
            return bytes(state), revision, True
        if not responses[0]:
            return None
        value, meta = responses[0][0]
        self._reader.saw(meta.mod_revision)
        return value, meta.mod_revision, False

    def wait_for_change(self, token: Token | None, timeout: float) -> None:
        """Wait on the process's shared run view until the state has a revision after ``token``
        or ``timeout``. No request is made; an etcd outage ends the wait at ``timeout``."""
        try:
            view = self._reader.view()
        except ViewBehind:
            return  # closed
        view.wait_state_past(token, timeout)

    @property
    def mailbox(self) -> Mailbox | None:
        return self._mailbox

    @property
    def liveness(self) -> Liveness:
        return self._liveness

    def delete_run(self) -> None:
        """Delete the run: its state, joins, liveness and store keys, and the run's lease.

        Nodes still in the run see it vanish; use this to reset a run that no node uses.
        """
        run_prefix = f"{self._key}/".encode()

        def delete(client: etcd3.MultiEndpointEtcd3Client) -> None:
            tx = client.transactions
            client.transaction(
                compare=[],
                success=[
                    tx.delete(self._key),
                    tx.delete(run_prefix, etcd3.utils.prefix_range_end(run_prefix)),
                ],
                failure=[],
            )

        self._etcd.request(delete)
        revoke(self._etcd, self._run_lease.id)

    def close(self) -> None:
        """Revoke this process's session and liveness leases and close the client. The run's
        shared lease is left to lapse: other nodes still use the state it carries."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._reader.close()
            sessions.release(self._etcd.config)
            self._liveness.close()
        finally:
            self._etcd.close()
