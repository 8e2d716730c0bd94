"""The etcd backend's configuration, read from torch's ``RendezvousParameters`` and checked whole
before anything touches the network."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

from rdzv_common.settings import choice_option, existing_file, seconds_option, text_option, warn_unknown_keys

DEFAULT_PORT = 2379
DEFAULT_KEY_PREFIX = "/torch/elastic/rendezvous"
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_TTL = 7200.0

# The ``--rdzv-conf`` keys this backend reads.
ETCD_KEYS = frozenset(
    {"protocol", "ca_cert", "ssl_cert", "ssl_cert_key", "username", "password", "read_timeout", "key_prefix", "ttl"}
)
_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")


@dataclass(frozen=True)
class EtcdConfig:
    """How to reach etcd and where this run's keys live."""

    endpoints: tuple[tuple[str, int], ...]  # tried in turn on failure; an IPv6 host is kept bare
    protocol: str = "http"  # or "https"
    ca_cert: str | None = None  # the root certificate of the server's; None: the system's roots
    ssl_cert: str | None = None  # the client certificate and its key: both or neither
    ssl_cert_key: str | None = None
    username: str | None = None  # etcd credentials: both or neither
    password: str | None = field(default=None, repr=False)
    read_timeout: float = DEFAULT_READ_TIMEOUT  # seconds a request may take, and retry a failure
    key_prefix: str = DEFAULT_KEY_PREFIX  # the directory that holds one directory per run
    ttl: float = DEFAULT_TTL  # seconds a run's keys outlive the run's last activity

    def describe_endpoints(self) -> str:
        """The endpoints as a user wrote them (an IPv6 host in brackets), for messages."""
        return ",".join(f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in self.endpoints)


def parse_endpoints(endpoint: str | None) -> tuple[tuple[str, int], ...]:
    """Parse ``host[:port][,host[:port]...]`` (empty: torch's default ``localhost:2379``); a
    ``ValueError`` names a malformed entry."""
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


def _pair(first: tuple[str, str | None], second: tuple[str, str | None], why: str) -> None:
    """Refuse one of two options set without the other."""
    if (first[1] is None) != (second[1] is None):
        (given, _), (missing, _) = (first, second) if first[1] is not None else (second, first)
        raise ValueError(f"The rendezvous configuration option '{given}' is set but '{missing}' is not; {why}.")


def config_from_params(params: RendezvousParameters) -> EtcdConfig:
    """Read and validate the etcd backend's options from ``params``; a ``ValueError`` names the
    key, the value and the fix. Unknown ``--rdzv-conf`` keys are warned of, not refused: torch and
    the core read keys of their own from the same dictionary."""
    endpoints = parse_endpoints(params.endpoint)
    protocol = choice_option(params, "protocol", ("http", "https"), "http")
    ca_cert, ssl_cert, ssl_cert_key = (
        existing_file(key, params.get(key), "a PEM file that exists on this node") for key in ("ca_cert", "ssl_cert", "ssl_cert_key")
    )
    _pair(("ssl_cert", ssl_cert), ("ssl_cert_key", ssl_cert_key), "a client certificate needs its private key, so pass both or neither")
    if protocol == "http" and (ca_cert or ssl_cert):
        raise ValueError(
            "The rendezvous configuration sets TLS files (ca_cert/ssl_cert/ssl_cert_key) but "
            "'protocol' is 'http'; set protocol=https to use TLS, or drop the TLS options."
        )
    username = text_option(params, "username")
    password = text_option(params, "password", strip=False, secret=True)
    _pair(("username", username), ("password", password), "etcd authentication needs both")
    key_prefix = text_option(params, "key_prefix") or DEFAULT_KEY_PREFIX
    if not key_prefix.startswith("/") or key_prefix == "/":
        raise ValueError(
            f"The rendezvous configuration option 'key_prefix' is {key_prefix!r}; it must be an "
            f"absolute key directory such as '{DEFAULT_KEY_PREFIX}'."
        )

    config = EtcdConfig(
        endpoints, protocol, ca_cert, ssl_cert, ssl_cert_key, username, password,
        read_timeout=seconds_option(params, "read_timeout", DEFAULT_READ_TIMEOUT),
        key_prefix=key_prefix.rstrip("/"),
        ttl=seconds_option(params, "ttl", DEFAULT_TTL),
    )
    warn_unknown_keys(params, ETCD_KEYS, "etcd")
    return config
