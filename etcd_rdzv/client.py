"""A connection to etcd for one ``EtcdConfig``, and the retry policy every request goes through.

Transient failures (no reachable endpoint, timeouts, leader changes, an expired auth token) are
retried with jittered exponential backoff for at most ``read_timeout`` seconds, moving to the next
endpoint after each failure. What retrying cannot fix (wrong credentials, a TLS handshake the server
refuses, missing permissions) fails at once. Either way the caller sees torch's
``RendezvousConnectionError``, naming the endpoints and the cause.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NoReturn, TypeVar

import etcd3
import etcd3.etcdrpc
import etcd3.exceptions
import grpc
import tenacity
from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from .config import EtcdConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")

# After a failure an endpoint rests this long before it is tried again; the other endpoints are
# tried meanwhile. etcd3's default (300 s) would leave a single-endpoint client dead for minutes.
ENDPOINT_REST_SECONDS = 1.0
# etcd's default --max-txn-ops: the most operations one transaction may carry.
MAX_TXN_OPS = 128
# gRPC's default 4 MiB receive limit is below the largest state the codec accepts.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_TRANSIENT_DETAILS = ("leader changed", "no leader", "request timed out", "too many requests", "connection reset")
_TLS_DETAILS = ("ssl", "tls", "handshake", "certificate")


class Retryable(Exception):
    """Raised inside a request to have it retried, e.g. once a lapsed lease is to be granted anew."""


def rpc_error(exc: BaseException | None) -> grpc.RpcError | None:
    """The gRPC error behind ``exc``; etcd3 raises its own exceptions from within the handler."""
    for candidate in (exc, getattr(exc, "__context__", None)):
        if isinstance(candidate, grpc.RpcError) and hasattr(candidate, "code"):
            return candidate
    return None


def _details(exc: BaseException) -> str:
    rpc = rpc_error(exc)
    if rpc is not None:
        return f"{rpc.code().name}: {rpc.details()}"
    return f"{type(exc).__name__}: {exc}"


def is_token_expired(exc: BaseException | None) -> bool:
    """Whether etcd refused the request because the auth token expired (it is simply renewed)."""
    rpc = rpc_error(exc)
    return rpc is not None and "invalid auth token" in (rpc.details() or "")


def is_transient(exc: BaseException | None) -> bool:
    """Whether ``exc`` may go away when the request is retried."""
    if isinstance(exc, (Retryable, etcd3.exceptions.NoServerAvailableError)) or is_token_expired(exc):
        return True
    rpc = rpc_error(exc)
    if rpc is None or _is_tls_failure(exc):
        return False
    details = (rpc.details() or "").lower()
    return rpc.code() in _TRANSIENT_CODES or any(d in details for d in _TRANSIENT_DETAILS)


def _is_tls_failure(exc: BaseException) -> bool:
    rpc = rpc_error(exc)
    return rpc is not None and any(d in (rpc.details() or "").lower() for d in _TLS_DETAILS)


def connection_error(config: EtcdConfig, exc: BaseException) -> RendezvousConnectionError:
    """Translate a failed request into a ``RendezvousConnectionError`` that says what to fix."""
    where = f"etcd at {config.protocol}://{config.describe_endpoints()}"
    rpc = rpc_error(exc)
    details = (rpc.details() or "") if rpc is not None else ""
    if "authentication failed" in details:
        problem = (
            f"authentication failed for user '{config.username}' ({details}); check the "
            "'username' and 'password' options"
        )
    elif "user name is empty" in details:
        problem = f"etcd requires authentication ({details}); pass the 'username' and 'password' options"
    elif rpc is not None and rpc.code() == grpc.StatusCode.PERMISSION_DENIED:
        problem = f"permission denied for user '{config.username}' ({details}); grant it read-write access to '{config.key_prefix}'"
    elif _is_tls_failure(exc):
        problem = (
            f"the TLS handshake failed ({details}); check 'ca_cert', 'ssl_cert' and 'ssl_cert_key' "
            "against the server's certificate and its --client-cert-auth setting"
        )
    elif is_transient(exc):
        problem = f"it could not be reached within read_timeout={config.read_timeout:g}s (last error {_details(exc)})"
        if config.protocol == "http":
            problem += "; if the server uses TLS, set protocol=https"
    else:
        problem = f"the request failed ({_details(exc)})"
    return RendezvousConnectionError(f"The rendezvous backend {where} failed: {problem}.")


def retrying(
    config: EtcdConfig,
    budget: float | None = None,
    before_retry: Callable[[BaseException], None] | None = None,
) -> tenacity.Retrying:
    """The retry policy: transient failures retried with jittered exponential backoff.

    Args:
        budget: seconds to keep retrying; ``read_timeout`` by default.
        before_retry: called with the failure before each retry.

    Once the budget is spent the last failure is raised as a ``RendezvousConnectionError``.
    Failures that are not transient propagate unchanged from the first attempt.
    """
    budget = config.read_timeout if budget is None else budget
    # With every endpoint resting, etcd3 only says "no endpoint available": report the last error
    # a server (or the network) actually gave instead.
    last_rpc_failure: BaseException | None = None

    def give_up(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception()
        if rpc_error(exc) is None and last_rpc_failure is not None:
            exc = last_rpc_failure
        raise connection_error(config, exc) from exc

    def log_and_prepare(state: tenacity.RetryCallState) -> None:
        nonlocal last_rpc_failure
        exc = state.outcome.exception()
        if rpc_error(exc) is not None:
            last_rpc_failure = exc
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


def fail_over(client: etcd3.MultiEndpointEtcd3Client, exc: grpc.RpcError) -> NoReturn:
    """Handle ``exc`` from a call made outside etcd3's own methods the way those methods do: an
    endpoint that is down is marked failed (so the retry uses another), and etcd3's exception for
    the status is raised. Call it from the ``except`` block that caught ``exc``."""
    client._manage_grpc_errors(exc)
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


class EtcdClient:
    """An etcd v3 client for one ``EtcdConfig``: TLS, authentication and failover across the
    configured endpoints, with every request run under ``retrying``.

    Constructing one authenticates (when credentials are configured), so bad credentials fail here.

    Raises:
        RendezvousConnectionError: etcd could not be reached or refused the credentials.
    """

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        secure = config.protocol == "https"
        credentials = _credentials(config) if secure else None
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # gRPC's default reconnect backoff grows to 120 s; after an etcd restart the client
            # must be back well within read_timeout.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
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
        self.raw = etcd3.MultiEndpointEtcd3Client(endpoints, timeout=config.read_timeout, failover=True)
        # Set when etcd dropped the auth token; the next attempt authenticates again first.
        self._token_expired = False
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
        self.raw.metadata = (("token", response.token),)
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

        def attempt(client: etcd3.MultiEndpointEtcd3Client) -> T:
            if self._token_expired and self.config.username is not None:
                self._authenticate()
                self._token_expired = False
            return op(client)

        try:
            return retrying(self.config, budget, self._before_retry)(attempt, self.raw)
        except (grpc.RpcError, etcd3.exceptions.Etcd3Exception) as exc:
            raise connection_error(self.config, exc) from exc

    def close(self) -> None:
        """Close the gRPC channels. Idempotent."""
        self.raw.close()
