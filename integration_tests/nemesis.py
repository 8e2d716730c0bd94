"""A fault-injecting TCP proxy for loopback tests: put one in front of each etcd member and
switch faults on and off while clients talk through it.

``Proxy(host, port)`` listens on 127.0.0.1 on a free port (``.endpoint``) and forwards bytes both
ways, each direction of each connection with a reader and a writer thread. Faults apply to every
connection, current and future (the proxy's methods), or to one (``Proxy.connections()``):

* ``latency(s)``: every chunk is delivered ``s`` seconds after it was read, in both directions
  (so a request/response exchange takes at least ``2 s``).
* ``stall()`` / ``resume()``: bytes are held, connections stay open; ``resume`` delivers them.
* ``blackhole()``: connections are accepted and read, everything is dropped, nothing answers.
  A connection that lost bytes is reset when the blackhole is lifted (its byte stream has a hole,
  so it can never be used again; a real client would have timed it out by then).
* ``reset()``: every open connection is closed with an RST (``SO_LINGER`` 0), both sides.
* ``drop_next_response()`` / ``drop_responses_after(n)``: the next request (after ``n`` more) is
  forwarded to the server, its response is dropped, and then the connection is reset: the
  client sees a failure of a request that the server carried out. With ``then_blackhole=True``
  the proxy blackholes from then on, so the client's retries meet an outage. On HTTP/2 (gRPC) a request is
  a HEADERS frame opening a client stream and its response is every server byte until that
  stream ends; on other protocols a request is a client chunk and its response the next server
  chunk.
* ``isolate(marker)``: blackhole every connection, current and future, whose client sent
  ``marker`` within its first bytes (``Connection.opening``), e.g. the ``X-Server-From`` header
  by which an etcd member names itself on its peer connections, so that one client's traffic
  through a shared proxy can be cut while the others' flows.
* ``heal()``: every fault off; ``close()``: stop listening and close every connection.

``faults`` counts what was injected, by kind, for reports.
"""

from __future__ import annotations

import collections
import queue
import socket
import struct
import threading
import time
from collections.abc import Iterable

__all__ = ["Connection", "Proxy"]

_CHUNK = 65536
# How much of a connection's first client bytes ``isolate`` looks at (HTTP/1 request headers).
_OPENING = 4096
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM = 0x0, 0x1, 0x3
_END_STREAM = 0x1
_EOF = object()


class _FrameScanner:
    """Follows HTTP/2 frame boundaries in one direction of a byte stream and reports each frame
    header as ``(type, flags, stream_id)``; payloads are skipped, never buffered."""

    def __init__(self, skip: int = 0) -> None:
        self._skip = skip  # the client's connection preface precedes its first frame
        self._header = b""
        self._payload_left = 0

    def feed(self, data: bytes) -> list[tuple[int, int, int]]:
        frames = []
        view = memoryview(data)
        while view:
            if self._skip:
                taken = min(self._skip, len(view))
                self._skip -= taken
                view = view[taken:]
            elif self._payload_left:
                taken = min(self._payload_left, len(view))
                self._payload_left -= taken
                view = view[taken:]
            else:
                taken = min(9 - len(self._header), len(view))
                self._header += bytes(view[:taken])
                view = view[taken:]
                if len(self._header) == 9:
                    length = int.from_bytes(self._header[:3], "big")
                    kind, flags, stream = struct.unpack(">BBI", self._header[3:])
                    frames.append((kind, flags, stream & 0x7FFFFFFF))
                    self._payload_left = length
                    self._header = b""
        return frames


class _Faults:
    """One set of switches: the proxy's own (for every connection) or one connection's."""

    def __init__(self) -> None:
        self.latency = 0.0
        self.stalled = False
        self.blackholed = False
        self.drop_after: int | None = None  # requests to let through before dropping a response
        self.blackhole_after_drop = False  # the proxy's only: an outage follows the dropped response


