"""One connection to an etcd cluster: endpoints and failover, the one retry policy, the one mapping
of failures to torch's ``RendezvousConnectionError`` (docs/design.md, "Connections"). Transient
failures are retried with jittered backoff for the request's budget, on the next endpoint each time;
what retrying cannot fix (credentials, TLS, permissions) fails at once, saying what to fix."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import etcd3
import etcd3.etcdrpc
import etcd3.exceptions
import grpc
import tenacity
from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from ..config import EtcdConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")

# A failed endpoint rests this long while the others are tried (etcd3's 300 s would leave a
# single-endpoint client dead for minutes).
ENDPOINT_REST_SECONDS = 1.0
MIN_ATTEMPT_SECONDS = 1.0
MAX_TXN_OPS = 128  # etcd's default --max-txn-ops
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # above the largest state the codec accepts
# gRPC pings a connection quiet this long; etcd refuses pings more often than every 5 s.
KEEPALIVE_SECONDS = 5
KEEPALIVE_TIMEOUT_SECONDS = 3
# A member without a leader refuses requests and cancels watches instead of serving a stale view.
REQUIRE_LEADER = ("hasleader", "true")
# A renewal waits this share of its lease's TTL (at least MIN_SILENT_SECONDS) on a channel that
# hears nothing else before the connection counts as silent: resent, it has most of the TTL left.
SILENT_FRACTION_OF_TTL = 0.2
MIN_SILENT_SECONDS = 2.0
# Unanswered this long, a client warns once: a restart passes unreported, a wrong endpoint does not.
WARN_AFTER_SECONDS = 3.0

_UNANSWERED_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_TRANSIENT_CODES = _UNANSWERED_CODES | {grpc.StatusCode.RESOURCE_EXHAUSTED}
# gRPC reports a refused TLS handshake as UNAVAILABLE, like an unreachable server: only the text
# tells them apart (etcd 3.4 refuses a client without a certificate with a TSI error).
_TLS_DETAILS = ("ssl", "tls", "handshake", "certificate", "tsi_")
_PLAIN_TO_TLS_DETAILS = ("socket closed", "http1")  # a TLS port closes a plain-text connection
# etcd's back-pressure ("etcdserver: too many requests") reached a client as UNKNOWN too.
_BACK_PRESSURE = "too many requests"
# etcd3's own tables: the statuses that bench an endpoint, and its exceptions.
_FAILED_ENDPOINT_CODES = _UNANSWERED_CODES | {grpc.StatusCode.INTERNAL}
_ETCD3_EXCEPTIONS = {
    grpc.StatusCode.INTERNAL: etcd3.exceptions.InternalServerError,
    grpc.StatusCode.UNAVAILABLE: etcd3.exceptions.ConnectionFailedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: etcd3.exceptions.ConnectionTimeoutError,
    grpc.StatusCode.FAILED_PRECONDITION: etcd3.exceptions.PreconditionFailedError,
}


class Retryable(Exception):
    """Raised inside a request to have it retried (a lapsed lease to grant anew, say)."""


class RpcStatus(grpc.RpcError):
    """A gRPC status without the call or traceback it came from: an error kept for later must not
    hold the frames, and the objects, of every thread that raised it."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    @classmethod
    def of(cls, error: grpc.RpcError) -> RpcStatus:
        return cls(error.code(), error.details() or "")


def status(exc: BaseException | None) -> tuple[grpc.StatusCode | None, str]:
    """The gRPC status code and details behind ``exc`` (etcd3 raises its own exceptions from it)."""
    for candidate in (exc, getattr(exc, "__cause__", None), getattr(exc, "__context__", None)):
        if isinstance(candidate, grpc.RpcError) and hasattr(candidate, "code"):
            return candidate.code(), candidate.details() or ""
    return None, ""


def _describe(exc: BaseException) -> str:
    code, details = status(exc)
    return f"{code.name}: {details}" if code is not None else f"{type(exc).__name__}: {exc}"


