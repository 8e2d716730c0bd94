"""The agent that hosts the c10d store exits or dies first (torch's c10d has the same limit).

The store lives in the hosting agent's process, so the other nodes cannot go on; what they must
get is a ``RendezvousConnectionError`` within seconds that names the store and says why and what
to use instead, never a hang until a store timeout or an unrelated error.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from datetime import timedelta

import pytest
from torch.distributed import TCPStore
from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousParameters

from c10d_rdzv.calls import StoreCalls
from c10d_rdzv.factory import create_backend
from rdzv_common import create_handler

# Seconds within which a call must fail once the host is gone; TCPStore's own timeouts are 60 s
# (read_timeout) and more.
FAIL_WITHIN = 10.0

# Hosts the store and, with ``argv[3] == "join"``, joins the rendezvous; exits without shutdown
# (as torchrun does on SIGTERM) once its stdin closes.
HOST = textwrap.dedent(
    """
    import json, sys
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from rdzv_common import create_handler
    from c10d_rdzv.factory import create_backend

    endpoint, run_id, mode = sys.argv[1:4]
    params = RendezvousParameters(
        "c10d_rdzv", endpoint, run_id, 2, 2, local_addr="127.0.0.1", is_host="1",
        keep_alive_interval=1, last_call_timeout=1,
    )
    backend, store = create_backend(params)
    handler = create_handler(store, backend, params)
    print("hosting", flush=True)
    if mode == "join":
        info = handler.next_rendezvous()
        print(json.dumps({"rank": info.rank, "world_size": info.world_size}), flush=True)
    sys.stdin.read()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Host:
    """The hosting agent, in a process of its own."""

    def __init__(self, endpoint: str, run_id: str, mode: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOST, endpoint, run_id, mode],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        line = self.proc.stdout.readline().strip()
        assert line == "hosting", self.proc.stderr.read()[-3000:] if self.proc.poll() is not None else line

    def lose(self, how: str) -> None:
        """End the host: ``exit`` (normal exit, no shutdown) or ``kill`` (SIGKILL)."""
        if how == "kill":
            self.proc.send_signal(signal.SIGKILL)
        else:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()


@pytest.fixture
def job():
    port = free_port()
    endpoint, run_id = f"127.0.0.1:{port}", f"hostloss-{uuid.uuid4().hex[:8]}"
    hosts: list[Host] = []
    handlers = []

    def start_host(mode: str) -> Host:
        hosts.append(Host(endpoint, run_id, mode))
        return hosts[-1]

    def other():
        params = RendezvousParameters(
            "c10d_rdzv", endpoint, run_id, 2, 2, local_addr="127.0.0.1", is_host="0",
            keep_alive_interval=1, last_call_timeout=1, join_timeout=120,
        )
        backend, store = create_backend(params)
        handlers.append(create_handler(store, backend, params))
        return handlers[-1]

    yield endpoint, start_host, other
    for handler in handlers:
        handler._stop_heartbeats()
    for host in hosts:
        host.close()


def assert_clear(exc: BaseException, endpoint: str) -> None:
    message = str(exc)
    assert isinstance(exc, RendezvousConnectionError), repr(exc)
    assert endpoint in message, message
    assert "hosting agent" in message and "etcd" in message, message
    assert "Exception raised from" not in message, message  # no C++ backtrace


def timed_failure(call) -> tuple[BaseException | None, float]:
    started = time.monotonic()
    try:
        call()
    except BaseException as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_host_lost_while_the_other_node_waits_in_next_rendezvous(job, how):
    endpoint, start_host, other = job
    host = start_host("idle")  # hosts the store, never joins: the other node waits for a peer
    handler = other()
    outcome: dict = {}

    def rendezvous() -> None:
        outcome["exc"], _ = timed_failure(handler.next_rendezvous)
        outcome["at"] = time.monotonic()

    waiter = threading.Thread(target=rendezvous, daemon=True)
    waiter.start()
    time.sleep(2)
    assert waiter.is_alive(), outcome
    host.lose(how)
    lost_at = time.monotonic()
    waiter.join(FAIL_WITHIN + 5)
    assert not waiter.is_alive(), f"next_rendezvous still waits {FAIL_WITHIN + 5}s after the host went away"
    assert outcome["exc"] is not None
    assert_clear(outcome["exc"], endpoint)
    assert outcome["at"] - lost_at < FAIL_WITHIN


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_every_call_fails_clearly_after_the_host_is_lost(job, how, caplog):
    endpoint, start_host, other = job
    host = start_host("join")
    handler = other()
    info = handler.next_rendezvous()
    assert info.world_size == 2
    assert host.proc.stdout.readline().strip(), "the host did not complete its rendezvous"
    host.lose(how)
    time.sleep(1.2)  # past the monitoring calls' cache (MONITOR_CACHE_SECONDS)
    for call in (handler.num_nodes_waiting, handler.is_closed, handler.next_rendezvous):
        exc, took = timed_failure(call)
        assert exc is not None, f"{call.__name__} returned although the store is gone"
        assert_clear(exc, endpoint)
        assert took < FAIL_WITHIN, f"{call.__name__} took {took:.1f}s"
    # shutdown() reports failure by returning False (torch's contract), with the reason logged.
    caplog.set_level(logging.WARNING, logger="rdzv_common")
    caplog.clear()
    started = time.monotonic()
    assert handler.shutdown() is False
    assert time.monotonic() - started < FAIL_WITHIN
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("rdzv_common")]
    assert any("hosting agent" in w and endpoint in w for w in warnings), warnings


def test_new_connection_to_a_lost_store_fails_within_seconds(job):
    # Waits open connections of their own (keywait.py); TCPStore's connect retries for twice
    # its timeout, here 2 x 20 s, before it gives up on a server that is gone.
    endpoint, start_host, _ = job
    host = start_host("idle")
    address, port = endpoint.rsplit(":", 1)
    store = TCPStore(address, int(port), is_master=False, multi_tenant=True, timeout=timedelta(seconds=20))
    calls = StoreCalls(store)
    calls.clone()  # the server is up: a new connection is accepted
    host.lose("kill")
    exc, took = timed_failure(calls.clone)
    assert exc is not None
    assert_clear(exc, endpoint)
    assert took < FAIL_WITHIN, f"clone took {took:.1f}s"
