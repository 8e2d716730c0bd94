"""The fault-injecting proxy itself: against a tiny echo server, then against real etcd."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import etcd3
import pytest
import tenacity

from benchmarks.invariants import etcd_client
from integration_tests.nemesis import Proxy
from integration_tests.tools import wait_until

pytestmark = pytest.mark.timeout(60)


class EchoServer:
    """Sends back whatever each connection sends, on a loopback port."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._clients: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            sock.settimeout(None)
            self._clients.append(sock)
            thread = threading.Thread(target=self._echo, args=(sock,), daemon=True)
            self._threads.append(thread)
            thread.start()

    @staticmethod
    def _echo(sock: socket.socket) -> None:
        try:
            while data := sock.recv(4096):
                sock.sendall(data)
        except OSError:
            pass
        finally:
            sock.close()

    def close(self) -> None:
        self._stop.set()
        self._threads[0].join(5)
        self._listener.close()
        for sock in self._clients:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads[1:]:
            thread.join(5)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def echo_proxy(echo) -> Iterator[Proxy]:
    with Proxy("127.0.0.1", echo.port) as proxy:
        yield proxy


def connect(proxy: Proxy, timeout: float = 5.0) -> socket.socket:
    host, _, port = proxy.endpoint.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


# -- echo server -------------------------------------------------------------------------------


def test_forwards_both_ways_and_closes_cleanly(echo_proxy):
    with connect(echo_proxy) as sock:
        assert roundtrip(sock, b"hello") == b"hello"
        assert roundtrip(sock, b"x" * 200_000) == b"x" * 200_000
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(10) == b""  # the server's FIN came through
    assert echo_proxy.endpoint.startswith("127.0.0.1:")
    assert not echo_proxy.faults


def test_latency_delays_each_direction(echo_proxy):
    with connect(echo_proxy) as sock:
        roundtrip(sock, b"warm")
        echo_proxy.latency(0.2)
        started = time.monotonic()
        assert roundtrip(sock, b"ping") == b"ping"
        assert time.monotonic() - started >= 0.4
        echo_proxy.heal()
        started = time.monotonic()
        roundtrip(sock, b"ping")
        assert time.monotonic() - started < 0.2
    assert echo_proxy.faults["latency"] == 1


def test_stall_holds_bytes_until_resume(echo_proxy):
    with connect(echo_proxy, timeout=0.5) as sock:
        echo_proxy.stall()
        sock.sendall(b"held")
        with pytest.raises(TimeoutError):
            sock.recv(10)
        echo_proxy.resume()
        sock.settimeout(5)
        assert sock.recv(10) == b"held"


def test_blackhole_answers_nothing_and_heal_resets_the_damaged_connection(echo_proxy):
    with connect(echo_proxy, timeout=0.5) as sock:
        echo_proxy.blackhole()
        sock.sendall(b"lost")
        with pytest.raises(TimeoutError):
            sock.recv(10)
        # New connections are accepted, and answer nothing either.
        with connect(echo_proxy, timeout=0.5) as late:
            late.sendall(b"lost too")
            with pytest.raises(TimeoutError):
                late.recv(10)
            echo_proxy.heal()
            late.settimeout(5)
            with pytest.raises(ConnectionResetError):
                late.recv(10)
        sock.settimeout(5)
        with pytest.raises(ConnectionResetError):
            sock.recv(10)
    with connect(echo_proxy) as fresh:
        assert roundtrip(fresh, b"again") == b"again"


def test_reset_breaks_open_connections_with_rst(echo_proxy):
    with connect(echo_proxy) as first, connect(echo_proxy) as second:
        roundtrip(first, b"a")
        roundtrip(second, b"b")
        assert echo_proxy.reset() == 2
        for sock in (first, second):
            with pytest.raises(ConnectionResetError):
                sock.recv(10)
    assert echo_proxy.faults["reset"] == 2
    with connect(echo_proxy) as fresh:
        assert roundtrip(fresh, b"c") == b"c"


def test_drop_responses_after_lets_n_through_then_drops_and_resets(echo_proxy):
    with connect(echo_proxy) as sock:
        echo_proxy.drop_responses_after(1)
        assert roundtrip(sock, b"one") == b"one"
        sock.sendall(b"two")
        with pytest.raises(ConnectionResetError):
            sock.recv(10)
    assert echo_proxy.faults["drop_response"] == 1
    with connect(echo_proxy) as fresh:
        assert roundtrip(fresh, b"three") == b"three"