def _is_tls_failure(exc: BaseException) -> bool:
    return any(d in status(exc)[1].lower() for d in _TLS_DETAILS)


def is_transient(exc: BaseException | None) -> bool:
    """Whether ``exc`` may go away when the request is retried (an expired token is renewed)."""
    code, details = status(exc)
    return (
        isinstance(exc, (Retryable, etcd3.exceptions.NoServerAvailableError))
        or code == grpc.StatusCode.UNAUTHENTICATED
        or (code in _TRANSIENT_CODES and not _is_tls_failure(exc))
        or _BACK_PRESSURE in details.lower()
    )


def _on_abandoned_channel(exc: BaseException) -> bool:
    """Whether ``exc`` ended a call on a channel ``redial`` left: gRPC cancels the calls in flight
    and refuses new ones with a ``ValueError``."""
    if isinstance(exc, ValueError):
        return "closed channel" in str(exc)
    code, details = status(exc)
    return code == grpc.StatusCode.CANCELLED and "Channel closed!" in details  # a stream's: "Stream removed (...)"


def connection_error(
    config: EtcdConfig, exc: BaseException, waited: float | None = None, budget: float | None = None
) -> RendezvousConnectionError:
    """A failed request as a ``RendezvousConnectionError`` that says what to fix; ``waited``: how
    long a transient failure was retried, within ``budget`` (``read_timeout`` by default)."""
    code, details = status(exc)
    # etcd answers a wrong password, and a request without one where auth is on, INVALID_ARGUMENT.
    if code == grpc.StatusCode.INVALID_ARGUMENT and config.username is not None:
        problem = f"authentication failed for user '{config.username}' ({details}); check the 'username' and 'password' options"
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
            problem = f"it could not be reached (last error {_describe(exc)})"
        elif budget is None or budget == config.read_timeout:
            problem = f"it could not be reached within read_timeout={config.read_timeout:g}s (tried for {waited:.1f}s; last error {_describe(exc)})"
        else:
            problem = f"it could not be reached in {waited:.1f}s of trying (last error {_describe(exc)})"
        if config.protocol == "http" and any(s in details.lower() for s in _PLAIN_TO_TLS_DETAILS):
            problem += "; if the server uses TLS, set protocol=https"
    else:
        problem = f"the request failed ({_describe(exc)})"
    return RendezvousConnectionError(
        f"The rendezvous backend etcd at {config.protocol}://{config.describe_endpoints()} failed: {problem}."
    )


def silent_after(ttl: float | None, limit: float) -> float:
    """Seconds without a word after which a channel that owes a renewal of a ``ttl``-second lease
    is silent; at most ``limit`` (``limit`` without a TTL)."""
    return limit if ttl is None else min(limit, max(MIN_SILENT_SECONDS, ttl * SILENT_FRACTION_OF_TTL))


