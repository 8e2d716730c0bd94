"""A connection to etcd for one ``EtcdConfig``, and the retry policy every request goes through.

Transient failures (no reachable endpoint, timeouts, leader changes, an expired auth token) are
retried with jittered exponential backoff for at most ``read_timeout`` seconds, moving to the next
endpoint after each failure. What retrying cannot fix (wrong credentials, a TLS handshake the server
refuses, missing permissions) fails at once. Either way the caller sees torch's
``RendezvousConnectionError``, naming the endpoints and the cause.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, NoReturn, TypeVar

import etcd3
import etcd3.etcdrpc
import etcd3.exceptions
import grpc
import tenacity
from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from .config import EtcdConfig
from .keepalive import KeepAliveFailed, KeepAliveStream
from .outage import Unanswered
from .silence import Hearing, silent_after
from .status import RpcStatus

logger = logging.getLogger(__name__)

T = TypeVar("T")

# After a failure an endpoint rests this long before it is tried again; the other endpoints are
# tried meanwhile. etcd3's default (300 s) would leave a single-endpoint client dead for minutes.
ENDPOINT_REST_SECONDS = 1.0
# The shortest a request's budget makes one of its attempts (``EtcdClient.request``).
MIN_ATTEMPT_SECONDS = 1.0
# etcd's default --max-txn-ops: the most operations one transaction may carry.
MAX_TXN_OPS = 128
# gRPC's default 4 MiB receive limit is below the largest state the codec accepts.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# gRPC keepalive pings, sent after this long without a word from the server, find a dead
# connection (a half-open TCP connection, a host gone) that would otherwise look like a quiet one:
# well inside the shortest TTL a package default gives a lease (10 s, the session's). etcd refuses
# pings more often than every 5 s by default. (gRPC took far longer than this to act on a silent
# connection here; the client's own check, ``silence.py``, is what leaves one in time.)
KEEPALIVE_SECONDS = 5
KEEPALIVE_TIMEOUT_SECONDS = 3
# etcd's require-leader metadata: a member without a leader refuses requests and cancels watches
# instead of serving a view that may be stale or never move again.
REQUIRE_LEADER = ("hasleader", "true")

# etcd's errors by gRPC status: leader changes, elections, overload and unreachable members are
# UNAVAILABLE, DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED; an expired auth token is UNAUTHENTICATED.
_TRANSIENT_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
# The failures of an attempt that found no endpoint answering (``outage.py``).
_UNANSWERED_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# gRPC reports a refused TLS handshake as UNAVAILABLE, like an unreachable server: no status tells
# the two apart, so only here the text decides. (etcd 3.4 refuses a client without a certificate
# with a TSI error that names no certificate.)
_TLS_DETAILS = ("ssl", "tls", "handshake", "certificate", "tsi_")
# How a gRPC client without TLS fails against a TLS port: the server closes the connection.
_PLAIN_TO_TLS_DETAILS = ("socket closed", "http1")
# etcd's back-pressure ("etcdserver: too many requests": it applies entries more than 5,000 behind
# what it committed) is RESOURCE_EXHAUSTED on most calls, but reached a client as UNKNOWN with the
# same text (4,096 nodes over 16 processes on 2 cores): a reason to back off and retry, whatever
# the code.
_BACK_PRESSURE = "too many requests"


class Retryable(Exception):
    """Raised inside a request to have it retried, e.g. once a lapsed lease is to be granted anew."""


def rpc_error(exc: BaseException | None) -> grpc.RpcError | None:
    """The gRPC error behind ``exc``; etcd3 raises its own exceptions from it."""
    for candidate in (exc, getattr(exc, "__cause__", None), getattr(exc, "__context__", None)):
        if isinstance(candidate, grpc.RpcError) and hasattr(candidate, "code"):
            return candidate
    return None


def _details(exc: BaseException) -> str:
    rpc = rpc_error(exc)
    if rpc is not None:
        return f"{rpc.code().name}: {rpc.details()}"
    return f"{type(exc).__name__}: {exc}"


def _code(exc: BaseException | None) -> grpc.StatusCode | None:
    rpc = rpc_error(exc)
    return rpc.code() if rpc is not None else None


def is_token_expired(exc: BaseException | None) -> bool:
    """Whether etcd refused the request because the auth token expired (it is simply renewed)."""
    return _code(exc) == grpc.StatusCode.UNAUTHENTICATED


def is_transient(exc: BaseException | None) -> bool:
    """Whether ``exc`` may go away when the request is retried."""
    if isinstance(exc, (Retryable, etcd3.exceptions.NoServerAvailableError)) or is_token_expired(exc):
        return True
    if _code(exc) in _TRANSIENT_CODES and not _is_tls_failure(exc):
        return True
    rpc = rpc_error(exc)
    return rpc is not None and _BACK_PRESSURE in (rpc.details() or "")


def _on_abandoned_channel(exc: BaseException) -> bool:
    """Whether ``exc`` ended a call because the client closed its channel, on an open client: the
    connection went silent and was left for a new one (``FailoverClient.redial``). gRPC cancels
    the calls in flight, and refuses new ones with a ``ValueError``."""
    if isinstance(exc, ValueError):
        return "closed channel" in str(exc)
    rpc = rpc_error(exc)
    return rpc is not None and rpc.code() == grpc.StatusCode.CANCELLED and rpc.details() == "Channel closed!"


def _is_tls_failure(exc: BaseException) -> bool:
    rpc = rpc_error(exc)
    return rpc is not None and any(d in (rpc.details() or "").lower() for d in _TLS_DETAILS)


def _looks_like_a_tls_server(exc: BaseException) -> bool:
    """Whether a plain-text client's failure looks like a TLS server's answer: it accepted the
    connection and closed it (etcd's TLS port does so when the HTTP/2 preface comes in clear)."""
    rpc = rpc_error(exc)
    details = (rpc.details() or "").lower() if rpc is not None else ""
    return any(sign in details for sign in _PLAIN_TO_TLS_DETAILS)


def connection_error(
    config: EtcdConfig, exc: BaseException, waited: float | None = None, budget: float | None = None
) -> RendezvousConnectionError:
    """Translate a failed request into a ``RendezvousConnectionError`` that says what to fix.

    Args:
        waited: how long the request tried, for a failure retrying did not cure.
        budget: how long it was allowed to (``read_timeout`` by default).
    """
    where = f"etcd at {config.protocol}://{config.describe_endpoints()}"
    rpc = rpc_error(exc)
    details = (rpc.details() or "") if rpc is not None else ""
    code = _code(exc)
    # etcd answers a wrong password, and a request without one where auth is on, with INVALID_ARGUMENT.
    if code == grpc.StatusCode.INVALID_ARGUMENT and config.username is not None:
        problem = (
            f"authentication failed for user '{config.username}' ({details}); check the "
            "'username' and 'password' options"
        )
    elif code == grpc.StatusCode.INVALID_ARGUMENT:
        problem = f"etcd refused the request ({details}); if etcd requires authentication, pass the 'username' and 'password' options"
    elif code == grpc.StatusCode.PERMISSION_DENIED:
        problem = f"permission denied for user '{config.username}' ({details}); grant it read-write access to '{config.key_prefix}'"
    elif _is_tls_failure(exc):
        problem = (
            f"the TLS handshake failed ({details}); check 'ca_cert', 'ssl_cert' and 'ssl_cert_key' "
            "against the server's certificate and its --client-cert-auth setting"
        )
    elif is_transient(exc):
        if waited is None:
            problem = f"it could not be reached (last error {_details(exc)})"
        elif budget is None or budget == config.read_timeout:
            problem = f"it could not be reached within read_timeout={config.read_timeout:g}s (tried for {waited:.1f}s; last error {_details(exc)})"
        else:
            problem = f"it could not be reached in {waited:.1f}s of trying (last error {_details(exc)})"
        if config.protocol == "http" and _looks_like_a_tls_server(exc):
            problem += "; if the server uses TLS, set protocol=https"
    else:
        problem = f"the request failed ({_details(exc)})"
    return RendezvousConnectionError(f"The rendezvous backend {where} failed: {problem}.")


def retrying(
    config: EtcdConfig,
    budget: float | None = None,
    before_retry: Callable[[BaseException], None] | None = None,
    *,
    last_rpc_failure: Callable[[], BaseException | None],
) -> tenacity.Retrying:
    """The retry policy: transient failures retried with jittered exponential backoff.

    Args:
        budget: seconds to keep retrying; ``read_timeout`` by default.
        before_retry: called with the failure before each retry.
        last_rpc_failure: the last failure a server (or the network) gave the client, on any thread.

    Once the budget is spent the last failure is raised as a ``RendezvousConnectionError``.
    Failures that are not transient propagate unchanged from the first attempt.
    """
    budget = config.read_timeout if budget is None else budget

    def give_up(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception()
        # With every endpoint resting, etcd3 only says "no endpoint available", even when every
        # attempt of this request found the endpoints benched by another thread's failures: report
        # the last error a server (or the network) actually gave instead.
        if rpc_error(exc) is None:
            exc = last_rpc_failure() or exc
        raise connection_error(config, exc, state.seconds_since_start, budget) from exc

    def log_and_prepare(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception()
        logger.debug("etcd request failed (%s); retry %d", _details(exc), state.attempt_number)
        if before_retry is not None:
            before_retry(exc)

    return tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_transient),
        wait=tenacity.wait_random_exponential(multiplier=0.05, max=max(0.05, min(2.0, budget / 4))),
        stop=tenacity.stop_before_delay(budget),
        before_sleep=log_and_prepare,
        retry_error_callback=give_up,
    )


# The endpoint the calls of this thread's current attempt use (``pinned_endpoint``).
_attempt = threading.local()


@contextmanager
def pinned_endpoint(client: etcd3.MultiEndpointEtcd3Client) -> Iterator[str]:
    """Within the block, a call of this thread that fails benches the endpoint the client was on
    when the block began (``FailoverClient``), whatever other threads switched to meanwhile.
    Yields that endpoint's label."""
    client.channel  # noqa: B018 - moves off a benched endpoint before the attempt starts
    label = client._current_endpoint_label
    before = getattr(_attempt, "label", None)
    _attempt.label = label
    try:
        yield label
    finally:
        _attempt.label = before


class FailoverClient(etcd3.MultiEndpointEtcd3Client):
    """etcd3's multi-endpoint client, except that a failed call benches the endpoint *it* used.

    etcd3 benches whichever endpoint is current when a call fails. With calls in flight on several
    threads (a process's handlers, heartbeats, its view), the calls stuck on a stalled endpoint time
    out one after another *after* the first of them moved the client to a healthy endpoint, and
    each benches the healthy one; the client is back on the stalled endpoint once its rest is over,
    and requests spend their whole ``read_timeout`` going back and forth (found by
    ``integration_tests/test_nemesis_scenarios.py``'s stalled-connection scenario).
    """

    def __init__(self, *args: Any, options: Sequence[tuple[str, Any]] = (), **kwargs: Any) -> None:
        """``options``: the gRPC options of the endpoints' channels, for the channels ``redial``
        makes."""
        self._attempt_timeout = threading.local()
        super().__init__(*args, **kwargs)
        self._options = list(options)
        self.hearing = Hearing()
        for label in self.endpoints:
            self.hearing.heard(label)  # a new channel has its first silence counted from now
        self._dial_lock = threading.Lock()
        self._redialled_at: dict[str, float] = {}
        self.keep_alive = KeepAliveStream(self)

    @property
    def timeout(self) -> float | None:
        """How long one call may take: the client's attempt timeout, or less within
        ``attempt_limit`` on this thread (etcd3's methods read it at each call)."""
        return getattr(self._attempt_timeout, "seconds", self._timeout)

    @timeout.setter
    def timeout(self, seconds: float | None) -> None:
        self._timeout = seconds

    @contextmanager
    def attempt_limit(self, seconds: float) -> Iterator[None]:
        """Within the block, calls of this thread take at most ``seconds`` (if that is less than
        the client's attempt timeout)."""
        before = getattr(self._attempt_timeout, "seconds", None)
        self._attempt_timeout.seconds = seconds if self._timeout is None else min(self._timeout, seconds)
        try:
            yield
        finally:
            if before is None:
                del self._attempt_timeout.seconds
            else:
                self._attempt_timeout.seconds = before

    def refresh_lease(self, lease_id: int, ttl: float | None = None) -> list[etcd3.etcdrpc.LeaseKeepAliveResponse]:
        """Renew ``lease_id`` once, on the client's one keep-alive stream (etcd3 opens a stream,
        and gRPC a thread, per renewal). ``ttl``: the lease's TTL, which bounds how long the
        renewal waits on a connection that went silent (``silence.py``) before it is sent again on
        a new one."""
        try:
            granted = self.keep_alive.renew(lease_id, self.timeout, silent_after(ttl, self.timeout))
        except KeepAliveFailed as failed:
            if failed.abandoned:
                raise Retryable(failed.error.details()) from failed.error
            fail_over(self, failed.error, failed.endpoint)
        return [etcd3.etcdrpc.LeaseKeepAliveResponse(ID=lease_id, TTL=granted)]

    def redial(self, label: str, channel: grpc.Channel, why: str) -> None:
        """Leave ``channel``, the channel of endpoint ``label``, for a new connection: the calls on
        it end (renewals and requests are retried, the run view's watch reopens), and the next
        calls to the endpoint go out on a TCP connection of their own. With other endpoints to
        use, this one also rests, as after any failure. Nothing happens if ``channel`` was left
        already."""
        endpoint = self.endpoints[label]
        now = time.monotonic()
        with self._dial_lock:
            if endpoint.channel is not channel:
                return
            endpoint.channel = _dial(endpoint, self._options)
            if label == self._current_endpoint_label:
                self._clear_old_stubs()
            if len(self.endpoints) > 1:
                endpoint.fail()
            # A connection dialled last time that never heard a word: the member itself is silent
            # (hung), and a warning at every new connection to it would flood the log.
            again = self.hearing.quiet_for(label) >= now - self._redialled_at.get(label, float("-inf"))
            self._redialled_at[label] = now
            self.hearing.heard(label)
        (logger.debug if again else logger.warning)(
            "The connection to etcd at %s went silent (%s); a new connection was dialled.", label, why
        )
        self.keep_alive.abandon(channel, RpcStatus(grpc.StatusCode.UNAVAILABLE, f"the connection went silent ({why})"))
        channel.close()

    def _redial_if_silent(self, label: str) -> None:
        """A call on endpoint ``label`` timed out: if its channel heard nothing for as long as an
        attempt lasts, the connection is silent, not etcd slow (``silence.py``)."""
        quiet = self.hearing.quiet_for(label)
        if label in self.endpoints and self.timeout is not None and quiet >= self.timeout:
            self.redial(label, self.endpoints[label].channel, f"a call timed out after {quiet:.1f}s without a word on it")

    def close(self) -> None:
        self.keep_alive.stop()
        super().close()

    def _manage_grpc_errors(self, exc: grpc.RpcError) -> NoReturn:
        label = getattr(_attempt, "label", None)
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            self._redial_if_silent(label or self._current_endpoint_label)
        if label is None or label == self._current_endpoint_label or label not in self.endpoints:
            super()._manage_grpc_errors(exc)
        # The client has left this call's endpoint already: bench that one, keep the current.
        if exc.code() in _FAILED_ENDPOINT_CODES:
            self.endpoints[label].fail()
        exception = _ETCD3_EXCEPTIONS.get(exc.code())
        if exception is None:
            raise exc
        raise exception() from exc


def _dial(endpoint: etcd3.Endpoint, options: Sequence[tuple[str, Any]]) -> grpc.Channel:
    """A new channel to ``endpoint``, as etcd3 makes one (its options must include
    ``grpc.use_local_subchannel_pool``, or gRPC hands it the connection of the channel it
    replaces)."""
    if endpoint.secure:
        return grpc.secure_channel(endpoint.netloc, endpoint.credentials, options=options)
    return grpc.insecure_channel(endpoint.netloc, options=options)


# etcd3's own tables (``etcd3.client``): the statuses that bench an endpoint, and its exceptions.
_FAILED_ENDPOINT_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL}
)
_ETCD3_EXCEPTIONS = {
    grpc.StatusCode.INTERNAL: etcd3.exceptions.InternalServerError,
    grpc.StatusCode.UNAVAILABLE: etcd3.exceptions.ConnectionFailedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: etcd3.exceptions.ConnectionTimeoutError,
    grpc.StatusCode.FAILED_PRECONDITION: etcd3.exceptions.PreconditionFailedError,
}


