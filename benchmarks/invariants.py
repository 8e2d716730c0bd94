"""The rendezvous invariant checker, shared by the soak benchmark and the fault-injection tests,
and the plain etcd client it reads with.

``InvariantChecker`` watches a run's state key from the moment it starts (through etcd's watch,
so it sees every revision, and across member failures by resuming from the last revision seen)
and records, for each round, the group the first time the round is seen complete. It flags:

* a round that completes twice, or whose group later differs (a member that was not in it, a
  different rank, a different world size);
* ranks other than exactly ``0..n-1`` or a world size other than ``n`` at completion, or a group
  outside ``min_nodes..max_nodes`` when those are given;
* a round number that goes backwards, or a completed round that becomes incomplete again;
* a closed rendezvous that opens again;
* a stored value that does not decode.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import etcd3

from etcd_rdzv.runtime.client import REQUIRE_LEADER
from etcd_rdzv.runtime.watch import Watch, WatchCompacted
from rdzv_common.codec import decode_state
from rdzv_common.state import RendezvousState


# Room for the largest state the codec accepts (gRPC's default limit is 4 MiB), and a subchannel
# of our own: gRPC shares connections between channels to one address, so a checker's client would
# otherwise inherit the reconnect backoff of a handler's client that saw the server down.
_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.use_local_subchannel_pool", 1),
]


def etcd_client(endpoints: str | Iterable[str], timeout: float = 5.0) -> etcd3.MultiEndpointEtcd3Client:
    """A plain client over ``host:port`` endpoints (comma-separated or a list), failing over."""
    if isinstance(endpoints, str):
        endpoints = endpoints.split(",")
    eps = []
    for endpoint in endpoints:
        host, _, port = endpoint.strip().rpartition(":")
        eps.append(etcd3.Endpoint(host, int(port), secure=False, time_retry=0.3, opts=_OPTIONS))
    return etcd3.MultiEndpointEtcd3Client(eps, timeout=timeout, failover=True)

@dataclass(frozen=True)
class Group:
    """The group a round formed: ``ranks`` maps node keys to ranks."""

    round: int
    ranks: dict[str, int]
    world_size: int
    revision: int


class InvariantChecker:
    """Watches the state key ``key`` on ``endpoints`` and checks the invariants (module docstring).

    Use as a context manager, or ``start``/``stop``; ``assert_ok`` raises with every violation.
    """

    def __init__(
        self,
        endpoints: str | Iterable[str],
        key: str,
        min_nodes: int | None = None,
        max_nodes: int | None = None,
    ) -> None:
        self._client = etcd_client(endpoints)
        # A member cut off from its cluster then refuses the checker's reads and watch at once, as
        # it does the package's, and the checker moves to another member. Without it, a read waits
        # out its timeout there: on CI a sync after a partition did not catch up within 10 s.
        self._client.metadata = (REQUIRE_LEADER,)
        self.key = key
        self._raw_key = key.encode()
        self.min_nodes = min_nodes
        self.max_nodes = max_nodes
        self.groups: dict[int, Group] = {}
        self.violations: list[str] = []
        self.states: list[tuple[int, RendezvousState | None]] = []
        self._lock = threading.Lock()
        self._next_revision = 0
        self._last_round: int | None = None
        self._closed_at: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- observation ------------------------------------------------------------------------

    def _observe(self, value: bytes | None, revision: int) -> None:
        with self._lock:
            if value is None:
                self.states.append((revision, None))
                self.violations.append(f"rev {revision}: the state key was deleted during the test")
                return
            try:
                state = decode_state(value, f"'{self.key}' at revision {revision}")
            except Exception as exc:  # noqa: BLE001 - any decode failure is a violation
                self.violations.append(f"rev {revision}: {exc}")
                return
            self.states.append((revision, state))
            self._check(state, revision)

    def _check(self, state: RendezvousState, revision: int) -> None:
        fail = self.violations.append
        if self._last_round is not None and state.round < self._last_round:
            fail(f"rev {revision}: round went back from {self._last_round} to {state.round}")
        self._last_round = state.round
        if self._closed_at is not None and not state.closed:
            fail(f"rev {revision}: the rendezvous, closed at rev {self._closed_at}, is open again")
        if state.closed and self._closed_at is None:
            self._closed_at = revision
        group = self.groups.get(state.round)
        if not state.complete:
            if group is not None:
                fail(f"rev {revision}: round {state.round}, complete at rev {group.revision}, is incomplete again")
            return
        ranks = {node.key: rank for node, rank in state.participants.items()}
        if group is None:
            n = len(ranks)
            if sorted(ranks.values()) != list(range(n)):
                fail(f"rev {revision}: round {state.round} completed with ranks {sorted(ranks.values())}, not 0..{n - 1}")
            if state.world_size != n:
                fail(f"rev {revision}: round {state.round} completed with world size {state.world_size} for {n} nodes")
            if n == 0:
                fail(f"rev {revision}: round {state.round} completed with no participants")
            if self.min_nodes is not None and n < self.min_nodes:
                fail(f"rev {revision}: round {state.round} completed with {n} < min_nodes={self.min_nodes} nodes {sorted(ranks)}")
            if self.max_nodes is not None and n > self.max_nodes:
                fail(f"rev {revision}: round {state.round} completed with {n} > max_nodes={self.max_nodes} nodes")
            self.groups[state.round] = Group(state.round, ranks, state.world_size, revision)
            return
        if state.world_size != group.world_size:
            fail(f"rev {revision}: round {state.round} world size changed {group.world_size} -> {state.world_size}")
        for node, rank in ranks.items():
            if group.ranks.get(node) != rank:
                fail(
                    f"rev {revision}: round {state.round} has {node} at rank {rank}; its group "
                    f"(rev {group.revision}) was {group.ranks}"
                )

    # -- watching ---------------------------------------------------------------------------

    def _catch_up(self, timeout: float) -> None:
        """Process every event on the key from the next unseen revision; waits up to ``timeout``."""
        events = wait_for_events(self._client, self._raw_key, self._next_revision, timeout)
        for event in events:
            kv = event.kv
            if kv.mod_revision < self._next_revision:
                continue
            is_delete = type(event).__name__ == "DeleteEvent" or getattr(event, "type", 0) == 1
            self._observe(None if is_delete else kv.value, kv.mod_revision)
            self._next_revision = kv.mod_revision + 1

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._catch_up(0.5)
            except Exception:  # noqa: BLE001 - a member is down: resume from the same revision
                self._stop.wait(0.1)

    def start(self) -> InvariantChecker:
        response = self._client.get_response(self._raw_key)
        if response.kvs:
            self._observe(response.kvs[0].value, response.kvs[0].mod_revision)
        self._next_revision = response.header.revision + 1
        self._thread = threading.Thread(target=self._run, name="InvariantChecker", daemon=True)
        self._thread.start()
        return self

    def sync(self, timeout: float = 10.0) -> None:
        """Wait until every revision of the key up to now has been checked."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                response = self._client.get_response(self._raw_key)
                latest = response.kvs[0].mod_revision if response.kvs else 0
                with self._lock:
                    if self._next_revision > latest:
                        return
            except Exception:  # noqa: BLE001
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the invariant checker did not catch up with '{self.key}' in {timeout:g}s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._thread is None:
            return
        try:
            self.sync()
        finally:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
            self._client.close()

    def assert_ok(self) -> None:
        with self._lock:
            if self.violations:
                raise AssertionError("rendezvous invariants violated:\n" + "\n".join(self.violations))

    def group(self, round: int) -> Group:
        with self._lock:
            return self.groups[round]

    def __enter__(self) -> InvariantChecker:
        return self.start()

    def __exit__(self, exc_type, *rest: object) -> None:
        self.stop()
        if exc_type is None:
            self.assert_ok()
        else:
            # The test failed on its own: show what the state went through.
            print(self.describe(), file=sys.stderr)

    def describe(self, last: int = 15) -> str:
        """The violations and the last states seen, for failure messages."""
        lines = [f"violation: {v}" for v in self.violations]
        for revision, state in self.states[-last:]:
            if state is None:
                lines.append(f"rev {revision}: deleted")
                continue
            lines.append(
                f"rev {revision}: round {state.round} complete={state.complete} closed={state.closed} "
                f"participants={ {n.key: r for n, r in sorted(state.participants.items())} } "
                f"wait={sorted(n.key for n in state.wait_list)} redundant={len(state.redundancy_list)}"
            )
        return "\n".join(lines)


def wait_for_events(client: etcd3.MultiEndpointEtcd3Client, key: bytes, start_revision: int | None, timeout: float) -> list:
    """The events on ``key`` from ``start_revision`` on (``None``: from now), at the first reply that
    has any, or ``[]`` after ``timeout`` seconds or if that history is compacted (re-read then)."""
    with contextlib.suppress(WatchCompacted):
        if timeout > 0:
            with Watch(client, key, start_revision=start_revision or 0, timeout=timeout) as watch:
                for reply in watch:
                    if reply.events:
                        return list(reply.events)
    return []