class Hearing:
    """When each endpoint's channel last heard from etcd, on ``clock``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._heard_at: dict[str, float] = {}

    def heard(self, label: str) -> None:
        self._heard_at[label] = self._clock()  # one dict store: atomic

    def quiet_for(self, label: str) -> float:
        return self._clock() - self._heard_at.get(label, float("-inf"))


class Unanswered:
    """The current stretch of attempts that found no endpoint answering: warned of once, after
    ``WARN_AFTER_SECONDS``; its end logged."""

    def __init__(self, where: str, budget: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._where, self._budget, self._clock = where, budget, clock
        self._lock = threading.Lock()
        self._since: float | None = None
        self._warned = False

    def failed(self, cause: str) -> None:
        now = self._clock()
        with self._lock:
            self._since = now if self._since is None else self._since
            warn = not self._warned and now - self._since >= WARN_AFTER_SECONDS
            self._warned = self._warned or warn
            since = self._since
        if warn:
            logger.warning(
                "%s has served no request for %.0fs (last error %s); requests go on trying, each for up to %s.",
                self._where, now - since, cause, self._budget,
            )

    def answered(self) -> None:
        if self._since is None:  # the common case, without the lock
            return
        with self._lock:
            since, warned, self._since, self._warned = self._since, self._warned, None, False
        if since is not None and warned:
            logger.info("%s answers again, after %.1fs.", self._where, self._clock() - since)


_attempt = threading.local()  # the endpoint label this thread's attempt uses (``pinned_endpoint``)


@contextmanager
def _on_endpoint(label: str | None) -> Iterator[str | None]:
    before, _attempt.label = getattr(_attempt, "label", None), label
    try:
        yield label
    finally:
        _attempt.label = before


def pinned_endpoint(client: etcd3.MultiEndpointEtcd3Client) -> AbstractContextManager[str]:
    """Within the block, a failed call of this thread benches the endpoint the client was on when
    the block began, whatever other threads moved it to meanwhile. Yields its label."""
    client.channel  # noqa: B018 - moves off a benched endpoint first
    return _on_endpoint(client._current_endpoint_label)


def fail_over(client: etcd3.MultiEndpointEtcd3Client, exc: grpc.RpcError, endpoint: str | None = None) -> NoReturn:
    """Handle ``exc`` of a call made outside etcd3's methods as they do: bench the endpoint it used
    (``endpoint``, when known) and raise etcd3's exception, caused by ``exc``."""
    with _on_endpoint(getattr(_attempt, "label", None) if endpoint is None else endpoint):
        try:
            client._manage_grpc_errors(exc)
        except etcd3.exceptions.Etcd3Exception as mapped:
            raise mapped from exc
    raise exc


class FailoverClient(etcd3.MultiEndpointEtcd3Client):
    """etcd3's multi-endpoint client, but a failed call benches the endpoint *it* used: calls stuck
    on a stalled endpoint time out after another thread moved the client on, and etcd3 benched
    the healthy endpoint each time. It also leaves a silent channel for a new one (``redial``)."""

    def __init__(self, *args: Any, options: Sequence[tuple[str, Any]] = (), **kwargs: Any) -> None:
        self._attempt_timeout = threading.local()
        super().__init__(*args, **kwargs)
        self._options = list(options)
        self.hearing = Hearing()
        for label in self.endpoints:
            self.hearing.heard(label)
        self._dial_lock = threading.Lock()
        self._redialled_at: dict[str, float] = {}
        # The streams riding on the channels (the lessor's keep-alives), told of a channel left
        # and of the client closing.
        self.on_redial: list[Callable[[grpc.Channel, RpcStatus], None]] = []
        self.on_close: list[Callable[[], None]] = []

    @property
    def timeout(self) -> float | None:
        """How long one call may take: the attempt timeout, or less within ``attempt_limit``."""
        return getattr(self._attempt_timeout, "seconds", self._timeout)

    @timeout.setter
    def timeout(self, seconds: float | None) -> None:
        self._timeout = seconds

    @contextmanager
    def attempt_limit(self, seconds: float | None) -> Iterator[None]:
        if seconds is None:
            yield
            return
        before = getattr(self._attempt_timeout, "seconds", None)
        self._attempt_timeout.seconds = seconds if self._timeout is None else min(self._timeout, seconds)
        try:
            yield
        finally:
            self._attempt_timeout.seconds = before
            if before is None:
                del self._attempt_timeout.seconds

    def redial(self, label: str, channel: grpc.Channel, why: str) -> None:
        """Leave ``channel`` of endpoint ``label`` for a new TCP connection (``options`` hold
        ``grpc.use_local_subchannel_pool``, or gRPC would hand it the old one): its calls end and
        are retried there, the watch reopens; with other endpoints, this one also rests."""
        endpoint, now = self.endpoints[label], time.monotonic()
        with self._dial_lock:
            if endpoint.channel is not channel:
                return  # left already
            dial = grpc.secure_channel if endpoint.secure else grpc.insecure_channel
            credentials = (endpoint.credentials,) if endpoint.secure else ()
            endpoint.channel = dial(endpoint.netloc, *credentials, options=self._options)
            if label == self._current_endpoint_label:
                self._clear_old_stubs()
            if len(self.endpoints) > 1:
                endpoint.fail()
            # A member that never answered the last new connection either is hung: warn once.
            again = self.hearing.quiet_for(label) >= now - self._redialled_at.get(label, float("-inf"))
            self._redialled_at[label] = now
            self.hearing.heard(label)
        (logger.debug if again else logger.warning)(
            "The connection to etcd at %s went silent (%s); a new connection was dialled.", label, why
        )
        for abandon in self.on_redial:
            abandon(channel, RpcStatus(grpc.StatusCode.UNAVAILABLE, f"the connection went silent ({why})"))
        channel.close()

    def close(self) -> None:
        for stop in self.on_close:
            stop()
        super().close()

    def _manage_grpc_errors(self, exc: grpc.RpcError) -> NoReturn:
        label = getattr(_attempt, "label", None)
        silent = label or self._current_endpoint_label
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and silent in self.endpoints and self.timeout is not None:
            quiet = self.hearing.quiet_for(silent)
            if quiet >= self.timeout:  # no word on the channel for as long as the call: silent
                self.redial(silent, self.endpoints[silent].channel, f"a call timed out after {quiet:.1f}s without a word on it")
        if label is None or label == self._current_endpoint_label or label not in self.endpoints:
            super()._manage_grpc_errors(exc)
        if exc.code() in _FAILED_ENDPOINT_CODES:  # the client left this call's endpoint already
            self.endpoints[label].fail()
        exception = _ETCD3_EXCEPTIONS.get(exc.code())
        if exception is None:
            raise exc
        raise exception() from exc


