"""``DynamicRendezvousHandler``: torch's ``RendezvousHandler`` over any ``RendezvousBackend``."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch.distributed as dist
from torch.distributed.elastic.events import NodeState
from torch.distributed.elastic.rendezvous import (
    RendezvousConnectionError,
    RendezvousError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousTimeoutError,
)

from .backend import RendezvousBackend
from .bootstrap import TrainerStoreAddressError, TrainerStoreHost, shared_store_enabled
from .deepspeed_views import TorchSettings, TorchStateHolderView, torch_settings
from .events import HANDLER, RendezvousTimings, record_event, report_failure, report_timings
from .executor import OpExecutor
from .health import Admission
from .holder import StateHolder
from .logs import show_package_logs
from .node import NodeDesc, NodeDescGenerator
from .ops import close_op, exit_op, join_op, nodes_waiting, rejoin_op
from .outage import Outage
from .ranks import TOPOLOGY_ENV, check_topology
from .settings import RendezvousSettings, settings_from_params
from .state import RendezvousState

logger = logging.getLogger(__name__)

T = TypeVar("T")

_node_desc_generator = NodeDescGenerator()

# How stale a state read by the agent's monitoring calls (num_nodes_waiting, is_closed) may be.
# torchrun polls these every monitor interval; a short cache keeps that off the server.
MONITOR_CACHE_SECONDS = 1.0
# How long an exiting process (or the thread that collects an abandoned handler) waits, at most,
# for the node's liveness to end: one request on a healthy etcd; an unreachable one must not hold
# up exit or garbage collection, and the node's lease lapses anyway.
EXIT_LEAVE_SECONDS = 0.5


class DynamicRendezvousHandler(RendezvousHandler):
    """A dynamic rendezvous with torch's semantics and a scalable, pickle-free state.

    Use ``create_handler`` (or ``from_backend``) to build one.
    """

    def __init__(
        self,
        node: NodeDesc,
        settings: RendezvousSettings,
        backend_name: str,
        store: dist.Store,
        backend: RendezvousBackend,
        topology: str | None = None,
    ) -> None:
        self._node = node
        self._config = settings
        self._backend_name = backend_name
        self._store = store
        self._backend = backend
        self._admission = Admission(node, settings, backend.quarantine)
        # Lapses quarantine hosts only where admission is health-gated: without a check, a host
        # that restarts its agents often (or every node of a single-host test) must not lock itself out.
        on_dropped = self._admission.note_lapses if settings.health_check else None
        holder = StateHolder(backend, settings, node, topology=topology, on_dropped=on_dropped)
        self._executor = OpExecutor(node, holder, backend, settings, beats=False)
        self._lock = threading.Lock()
        # The heartbeat thread and the event that stops it: running from the first call of
        # ``next_rendezvous`` until one fails or ``shutdown``, through every later call, so that a
        # node's liveness never rests on the thread that is busy rejoining (see ``_heartbeat_loop``).
        self._heartbeat: tuple[threading.Thread, threading.Event] | None = None
        self._beats_failing = False
        # Whether the backend is unreachable now, as this node's calls found it.
        self._outage = Outage(settings, node, backend.survives_outages)
        self._trainer_store = TrainerStoreHost(node.addr)
        self.last_timings: RendezvousTimings | None = None
        self._torch_settings = torch_settings(settings)
        # A handler dropped without shutdown(), or a process that exits without it (torchrun skips
        # it on SIGTERM so that the run stays open), leaves at once instead of after its liveness
        # TTL, and releases its backend, whose threads and connections stop with its last user.
        self._abandoned = weakref.finalize(self, _abandon, backend, node.key, os.getpid())

    @classmethod
    def from_backend(
        cls,
        run_id: str,
        store: dist.Store,
        backend: RendezvousBackend,
        min_nodes: int,
        max_nodes: int,
        local_addr: str | None = None,
        **timeouts: float,
    ) -> DynamicRendezvousHandler:
        """Build a handler for a new node of this process; ``timeouts`` are settings fields."""
        settings = RendezvousSettings(run_id, min_nodes, max_nodes, **timeouts)
        node = _node_desc_generator.generate(local_addr)
        return cls(node, settings, backend.name, store, backend)

    @property
    def settings(self) -> RendezvousSettings:
        return self._config

    @property
    def node(self) -> NodeDesc:
        return self._node

    def get_backend(self) -> str:
        return self._backend_name

    @property
    def use_agent_store(self) -> bool:
        return shared_store_enabled()

    def _record(
        self, method: str, message: str, node_state: NodeState = NodeState.RUNNING, rank: int | None = None
    ) -> None:
        record_event(self._config, self._node, f"{HANDLER}.{method}", message, node_state, rank)

    # DeepSpeed's elastic agent (``deepspeed/elasticity/elastic_agent.py``) reads torch's private
    # ``_state_holder.state.participants``/``.last_heartbeats`` and ``_settings.keep_alive_*``;
    # these two read-only views keep it working (see ``deepspeed_views.py``).

    @property
    def _state_holder(self) -> TorchStateHolderView:
        return TorchStateHolderView(self._executor, self._lock)

    @property
    def _settings(self) -> TorchSettings:
        return self._torch_settings

    def next_rendezvous(self) -> RendezvousInfo:
        """Leave the previous round and join the next; see torch's ``RendezvousHandler``."""
        msg = (
            f"The node '{self._node}' attempts to join the next round of the rendezvous "
            f"'{self._config.run_id}'."
        )
        self._record("next_rendezvous", msg)
        logger.info(msg)
        started = time.monotonic()
        writes, lost = self._executor.writes, self._executor.lost_writes
        try:
            with self._lock:
                self._executor.refresh_liveness()
                if self._heartbeat is None:
                    # Read before the first heartbeat: a corrupt state fails with nothing written.
                    # (The executor reads the state first thing anyway.)
                    self._executor.read()
                    self._executor.beat(announcing=True)  # its join's post records it alive
                    self._start_heartbeats()
            deadline = started + self._config.join_timeout
            while True:
                with self._lock:
                    since = time.monotonic()  # before any write that places this node
                    self._leave_and_join(deadline)
                    placed_at = self._executor.placed_at or time.monotonic()
                    token = self._executor.token
                state = self._executor.state
                rank, world_size = state.participants[self._node], state.world_size
                round_store = dist.PrefixStore(f"torch.rendezvous.{self._config.run_id}.{state.round}", self._store)
                round_ = state.round
                leader = next((node for node, r in state.participants.items() if r == 0), None)
                store_info = None
                if leader is not None:
                    store_info = self._trainer_store.publish(rank, round_store, lambda: self._group_stands(round_, leader))
                if store_info is None:
                    # Rank 0 left the group (its call failed, it restarted, or it died), maybe before
                    # it published the trainers' store: no trainer of this group can start with it,
                    # so this node joins the next round.
                    logger.warning(
                        "Rank 0 of round %d of the rendezvous '%s' left its group; the node '%s' joins the next round.",
                        round_, self._config.run_id, self._node,
                    )
                    continue
                # Checked last, once nothing is left to wait for: a node whose liveness lapsed since
                # the state it read (a wait for rank 0's store can be long) may have been dropped
                # from the group by the others. It leaves the round (its members then restart with
                # it) and joins the next one, alive again.
                with self._lock:
                    held = self._executor.held_since(token, since)
                if held:
                    break
                logger.warning(
                    "The liveness of the node '%s' lapsed while it joined round %d of the rendezvous "
                    "'%s'; it leaves that round and joins the next.",
                    self._node, round_, self._config.run_id,
                )
                self._executor.beat()
        except Exception as e:
            # The node is out of the rendezvous: its liveness lapses (or ends, below), as it did
            # before the call.
            self._stop_heartbeats()
            if isinstance(e, RendezvousConnectionError):
                self._outage.unreachable("next_rendezvous", e)
            self._record("next_rendezvous", f"{type(e).__name__}: {e}", NodeState.FAILED)
            report_failure()
            if isinstance(e, (RendezvousTimeoutError, TrainerStoreAddressError)):
                # A join another node folded in after this one gave up must not stand: with its
                # liveness gone, the next write drops it. A rank 0 that cannot serve the trainers'
                # store leaves the same way, so that the other ranks stop waiting for it at once.
                _end_liveness(self._backend, self._node.key)
            raise

        self._outage.reached()
        finished = time.monotonic()
        self.last_timings = RendezvousTimings(
            round=state.round,
            join_wait=placed_at - started,
            last_call_wait=finished - placed_at,
            total=finished - started,
            writes=self._executor.writes - writes,
            lost_writes=self._executor.lost_writes - lost,
        )
        joined = (
            f"The node '{self._node}' has joined round {state.round} of the rendezvous "
            f"'{self._config.run_id}' as rank {rank} in a world of size {world_size}"
        )
        # The event carries torch's message word for word; the timings go to the metrics and the log.
        self._record("next_rendezvous", joined + ".", rank=rank)
        report_timings(self.last_timings)
        logger.info(
            "%s (total %.3fs, join wait %.3fs, last call %.3fs, %d writes, %d lost).",
            joined,
            self.last_timings.total,
            self.last_timings.join_wait,
            self.last_timings.last_call_wait,
            self.last_timings.writes,
            self.last_timings.lost_writes,
        )
        return RendezvousInfo(round_store, rank, world_size, store_info)

    def _leave_and_join(self, deadline: float) -> None:
        """Leave the round this node is in, if any, and join the next, by ``deadline``."""
        if self._admission.admits_at_once():
            # Leaving the previous round and joining the next take one announcement.
            self._executor.run(rejoin_op(self._executor.state.round), deadline)
            synced = True
        else:
            # The node leaves its group before it waits out a quarantine or runs its
            # health check: the other members need not wait for it to form the next one.
            self._executor.run(exit_op, deadline)
            self._admission.admit(self._executor.state.round, deadline)
            synced = False
        self._executor.run(join_op, deadline, lambda timeout: time.monotonic() + timeout, synced)

    def _group_stands(self, round_: int, leader: NodeDesc) -> bool:
        """Whether ``leader`` is still a live member of the group of ``round_`` (a read drops the
        nodes whose liveness lapsed)."""
        with self._lock:
            return self._executor.group_stands(round_, leader)

    def _guarded(self, method: str, fn):
        try:
            with self._lock:
                return fn()
        except Exception as e:
            self._record(method, f"{type(e).__name__}: {e}", NodeState.FAILED)
            raise

    def is_closed(self) -> bool:
        return self._monitored("is_closed", lambda state: state.closed)

    def set_closed(self) -> None:
        self._guarded("set_closed", self._close)

    def num_nodes_waiting(self) -> int:
        return self._monitored("num_nodes_waiting", self._waiting)

    def _waiting(self, state: RendezvousState) -> int:
        if state.closed and state.stop_now:
            # torchrun's agent asks only this while its workers are healthy: a waiting node makes
            # it stop them and rendezvous again, which a closed run refuses.
            logger.warning(
                "The rendezvous '%s' was closed with `close --now`: the node '%s' stops its workers "
                "and exits.", self._config.run_id, self._node,
            )
            return 1
        return nodes_waiting(state, self._config)

    def _monitored(self, method: str, answer: Callable[[RendezvousState], T]) -> T:
        """torchrun's monitoring calls: ``answer`` from the state read at most
        ``MONITOR_CACHE_SECONDS`` ago (within ``heartbeat_timeout``), or, while the backend cannot
        be reached, from the last state known (``outage.py``)."""

        def read() -> T:
            # During an outage the heartbeats find out when the backend is back; the monitoring
            # calls only ask it themselves when no heartbeat runs.
            if not (self._outage.active and self._heartbeat is not None):
                try:
                    # A poll, like a heartbeat: it waits for the backend no longer than one.
                    self._executor.read(max_age=MONITOR_CACHE_SECONDS, timeout=self._config.heartbeat_timeout)
                except RendezvousConnectionError as e:
                    if not self._outage.unreachable(method, e, self._executor.state):
                        raise
                else:
                    self._outage.reached()
            return answer(self._executor.state)

        return self._guarded(method, read)

    def get_run_id(self) -> str:
        return self._config.run_id

    def shutdown(self) -> bool:
        """Close the run, end this node's liveness and release the backend; see torch's contract.

        While the backend is unreachable (torchrun shuts down right after a ``next_rendezvous``
        that could not reach it), the run is left open: closing it would wait out the backend's
        timeout once more, for nothing."""
        self._stop_heartbeats()
        unreachable = self._outage.active
        try:
            if unreachable:
                logger.warning(
                    "The node '%s' leaves the rendezvous '%s' open: its backend did not answer just "
                    "now, and closing the run would wait for it once more.", self._node, self._config.run_id,
                )
                return False
            with self._lock:
                self._close()
            return True
        except RendezvousError as ex:
            self._report_failure("shutdown", "shutdown", ex)
            return False
        finally:
            self._trainer_store.stop()
            self._abandoned.detach()
            if unreachable:
                _end_liveness(self._backend, self._node.key)
            else:
                try:
                    self._backend.liveness.forget(self._node.key)
                except RendezvousError as ex:
                    logger.warning("The node '%s' could not end its liveness: %s", self._node, ex)
            self._backend.close()

    def _close(self) -> None:
        self._executor.run(close_op, time.monotonic() + self._config.close_timeout)
        msg = f"The node '{self._node}' has closed the rendezvous '{self._config.run_id}'."
        self._record("_close", msg, NodeState.SUCCEEDED)
        logger.info(msg)

    def _keep_alive(self) -> bool:
        """Send a heartbeat; return whether it went through.

        A beat touches only this node's liveness: it neither reads nor writes the shared state, so
        it takes no handler lock and goes on while ``next_rendezvous`` holds it. Failures are
        logged when the heartbeat's health changes, not at every interval, so an outage does not
        flood the log (torch's event stream still gets every failure)."""
        try:
            self._executor.beat(self._config.heartbeat_timeout)
        except RendezvousError as ex:
            # An outage is reported once, by ``Outage``, in place of this warning.
            outage = isinstance(ex, RendezvousConnectionError) and self._outage.unreachable(
                "_keep_alive", ex, self._executor.state
            )
            self._report_failure(
                "_keep_alive", "send a keep-alive heartbeat to", ex, log=not (self._beats_failing or outage)
            )
            self._beats_failing = True
            return False
        self._outage.reached()
        if self._beats_failing:
            logger.info("The node '%s' sends keep-alive heartbeats again.", self._node)
        self._beats_failing = False
        msg = (
            f"The node '{self._node}' has sent a keep-alive heartbeat to the rendezvous "
            f"'{self._config.run_id}'."
        )
        self._record("_keep_alive", msg)
        logger.debug(msg)
        return True

    def _report_failure(self, method: str, what: str, ex: RendezvousError, log: bool = True) -> None:
        msg = (
            f"The node '{self._node}' has failed to {what} the rendezvous "
            f"'{self._config.run_id}' due to an error of type {type(ex).__name__}"
        )
        # torch's message ends at the type; the event's trace and the log line carry the error.
        self._record(method, msg + ".", NodeState.FAILED)
        if log:
            logger.warning("%s: %s", msg, ex)

    def _beat_when_due(self) -> float:
        """Send a heartbeat if one is due: an interval after the last one was sent (by the
        heartbeat thread or by the executor), not after the last one returned. Returns the seconds
        until the next is due; after a failed beat, an interval."""
        delay = self._executor.next_beat_in()
        if delay <= 0:
            delay = self._executor.next_beat_in() if self._keep_alive() else self._config.keep_alive_interval
        return delay

    def _start_heartbeats(self) -> None:
        stop = threading.Event()
        thread = threading.Thread(
            target=_heartbeat_loop,
            args=(weakref.WeakMethod(self._beat_when_due), stop, self._config.keep_alive_interval),
            name=f"RendezvousKeepAliveTimer_{self._node.local_id}",
            daemon=True,
        )
        self._heartbeat = (thread, stop)
        thread.start()

    def _stop_heartbeats(self) -> None:
        """Stop the heartbeat thread and wait for a beat in flight, so that none lands after the
        caller ends the node's liveness."""
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            thread, stop = heartbeat
            stop.set()
            if thread is not threading.current_thread():
                thread.join(self._config.heartbeat_timeout)