class Connection:
    """One client connection through the proxy and its upstream connection to the target."""

    def __init__(self, proxy: Proxy, client: socket.socket, upstream: socket.socket | None) -> None:
        self._proxy = proxy
        self.client = client
        self.upstream = upstream
        self.own = _Faults()
        self.poisoned = False  # bytes were dropped: the stream is no longer intact
        self.closed = False
        self.peer = client.getpeername()
        self.opening = b""  # the client's first bytes, up to _OPENING
        self._http2: bool | None = None
        self._requests = _FrameScanner(skip=len(_PREFACE))
        self._responses = _FrameScanner()
        self._last_request_stream = 0
        self._dropping: int | None = None  # stream id whose response is being dropped; -1: raw
        self._open_directions = 2
        self._threads: list[threading.Thread] = []
        self._queues: list[queue.Queue] = []

    # -- faults of this connection only ------------------------------------------------------

    def latency(self, seconds: float) -> None:
        with self._proxy._cond:
            self.own.latency = seconds
            self._proxy._count("latency", seconds > 0)

    def stall(self) -> None:
        with self._proxy._cond:
            self.own.stalled = True
            self._proxy._count("stall")

    def resume(self) -> None:
        with self._proxy._cond:
            self.own.stalled = False
            self._proxy._cond.notify_all()

    def blackhole(self) -> None:
        with self._proxy._cond:
            self.own.blackholed = True
            self._proxy._count("blackhole")

    def drop_next_response(self) -> None:
        self.drop_responses_after(0)

    def drop_responses_after(self, n: int) -> None:
        with self._proxy._cond:
            self.own.drop_after = n

    def heal(self) -> None:
        with self._proxy._cond:
            self.own = _Faults()
            self._proxy._cond.notify_all()
        if self.poisoned:
            self._abort()

    def reset(self) -> None:
        """Close both sides with an RST."""
        self._abort(count=True)

    def _abort(self, count: bool = False) -> None:
        with self._proxy._cond:
            if self.closed:
                return
            self.closed = True
            self._proxy._count("reset", count)
            self._proxy._cond.notify_all()
        for pending in self._queues:
            pending.put(_EOF)  # wakes the writers
        for sock in self._sockets():
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                # Wakes this connection's reader blocked in recv (close alone would not on Linux)
                # without sending the FIN that SHUT_WR would.
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
            sock.close()
        self._proxy._forget(self)

    # -- plumbing ------------------------------------------------------------------------------

    def _sockets(self) -> list[socket.socket]:
        return [s for s in (self.client, self.upstream) if s is not None]

    def _effective(self) -> tuple[float, bool, bool]:
        common = self._proxy._all
        return (
            max(common.latency, self.own.latency),
            common.stalled or self.own.stalled,
            common.blackholed or self.own.blackholed,
        )

    def _start(self) -> None:
        directions = [(self.client, self.upstream, True)]
        if self.upstream is not None:
            directions.append((self.upstream, self.client, False))
        else:
            self._open_directions = 1
        for source, dest, outbound in directions:
            pending: queue.Queue = queue.Queue()
            self._queues.append(pending)
            for target, args in ((self._read, (source, pending, outbound)), (self._write, (dest, pending))):
                thread = threading.Thread(target=target, args=args, daemon=True, name=f"nemesis-{target.__name__}")
                self._threads.append(thread)
                thread.start()

    def _read(self, source: socket.socket, pending: queue.Queue, outbound: bool) -> None:
        while True:
            try:
                data = source.recv(_CHUNK)
            except OSError:
                data = None
            if self.closed:
                return
            if data is None:
                # The peer reset its side: pass the reset on.
                self._abort()
                return
            if not data:
                pending.put(_EOF)
                return
            with self._proxy._cond:
                if outbound and len(self.opening) < _OPENING:
                    self.opening += data[: _OPENING - len(self.opening)]
                    self._proxy._isolate_if_marked(self)
                latency, _, blackholed = self._effective()
                drop = blackholed or self.upstream is None or self._inspect(data, outbound)
                if drop:
                    self.poisoned = True
                end_of_dropped_response = not outbound and self._dropping is None and drop and not blackholed
            if end_of_dropped_response:
                with self._proxy._cond:
                    if self._proxy._all.blackhole_after_drop:
                        self._proxy._all.blackhole_after_drop = False
                        self._proxy._all.blackholed = True
                        self._proxy._count("blackhole")
                self._abort()
                return
            if not drop:
                pending.put((time.monotonic() + latency, data))

    def _inspect(self, data: bytes, outbound: bool) -> bool:
        """Track requests and responses; whether ``data`` belongs to a response being dropped.
        Called with the proxy's lock held."""
        if self._http2 is None and outbound:
            self._http2 = data[: len(_PREFACE)] == _PREFACE[: len(data)]
        if outbound:
            if self._http2:
                opened = []
                for kind, _, stream in self._requests.feed(data):
                    if kind == _HEADERS and stream % 2 == 1 and stream > self._last_request_stream:
                        self._last_request_stream = stream
                        opened.append(stream)
            else:
                opened = [-1]
            for stream in opened:
                if self._take_drop():
                    self._dropping = stream
            return False
        frames = self._responses.feed(data) if self._http2 else []
        if self._dropping is None:
            return False
        if self._dropping == -1:
            self._dropping = None
            self._proxy._count("drop_response")
            return True
        for kind, flags, stream in frames:
            if stream == self._dropping and (kind == _RST_STREAM or (kind in (_DATA, _HEADERS) and flags & _END_STREAM)):
                self._dropping = None
                self._proxy._count("drop_response")
        return True

    def _take_drop(self) -> bool:
        """Whether the request just seen is the one whose response must be dropped."""
        for faults in (self.own, self._proxy._all):
            if faults.drop_after is None:
                continue
            if faults.drop_after == 0:
                faults.drop_after = None
                return True
            faults.drop_after -= 1
        return False

    def _write(self, dest: socket.socket | None, pending: queue.Queue) -> None:
        while True:
            item = pending.get()
            if item is _EOF:
                self._half_close(dest)
                return
            due, data = item
            with self._proxy._cond:
                while not self.closed and (self._effective()[1] or time.monotonic() < due):
                    wait = None if self._effective()[1] else due - time.monotonic()
                    self._proxy._cond.wait(wait)
                if self.closed:
                    return
            try:
                dest.sendall(data)
            except OSError:
                self._abort()
                return

    def _half_close(self, dest: socket.socket | None) -> None:
        with self._proxy._cond:
            if self.closed:
                return
            self._open_directions -= 1
            done = self._open_directions == 0
            if done:
                self.closed = True
        if dest is not None and not done:
            try:
                dest.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        if done:
            for sock in self._sockets():
                sock.close()
            self._proxy._forget(self)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))