class EtcdClient:
    """An etcd v3 client for one ``EtcdConfig`` (TLS, authentication, failover); every request runs
    under the one retry policy, inside ``passage()`` (``fork.ForkGate``). Bad credentials, or no
    etcd, raise ``RendezvousConnectionError`` at construction."""

    def __init__(self, config: EtcdConfig, passage: Callable[[], AbstractContextManager] = nullcontext) -> None:
        self.config = config
        self._passage = passage
        secure = config.protocol == "https"
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # gRPC's reconnect backoff grows to 120 s; after a restart the client must be back soon.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.keepalive_time_ms", KEEPALIVE_SECONDS * 1000),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_SECONDS * 1000),
            ("grpc.use_local_subchannel_pool", 1),  # a redial gets a connection of its own
        ]
        files = (config.ca_cert, config.ssl_cert_key, config.ssl_cert)
        credentials = grpc.ssl_channel_credentials(*(p and Path(p).read_bytes() for p in files)) if secure else None
        endpoints = [
            etcd3.Endpoint(f"[{host}]" if ":" in host else host, port, secure=secure, creds=credentials,
                           time_retry=ENDPOINT_REST_SECONDS, opts=options)
            for host, port in config.endpoints
        ]
        # An attempt takes a quarter of read_timeout, at least 2 s: time is left to fail over.
        attempt = min(config.read_timeout, max(2.0, config.read_timeout / 4))
        self.raw = FailoverClient(endpoints, timeout=attempt, failover=True, options=options)
        self.raw.metadata = (REQUIRE_LEADER,)
        self._token_expired = self._closed = False
        # The last failure a server (or the network) gave, until a request succeeds, as a bare
        # status: what a request that only found the endpoints resting reports.
        self._rpc_failure: RpcStatus | None = None
        self._policies: dict[float | None, tenacity.Retrying] = {}
        where = f"etcd at {config.protocol}://{config.describe_endpoints()}"
        self._unanswered = Unanswered(where, f"read_timeout={config.read_timeout:g}s")
        if config.username is not None:
            try:
                self.request(lambda _: self._authenticate())
            except BaseException:
                self.raw.close()
                raise

    def _authenticate(self) -> None:
        request = etcd3.etcdrpc.AuthenticateRequest(name=self.config.username, password=self.config.password)
        try:
            response = self.raw.authstub.Authenticate(request, self.raw.timeout)
        except grpc.RpcError as exc:
            fail_over(self.raw, exc)
        # Plain metadata: gRPC refuses call credentials on a channel without TLS.
        self.raw.metadata = (("token", response.token), REQUIRE_LEADER)
        self.raw.call_credentials = None

    def _policy(self, budget: float | None) -> tenacity.Retrying:
        """The retry policy of ``budget``, shared by threads: transient failures retried with jittered
        backoff, then a ``RendezvousConnectionError`` naming the last failure a server gave."""
        if budget in self._policies:
            return self._policies[budget]
        seconds = self.config.read_timeout if budget is None else budget

        def give_up(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception()
            if status(exc)[0] is None:
                exc = self._rpc_failure or exc
            raise connection_error(self.config, exc, state.seconds_since_start, seconds) from exc

        def prepare(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception()
            logger.debug("etcd request failed (%s); retry %d", _describe(exc), state.attempt_number)
            self._token_expired = self._token_expired or status(exc)[0] == grpc.StatusCode.UNAUTHENTICATED

        self._policies[budget] = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient),
            wait=tenacity.wait_random_exponential(multiplier=0.05, max=max(0.05, min(2.0, seconds / 4))),
            stop=tenacity.stop_before_delay(seconds),
            before_sleep=prepare,
            retry_error_callback=give_up,
        )
        return self._policies[budget]

    def request(self, op: Callable[[etcd3.MultiEndpointEtcd3Client], T], budget: float | None = None) -> T:
        """``op(client)``, retrying transient failures for ``budget`` seconds (``read_timeout``), each
        attempt within the budget; else ``RendezvousConnectionError``."""
        limit = max(MIN_ATTEMPT_SECONDS, budget) if budget else None

        def attempt(client: FailoverClient) -> T:
            self._check_open()
            try:
                with self._passage(), pinned_endpoint(client) as label, client.attempt_limit(limit):
                    if self._token_expired and self.config.username is not None:
                        self._authenticate()
                        self._token_expired = False
                    result = op(client)
                client.hearing.heard(label)
                self._rpc_failure = None
                self._unanswered.answered()
                return result
            except etcd3.exceptions.NoServerAvailableError:
                # Every endpoint rests: after a refused TLS handshake, waiting cannot help.
                refused = self._rpc_failure
                if refused is not None and _is_tls_failure(refused):
                    raise connection_error(self.config, refused) from refused
                self._unanswered.failed(_describe(refused) if refused else "every endpoint rests after a failure")
                raise
            except Exception as exc:
                self._check_open()  # closed meanwhile: gRPC says only "Channel closed!"
                if _on_abandoned_channel(exc):
                    raise Retryable("the request's connection went silent and was left for a new one") from exc
                code, details = status(exc)
                if code is not None:
                    self._rpc_failure = RpcStatus(code, details)
                    if code in _UNANSWERED_CODES and not _is_tls_failure(exc):
                        self._unanswered.failed(_describe(exc))
                raise

        try:
            return self._policy(budget)(attempt, self.raw)
        except (grpc.RpcError, etcd3.exceptions.Etcd3Exception) as exc:
            raise connection_error(self.config, exc) from exc

    def _check_open(self) -> None:
        if self._closed:
            raise RendezvousConnectionError(
                f"The etcd client of {self.config.protocol}://{self.config.describe_endpoints()} is "
                "closed: its last rendezvous handler was shut down."
            )

    def close(self) -> None:
        """Close the channels; later requests fail with ``RendezvousConnectionError``. Idempotent."""
        self._closed = True
        self.raw.close()