def _end_liveness(backend: RendezvousBackend, node_key: str) -> None:
    """End the node's liveness, best effort and bounded: an unreachable server must not hold up
    the caller (or interpreter exit)."""
    _bounded(lambda: backend.liveness.forget(node_key), f"end the liveness of '{node_key}'")


def _abandon(backend: RendezvousBackend, node_key: str, pid: int) -> None:
    # A forked child inherits its parent's handlers (and their finalizers), not their nodes.
    if pid != os.getpid():
        return

    def leave() -> None:
        try:
            backend.liveness.forget(node_key)
        finally:
            backend.close()

    _bounded(leave, f"release the abandoned node '{node_key}'")


def _bounded(action: Callable[[], None], what: str) -> None:
    def run() -> None:
        try:
            action()
        except Exception as ex:
            logger.debug("Could not %s: %s", what, ex)

    thread = threading.Thread(target=run, name="RendezvousLeave", daemon=True)
    thread.start()
    thread.join(EXIT_LEAVE_SECONDS)


def _heartbeat_loop(beat_when_due: weakref.WeakMethod, stop: threading.Event, interval: float) -> None:
    # Calls the handler's ``_beat_when_due`` whenever the delay it returned has passed, until
    # ``stop``. Holds the handler only weakly, so that an abandoned handler can still be collected.
    delay = interval
    while not stop.wait(max(0.0, delay)):
        beat = beat_when_due()
        if beat is None:
            return
        delay = beat()
        del beat


