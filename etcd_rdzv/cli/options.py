"""The connection options, each from its flag or its ``ETCD_RDZV_*`` environment variable, the
``EtcdConfig`` they build (validated as the backend validates ``--rdzv-conf``), and the errors that
``etcd-rdzv`` reports as one line."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from torch.distributed.elastic.rendezvous import RendezvousParameters

from ..config import EtcdConfig, config_from_params

PROG = "etcd-rdzv"
ENV_PREFIX = "ETCD_RDZV_"
# An operator waits on the terminal: give up on an unreachable etcd sooner than the agents do.
DEFAULT_READ_TIMEOUT = 10.0

# CLI option (argparse dest) -> the backend's ``--rdzv-conf`` key; ``endpoints`` is the endpoint.
CONF_KEYS: dict[str, str] = {
    "protocol": "protocol",
    "ca_cert": "ca_cert",
    "cert": "ssl_cert",
    "key": "ssl_cert_key",
    "user": "username",
    "password": "password",
    "key_prefix": "key_prefix",
    "read_timeout": "read_timeout",
}
CONNECTION_OPTIONS = ("endpoints", *CONF_KEYS)


class CliError(Exception):
    """A failure reported as one line on stderr; ``exit_code`` is the process's exit status."""

    exit_code = 1


class UsageError(CliError):
    """The command line or the configuration is wrong."""

    exit_code = 2


class RunNotFound(CliError):
    """The run has no keys in etcd."""

    exit_code = 3

def env_var(option: str) -> str:
    """The environment variable that supplies ``option`` (an argparse dest) when no flag does."""
    return ENV_PREFIX + option.upper()


def resolve_options(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, str]:
    """The connection options that are set, each from its flag or else its environment variable;
    an empty variable counts as unset."""
    values: dict[str, str] = {}
    for option in CONNECTION_OPTIONS:
        value = getattr(args, option, None)
        if value is None:
            value = environ.get(env_var(option), "").strip() or None
        if value is not None:
            values[option] = value
    return values


def params_from_options(options: Mapping[str, str], run_id: str | None) -> RendezvousParameters:
    """The ``RendezvousParameters`` a torchrun agent would pass the backend for these options."""
    conf: dict[str, Any] = {CONF_KEYS[k]: v for k, v in options.items() if k in CONF_KEYS}
    conf.setdefault("read_timeout", DEFAULT_READ_TIMEOUT)
    return RendezvousParameters(
        backend="etcd_rdzv",
        endpoint=options.get("endpoints", ""),
        run_id=run_id or PROG,
        min_nodes=1,
        max_nodes=1,
        **conf,
    )


def load_config(args: argparse.Namespace, environ: Mapping[str, str]) -> EtcdConfig:
    """Validate the connection options exactly as the backend does.

    Raises:
        UsageError: an option is invalid; the message names it.
    """
    try:
        params = params_from_options(resolve_options(args, environ), getattr(args, "run_id", None))
        return config_from_params(params)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