def fail_over(client: etcd3.MultiEndpointEtcd3Client, exc: grpc.RpcError, endpoint: str | None = None) -> NoReturn:
    """Handle ``exc`` from a call made outside etcd3's own methods the way those methods do: an
    endpoint that is down is marked failed (so the retry uses another), and etcd3's exception for
    the status is raised, caused by ``exc`` (which ``rpc_error`` finds, wherever this is called).

    Args:
        endpoint: the label of the endpoint the call used, when known (a watch's).
    """
    before = getattr(_attempt, "label", None)
    if endpoint is not None:
        _attempt.label = endpoint
    try:
        client._manage_grpc_errors(exc)
    except etcd3.exceptions.Etcd3Exception as mapped:
        raise mapped from exc
    finally:
        _attempt.label = before
    raise exc


def _credentials(config: EtcdConfig) -> grpc.ChannelCredentials:
    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(
        root_certificates=read(config.ca_cert),
        private_key=read(config.ssl_cert_key),
        certificate_chain=read(config.ssl_cert),
    )


def attempt_timeout(config: EtcdConfig) -> float:
    """How long one attempt of a request may take: a quarter of ``read_timeout`` (at least 2 s), so
    that a member that hangs (paused, partitioned, a half-open connection) leaves time to fail over
    to the others, or a connection that was reset time to come back, within the request's budget."""
    return min(config.read_timeout, max(2.0, config.read_timeout / 4))