def test_faults_of_one_connection_spare_the_others(echo_proxy):
    with connect(echo_proxy, timeout=0.5) as slow, connect(echo_proxy) as fine:
        roundtrip(slow, b"s")
        roundtrip(fine, b"f")
        (target,) = [c for c in echo_proxy.connections() if c.peer == slow.getsockname()]
        target.stall()
        slow.sendall(b"held")
        assert roundtrip(fine, b"free") == b"free"
        with pytest.raises(TimeoutError):
            slow.recv(10)
        target.resume()
        slow.settimeout(5)
        assert slow.recv(10) == b"held"


def test_close_ends_every_connection(echo):
    proxy = Proxy("127.0.0.1", echo.port)
    sock = connect(proxy)
    try:
        roundtrip(sock, b"x")
        proxy.close()
        with pytest.raises(ConnectionResetError):
            sock.recv(10)
        with pytest.raises(ConnectionRefusedError):
            connect(proxy).close()
        wait_until(
            lambda: not [t for t in threading.enumerate() if t.name.startswith("nemesis-")],
            5, what="the proxy's threads to end",
        )
    finally:
        sock.close()
        proxy.close()


# -- real etcd -----------------------------------------------------------------------------------


@pytest.fixture
def etcd_proxy(etcd_endpoints) -> Iterator[Proxy]:
    with Proxy.to(etcd_endpoints[0]) as proxy:
        yield proxy


@pytest.fixture
def through(etcd_proxy) -> Iterator[etcd3.MultiEndpointEtcd3Client]:
    client = etcd_client(etcd_proxy.endpoint, timeout=5)
    yield client
    client.close()


def eventually(call, timeout: float = 15.0):
    """``call()`` once the client takes its endpoint back (it benches a failed one for 0.3 s).

    One attempt may itself run to the client's 5 s deadline on a busy machine (gRPC reconnects
    after the reset with a backoff), so the budget holds a few attempts."""
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type((etcd3.exceptions.Etcd3Exception, ValueError)),
        wait=tenacity.wait_fixed(0.1),
        stop=tenacity.stop_after_delay(timeout),
        reraise=True,
    )(call)


def key(etcd_run, name: str) -> str:
    return f"{etcd_run.key_prefix}/{name}-{uuid.uuid4().hex[:6]}"


def test_etcd_client_works_through_the_proxy(through, etcd_run, etcd_admin):
    k = key(etcd_run, "plain")
    through.put(k, "v")
    assert through.get(k)[0] == b"v"
    assert etcd_admin.get(k)[0] == b"v"


def test_etcd_put_takes_at_least_the_latency(through, etcd_proxy, etcd_run):
    k = key(etcd_run, "slow")
    through.put(k, "warm")
    etcd_proxy.latency(0.25)
    started = time.monotonic()
    through.put(k, "v")
    assert time.monotonic() - started >= 0.5  # request and response each delayed


def test_etcd_request_times_out_while_stalled_and_works_after_resume(etcd_proxy, etcd_run):
    client = etcd_client(etcd_proxy.endpoint, timeout=1)
    try:
        k = key(etcd_run, "stall")
        client.put(k, "before")
        etcd_proxy.stall()
        started = time.monotonic()
        with pytest.raises(etcd3.exceptions.ConnectionTimeoutError):
            client.get(k)
        assert 0.9 <= time.monotonic() - started < 3
        etcd_proxy.resume()
        assert eventually(lambda: client.get(k))[0] == b"before"
    finally:
        client.close()


def test_etcd_reset_breaks_an_open_connection(through, etcd_proxy, etcd_run):
    k = key(etcd_run, "reset")
    through.put(k, "v")
    # A request held in flight: the reset must fail it at once, not at its 5 s deadline.
    etcd_proxy.stall()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(through.get, k)
        wait_until(lambda: etcd_proxy.connections() and not pending.done(), 2, what="the request in flight")
        time.sleep(0.2)  # for the request to reach the proxy, which holds it
        started = time.monotonic()
        assert etcd_proxy.reset() >= 1
        with pytest.raises(etcd3.exceptions.ConnectionFailedError):
            pending.result(timeout=5)
        assert time.monotonic() - started < 2
    etcd_proxy.resume()
    assert eventually(lambda: through.get(k))[0] == b"v"  # the client reconnects


def test_etcd_dropped_response_hides_a_committed_put(through, etcd_proxy, etcd_run, etcd_admin):
    k = key(etcd_run, "drop")
    through.get(k)  # connected, so the next request is the put
    etcd_proxy.drop_next_response()
    with pytest.raises(etcd3.exceptions.ConnectionFailedError):
        through.put(k, "committed")
    assert etcd_admin.get(k)[0] == b"committed"
    assert etcd_proxy.faults["drop_response"] == 1
    assert eventually(lambda: through.get(k))[0] == b"committed"
