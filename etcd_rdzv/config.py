"""The etcd backend's configuration, read from torch's ``RendezvousParameters`` and checked whole
before anything touches the network."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

from rdzv_common.settings import (
    choice_option,
    existing_file,
    seconds_option,
    text_option,
    warn_unknown_keys,
)

DEFAULT_PORT = 2379
DEFAULT_KEY_PREFIX = "/torch/elastic/rendezvous"
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_TTL = 7200.0

# The ``--rdzv-conf`` keys this backend reads.
ETCD_KEYS = frozenset(
    {
        "protocol",
        "ca_cert",
        "ssl_cert",
        "ssl_cert_key",
        "username",
        "password",
        "read_timeout",
        "key_prefix",
        "ttl",
    }
)
_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")


@dataclass(frozen=True)
class EtcdConfig:
    """How to reach etcd and where this run's keys live.

    Attributes:
        endpoints: ``(host, port)`` pairs tried in turn on failure; an IPv6 host is kept bare.
        protocol: ``"http"`` or ``"https"``.
        ca_cert: root certificate that signs the server's; ``None`` uses the system roots.
        ssl_cert, ssl_cert_key: the client certificate and its key, both or neither.
        username, password: etcd credentials, both or neither.
        read_timeout: seconds one request may take, and the bound on retrying a failed one.
        key_prefix: the directory that holds one state key per run.
        ttl: seconds a run's keys outlive the run's last activity.
    """

    endpoints: tuple[tuple[str, int], ...]
    protocol: str = "http"
    ca_cert: str | None = None
    ssl_cert: str | None = None
    ssl_cert_key: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    read_timeout: float = DEFAULT_READ_TIMEOUT
    key_prefix: str = DEFAULT_KEY_PREFIX
    ttl: float = DEFAULT_TTL

    def describe_endpoints(self) -> str:
        """The endpoints as a user wrote them, for messages."""
        return ",".join(format_endpoint(host, port) for host, port in self.endpoints)


def format_endpoint(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets (as gRPC targets and URLs want it)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoints(endpoint: str | None) -> tuple[tuple[str, int], ...]:
    """Parse ``host[:port][,host[:port]...]``; an empty endpoint means ``localhost:2379`` (torch's
    default).

    Raises:
        ValueError: naming the malformed entry.
    """
    if endpoint is None or not endpoint.strip():
        return (("localhost", DEFAULT_PORT),)
    return tuple(_parse_one(item.strip(), endpoint) for item in endpoint.split(","))


def _bad_endpoint(entry: str, endpoint: str, problem: str) -> ValueError:
    return ValueError(
        f"The rendezvous endpoint '{endpoint}' is invalid: entry '{entry}' {problem}. Pass "
        "--rdzv-endpoint as HOST[:PORT] or a comma-separated list of them, "
        "e.g. 'etcd-0:2379,etcd-1:2379' or '[::1]:2379'."
    )


def _parse_one(entry: str, endpoint: str) -> tuple[str, int]:
    """One ``host[:port]`` entry, parsed by torch's own ``parse_rendezvous_endpoint`` after the
    checks that turn its mistakes into a message that says what to write instead."""
    if not entry:
        raise _bad_endpoint(entry, endpoint, "is empty")
    if "://" in entry:
        raise _bad_endpoint(entry, endpoint, "has a URL scheme; drop it and set protocol=https in --rdzv-conf for TLS")
    after_host = entry
    if entry.startswith("["):
        inside, sep, after_host = entry[1:].partition("]")
        if not sep:
            raise _bad_endpoint(entry, endpoint, "lacks the closing ']' of its IPv6 address")
        try:
            ipaddress.IPv6Address(inside)
        except ValueError:
            raise _bad_endpoint(entry, endpoint, f"has '{inside}' in brackets, which is no IPv6 address") from None
        if after_host and not after_host.startswith(":"):
            raise _bad_endpoint(entry, endpoint, "has text after its IPv6 address that is not ':PORT'")
    elif entry.count(":") > 1:
        raise _bad_endpoint(entry, endpoint, "looks like a bare IPv6 address; write it in brackets")
    _, sep, port_text = after_host.rpartition(":")
    if sep and not (port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise _bad_endpoint(entry, endpoint, f"has port '{port_text}', which is not an integer in 1..65535")
    try:
        host, port = parse_rendezvous_endpoint(entry, DEFAULT_PORT)
    except ValueError as exc:
        raise _bad_endpoint(entry, endpoint, f"is not HOST[:PORT] ({exc})") from None
    if not entry.startswith("[") and not _HOSTNAME.match(host):
        raise _bad_endpoint(entry, endpoint, f"has the invalid host name '{host}'")
    return host, port


def _pem_file(params: RendezvousParameters, key: str) -> str | None:
    return existing_file(key, params.get(key), "a PEM file that exists on this node")


def config_from_params(params: RendezvousParameters) -> EtcdConfig:
    """Read and validate the etcd backend's options from ``params``.

    Unknown ``--rdzv-conf`` keys are logged as warnings, not rejected, since torch and the shared
    rendezvous core read keys of their own from the same dictionary.

    Raises:
        ValueError: for any invalid option, naming the key, the value and the fix.
    """
    endpoints = parse_endpoints(params.endpoint)

    protocol = choice_option(params, "protocol", ("http", "https"), "http")

    ca_cert = _pem_file(params, "ca_cert")
    ssl_cert = _pem_file(params, "ssl_cert")
    ssl_cert_key = _pem_file(params, "ssl_cert_key")
    if (ssl_cert is None) != (ssl_cert_key is None):
        given, missing = ("ssl_cert", "ssl_cert_key") if ssl_cert else ("ssl_cert_key", "ssl_cert")
        raise ValueError(
            f"The rendezvous configuration option '{given}' is set but '{missing}' is not; a "
            "client certificate needs its private key, so pass both or neither."
        )
    if protocol == "http" and (ca_cert or ssl_cert):
        raise ValueError(
            "The rendezvous configuration sets TLS files (ca_cert/ssl_cert/ssl_cert_key) but "
            "'protocol' is 'http'; set protocol=https to use TLS, or drop the TLS options."
        )

    username = text_option(params, "username")
    password = text_option(params, "password", strip=False, secret=True)
    if (username is None) != (password is None):
        given, missing = ("username", "password") if username else ("password", "username")
        raise ValueError(
            f"The rendezvous configuration option '{given}' is set but '{missing}' is not; etcd "
            "authentication needs both."
        )

    key_prefix = text_option(params, "key_prefix") or DEFAULT_KEY_PREFIX
    if not key_prefix.startswith("/") or key_prefix == "/":
        raise ValueError(
            f"The rendezvous configuration option 'key_prefix' is {key_prefix!r}; it must be an "
            f"absolute key directory such as '{DEFAULT_KEY_PREFIX}'."
        )

    config = EtcdConfig(
        endpoints=endpoints,
        protocol=protocol,
        ca_cert=ca_cert,
        ssl_cert=ssl_cert,
        ssl_cert_key=ssl_cert_key,
        username=username,
        password=password,
        read_timeout=seconds_option(params, "read_timeout", DEFAULT_READ_TIMEOUT),
        key_prefix=key_prefix.rstrip("/"),
        ttl=seconds_option(params, "ttl", DEFAULT_TTL),
    )
    warn_unknown_keys(params, ETCD_KEYS, "etcd")
    return config