class ForkGate:
    """Requests pass while it is open; ``close`` waits for those in flight and holds new ones (see
    ``registry.py``: no thread may be inside gRPC at a ``fork()``). After a fork, the child's copy is
    ``orphan``ed: the clients it guards belong to the parent, and using one fails at once."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._inside = 0
        self._open = True
        self._orphaned = False

    @contextmanager
    def passage(self) -> Iterator[None]:
        with self._cond:
            if self._orphaned:
                raise RuntimeError(
                    "This etcd client was made by the parent of this forked process; build a new "
                    "rendezvous handler in the child."
                )
            self._cond.wait_for(lambda: self._open)
            self._inside += 1
        try:
            yield
        finally:
            with self._cond:
                self._inside -= 1
                self._cond.notify_all()

    def close(self, timeout: float) -> bool:
        """Stop new passages; return whether those in flight ended within ``timeout``."""
        with self._cond:
            self._open = False
            return self._cond.wait_for(lambda: self._inside == 0, timeout)

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def orphan(self) -> None:
        with self._cond:
            self._orphaned = True
            self._open = True
            self._cond.notify_all()


class EtcdClient:
    """An etcd v3 client for one ``EtcdConfig``: TLS, authentication and failover across the
    configured endpoints, with every request run under ``retrying`` and through ``gate``.

    Constructing one authenticates (when credentials are configured), so bad credentials fail here.

    Raises:
        RendezvousConnectionError: etcd could not be reached or refused the credentials.
    """

    def __init__(self, config: EtcdConfig, gate: ForkGate | None = None) -> None:
        self.config = config
        self._gate = gate or ForkGate()
        secure = config.protocol == "https"
        credentials = _credentials(config) if secure else None
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # gRPC's default reconnect backoff grows to 120 s; after an etcd restart the client
            # must be back well within read_timeout.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.keepalive_time_ms", KEEPALIVE_SECONDS * 1000),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_SECONDS * 1000),
            # A connection of the channel's own: gRPC shares one between channels to an address,
            # so a channel dialled to leave a silent connection (``redial``) would get it back.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        endpoints = [
            etcd3.Endpoint(
                f"[{host}]" if ":" in host else host,
                port,
                secure=secure,
                creds=credentials,
                time_retry=ENDPOINT_REST_SECONDS,
                opts=options,
            )
            for host, port in config.endpoints
        ]
        self.raw = FailoverClient(endpoints, timeout=attempt_timeout(config), failover=True, options=options)
        self.raw.metadata = (REQUIRE_LEADER,)
        # Set when etcd dropped the auth token; the next attempt authenticates again first.
        self._token_expired = False
        # The last failure a server (or the network) gave a request of this client, until one
        # succeeds: what a request that only found the endpoints resting reports.
        # Kept as a bare status: the error itself would hold the frames (and objects) of its thread.
        self._rpc_failure: RpcStatus | None = None
        # The retry policy of each budget asked for. A policy keeps its per-call state in
        # thread-locals, so threads share one; building one per request cost more than the request.
        self._policies: dict[float | None, tenacity.Retrying] = {}
        self._unanswered = Unanswered(
            f"etcd at {config.protocol}://{config.describe_endpoints()}", f"read_timeout={config.read_timeout:g}s"
        )
        self._closed = False
        if config.username is not None:
            try:
                self.request(lambda _: self._authenticate())
            except BaseException:
                self.raw.close()
                raise

    def _authenticate(self) -> None:
        try:
            response = self.raw.authstub.Authenticate(
                etcd3.etcdrpc.AuthenticateRequest(name=self.config.username, password=self.config.password),
                self.raw.timeout,
            )
        except grpc.RpcError as exc:
            fail_over(self.raw, exc)
        # The token travels as plain metadata: gRPC refuses call credentials on a channel without
        # TLS, which is how etcd3 would otherwise send it.
        self.raw.metadata = (("token", response.token), REQUIRE_LEADER)
        self.raw.call_credentials = None

    def _before_retry(self, exc: BaseException) -> None:
        if is_token_expired(exc):
            self._token_expired = True

    def request(self, op: Callable[[etcd3.MultiEndpointEtcd3Client], T], budget: float | None = None) -> T:
        """Run ``op(client)``, retrying transient failures for ``budget`` seconds (``read_timeout``
        by default).

        Raises:
            RendezvousConnectionError: the request failed for good.
        """

        # An attempt takes no longer than the request may (a heartbeat's attempt, no longer than
        # heartbeat_timeout: well within the node's liveness TTL), nor than a quarter of
        # read_timeout; a single attempt (budget 0), the latter.
        limit = max(MIN_ATTEMPT_SECONDS, budget) if budget else None

        def attempt(client: etcd3.MultiEndpointEtcd3Client) -> T:
            self._check_open()
            try:
                with self._gate.passage(), pinned_endpoint(client) as label, self._attempt_limit(limit):
                    if self._token_expired and self.config.username is not None:
                        self._authenticate()
                        self._token_expired = False
                    result = op(client)
                client.hearing.heard(label)
                self._rpc_failure = None
                self._unanswered.answered()
                return result
            except etcd3.exceptions.NoServerAvailableError:
                # Every endpoint rests after a failure. If the last one (of any request of this
                # client: the run's view may have met it first) was a refused TLS handshake,
                # waiting for the endpoints cannot help: say so now.
                refused = self._rpc_failure
                if refused is not None and _is_tls_failure(refused):
                    raise connection_error(self.config, refused) from refused
                self._unanswered.failed(_details(refused) if refused is not None else "every endpoint rests after a failure")
                raise
            except Exception as exc:
                self._check_open()  # closed meanwhile: gRPC says only "Channel closed!"
                if _on_abandoned_channel(exc):
                    raise Retryable("the request's connection went silent and was left for a new one") from exc
                rpc = rpc_error(exc)
                if rpc is not None:
                    self._rpc_failure = RpcStatus.of(rpc)
                    if rpc.code() in _UNANSWERED_CODES and not _is_tls_failure(rpc):
                        self._unanswered.failed(_details(rpc))
                raise

        policy = self._policies.get(budget)
        if policy is None:
            policy = retrying(self.config, budget, self._before_retry, last_rpc_failure=lambda: self._rpc_failure)
            self._policies[budget] = policy
        try:
            return policy(attempt, self.raw)
        except (grpc.RpcError, etcd3.exceptions.Etcd3Exception) as exc:
            raise connection_error(self.config, exc) from exc

    def _attempt_limit(self, seconds: float | None) -> AbstractContextManager:
        return nullcontext() if seconds is None else self.raw.attempt_limit(seconds)

    def _check_open(self) -> None:
        if self._closed:
            raise RendezvousConnectionError(
                f"The etcd client of {self.config.protocol}://{self.config.describe_endpoints()} is "
                "closed: its last rendezvous handler was shut down."
            )

    def close(self) -> None:
        """Close the gRPC channels; requests made from now on fail with a
        ``RendezvousConnectionError`` (a session's keep-alive may still be on its way). Idempotent."""
        self._closed = True
        self.raw.close()