class Proxy:
    """A TCP proxy from ``127.0.0.1:<free port>`` to ``target_host:target_port`` with switchable
    faults (see the module docstring). Use as a context manager or call ``close``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.faults: collections.Counter[str] = collections.Counter()
        self._cond = threading.Condition()
        self._all = _Faults()
        self._isolated: set[bytes] = set()
        self._connections: list[Connection] = []
        self._finished: list[Connection] = []
        self._closed = False
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        # accept() is not woken by close() from another thread: poll so that close() is prompt.
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, daemon=True, name="nemesis-accept")
        self._acceptor.start()

    @classmethod
    def to(cls, endpoint: str) -> Proxy:
        """A proxy for ``host:port``."""
        host, _, port = endpoint.rpartition(":")
        return cls(host.strip("[]"), int(port))

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def connections(self) -> list[Connection]:
        """The connections open now."""
        with self._cond:
            return list(self._connections)

    # -- faults for every connection ----------------------------------------------------------

    def latency(self, seconds: float) -> None:
        with self._cond:
            self._all.latency = seconds
            self._count("latency", seconds > 0)

    def stall(self) -> None:
        with self._cond:
            self._all.stalled = True
            self._count("stall")

    def resume(self) -> None:
        with self._cond:
            self._all.stalled = False
            self._cond.notify_all()

    def blackhole(self) -> None:
        with self._cond:
            self._all.blackholed = True
            self._count("blackhole")

    def reset(self) -> int:
        """Reset every open connection; returns how many."""
        victims = self.connections()
        for connection in victims:
            connection.reset()
        return len(victims)

    def drop_next_response(self, then_blackhole: bool = False) -> None:
        self.drop_responses_after(0, then_blackhole)

    def drop_responses_after(self, n: int, then_blackhole: bool = False) -> None:
        """Let ``n`` requests (on any connection) be answered, then drop the next one's response
        and reset its connection; with ``then_blackhole``, the proxy then ``blackhole``s until
        ``heal`` (the client's retry meets an outage, not a fresh connection)."""
        with self._cond:
            self._all.drop_after = n
            self._all.blackhole_after_drop = then_blackhole

    def isolate(self, marker: bytes) -> None:
        """Blackhole every connection, open now or opened later, whose client's first bytes
        contain ``marker``, until ``heal``."""
        with self._cond:
            self._isolated.add(marker)
            self._count("isolate")
            for connection in self._connections:
                self._isolate_if_marked(connection)

    def heal(self) -> None:
        """Every fault off, the proxy's and each connection's; connections that lost bytes are
        reset."""
        with self._cond:
            self._all = _Faults()
            self._isolated = set()
            self._cond.notify_all()
        for connection in self.connections():
            connection.heal()

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._acceptor.join(timeout=5)
        self._listener.close()
        for connection in self.connections():
            connection._abort()
        with self._cond:
            finished, self._finished = self._finished, []
        for connection in finished:
            connection.join(timeout=2)

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------

    def _isolate_if_marked(self, connection: Connection) -> None:
        """Called with the lock held."""
        if any(marker in connection.opening for marker in self._isolated):
            connection.own.blackholed = True

    def _count(self, kind: str, really: bool = True) -> None:
        if really:
            self.faults[kind] += 1

    def _forget(self, connection: Connection) -> None:
        with self._cond:
            if connection in self._connections:
                self._connections.remove(connection)
                self._finished.append(connection)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                self._admit(client)
            except OSError:
                # The client gave up before it was set up: nothing to forward, keep accepting.
                client.close()

    def _admit(self, client: socket.socket) -> None:
        client.settimeout(None)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._cond:
            blackholed = self._all.blackholed
        upstream = None
        if not blackholed:
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                # The target is down: reset the client at once, the nearest a proxy comes to the
                # refusal the client would have seen.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                return
            upstream.settimeout(None)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            connection = Connection(self, client, upstream)
        except OSError:
            if upstream is not None:
                upstream.close()
            raise
        if upstream is None:
            connection.poisoned = True
        with self._cond:
            if self._closed:
                connection.closed = True
                for sock in connection._sockets():
                    sock.close()
                return
            self._connections.append(connection)
        connection._start()


def proxies_for(endpoints: Iterable[str]) -> list[Proxy]:
    """One proxy per ``host:port``, in order."""
    return [Proxy.to(endpoint) for endpoint in endpoints]