def _topology_label(environ: Mapping[str, str]) -> str | None:
    raw = environ.get(TOPOLOGY_ENV, "").strip()
    if not raw:
        return None
    try:
        return check_topology(raw)
    except ValueError as exc:
        raise ValueError(
            f"The environment variable {TOPOLOGY_ENV} is {raw!r}: {exc}. Set it to where the node sits, "
            "e.g. 'zone-a/rack-07/switch-3', or unset it."
        ) from None


def create_handler_with(
    make_backend: Callable[[RendezvousParameters], tuple[RendezvousBackend, dist.Store]],
    params: RendezvousParameters,
) -> DynamicRendezvousHandler:
    """Build a backend with ``make_backend(params)`` and a handler over it (torchrun plugins).

    The backend is closed again if the handler cannot be built (bad configuration). The package's
    log lines go to stderr, as torchrun shows no one else's (``logs.py``).
    """
    show_package_logs()
    settings_from_params(params)  # a bad configuration fails before the backend makes any request
    backend, store = make_backend(params)
    try:
        return create_handler(store, backend, params)
    except BaseException:
        backend.close()
        raise


def create_handler(
    store: dist.Store, backend: RendezvousBackend, params: RendezvousParameters
) -> DynamicRendezvousHandler:
    """Create a handler for ``params`` over ``backend``, handing ``store`` to the agents.

    Reads the core's keys (``settings.CORE_OPTIONS``) and the node's topology label from the
    environment variable ``TORCH_RDZV_TOPOLOGY``.

    Raises:
        ValueError: a configuration value is invalid; the message names the key and the value.
    """
    try:
        settings = settings_from_params(params)
        topology = _topology_label(os.environ)
        node = _node_desc_generator.generate(params.local_addr)
        return DynamicRendezvousHandler(node, settings, params.backend, store, backend, topology)
    except Exception as e:
        from torch.distributed.elastic.events import construct_and_record_rdzv_event

        construct_and_record_rdzv_event(
            message=f"{type(e).__name__}: {e}", run_id=params.run_id, node_state=NodeState.FAILED
        )
        raise
