"""The ``etcd-rdzv`` command line: its argument parser, the dispatch to a subcommand, and the
exit status and one-line message of each failure (``main``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

from torch.distributed.elastic.rendezvous import RendezvousError, RendezvousStateError

from ..run import EtcdClient
from .admin import cmd_close, cmd_quarantine, cmd_reset, parse_duration
from .exporter import DEFAULT_LISTEN, cmd_exporter, parse_listen
from .options import DEFAULT_READ_TIMEOUT, PROG, CliError, UsageError, env_var, load_config
from .runs import cmd_list
from .status import cmd_status
from .watch import cmd_watch


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors become one-line ``UsageError``s instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _connection_parent() -> argparse.ArgumentParser:
    """The connection options, accepted before or after the subcommand; unset ones stay absent
    from the namespace so that one given before the subcommand is not reset after it."""
    parent = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    group = parent.add_argument_group("etcd connection (each also from its ETCD_RDZV_* variable; flags win)")
    helps = {
        "endpoints": "host:port[,host:port...] (default localhost:2379)",
        "protocol": "http or https",
        "ca_cert": "PEM file of the CA that signs the server's certificate",
        "cert": "PEM client certificate (with --key)",
        "key": "PEM private key of the client certificate",
        "user": "etcd user name (with a password)",
        "password": f"etcd password; prefer {env_var('password')}, which `ps` does not show",
        "key_prefix": "the runs' key directory (default /torch/elastic/rendezvous)",
        "read_timeout": f"seconds to keep retrying a failed request (default {DEFAULT_READ_TIMEOUT:g})",
    }
    for option, text in helps.items():
        group.add_argument(
            "--" + option.replace("_", "-"), dest=option, metavar=option.upper(), help=f"{text} [{env_var(option)}]"
        )
    return parent


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected a positive integer")
    return int(text)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"invalid timeout {text!r}: expected a positive number of seconds")
    return value


Command = Callable[[EtcdClient, argparse.Namespace], int]


# One example per command, shown in its --help and, all together, in the command's own.
EXAMPLES = {
    "status": f"{PROG} --endpoints 10.0.0.5:2379 status my-job --json | jq -r '.participants[].node'",
    "list": f"{PROG} --endpoints 10.0.0.5:2379 list",
    "watch": f"{PROG} --endpoints 10.0.0.5:2379 watch my-job --json --timeout 600 > my-job.events",
    "close": f"{PROG} --endpoints 10.0.0.5:2379 close my-job --now",
    "quarantine": f"{PROG} --endpoints 10.0.0.5:2379 quarantine my-job --add 10.0.0.7 --for 10m",
    "reset": f"{PROG} --endpoints 10.0.0.5:2379 reset my-job --yes",
    "exporter": f"{PROG} --endpoints 10.0.0.5:2379 exporter --listen 0.0.0.0:9464",
}


def build_parser() -> argparse.ArgumentParser:
    """The ``etcd-rdzv`` command line; each subcommand's namespace carries its ``handler``."""
    parent = _connection_parent()
    examples = "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES.values())
    parser = _Parser(
        prog=PROG, parents=[parent], description="Inspect and repair rendezvous runs in etcd.", epilog=examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Command, text: str, run: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, parents=[parent], help=text, description=text, epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if run:
            sub.add_argument("run_id", metavar="RUN_ID", help="the run id (torchrun's --rdzv-id)")
        sub.set_defaults(handler=handler)
        return sub

    add("status", cmd_status, "Show a run: round, members with ranks and liveness, lists, pending joins.").add_argument(
        "--json", action="store_true", help="print a JSON document with stable keys"
    )
    add("list", cmd_list, "List the runs under the key prefix, one line each under a header.", run=False).add_argument(
        "--json", action="store_true", help="print a JSON document with stable keys"
    )
    watch = add("watch", cmd_watch, "Print each change to a run as it happens; Ctrl-C stops.")
    watch.add_argument("--json", action="store_true", help="print one JSON object a line: the change, the state after it")
    watch.add_argument("--timeout", type=_positive_seconds, metavar="SECONDS", help="stop after this long")
    watch.add_argument("--count", type=_positive_int, metavar="N", help="stop after N changes")
    add("close", cmd_close, "Close a run: no node joins it any more, and no new round forms; a running group "
        "trains on until its workers exit, unless --now.").add_argument(
        "--now", action="store_true",
        help="also make the running group's agents stop their workers now and exit (status 1)",
    )
    quarantine = add("quarantine", cmd_quarantine, "Keep a host out of a run for a while, or let it back in; "
                     "without --add or --remove, list the quarantined hosts.")
    which = quarantine.add_mutually_exclusive_group()
    which.add_argument("--add", metavar="HOST", help="quarantine HOST (a node's address, as torchrun's --local-addr)")
    which.add_argument("--remove", metavar="HOST", help="end HOST's quarantine now")
    quarantine.add_argument("--for", dest="duration", type=parse_duration, metavar="DURATION",
                            help="how long, with --add: 90, 90s, 10m, 2h or 1d")
    reset = add("reset", cmd_reset, "Delete every key of a run (its state, joins, liveness and store).")
    reset.add_argument("--yes", action="store_true", help="really delete; without it, only show what would go")
    reset.add_argument("--force", action="store_true", help="delete even while nodes of the run are alive")
    add("exporter", cmd_exporter, "Serve Prometheus metrics of every run under the key prefix at /metrics.",
        run=False).add_argument("--listen", type=parse_listen, default=parse_listen(DEFAULT_LISTEN), metavar="HOST:PORT",
                                help=f"where to serve /metrics (default {DEFAULT_LISTEN}; port 0 picks a free one)")
    return parser


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr, flush=True)
    return code


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Connect with the configured options and run the chosen subcommand."""
    etcd = EtcdClient(load_config(args, environ))
    try:
        return args.handler(etcd, args)
    finally:
        etcd.close()


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run ``etcd-rdzv`` and return its exit status; every failure is one line on stderr."""
    run_id = None
    try:
        args = build_parser().parse_args(argv)
        run_id = getattr(args, "run_id", None)
        return run(args, os.environ if environ is None else environ)
    except CliError as exc:
        return _fail(str(exc), exc.exit_code)
    except RendezvousStateError as exc:
        fix = f" Fix: `{PROG} reset {run_id} --yes` deletes the run; its agents must then restart." if run_id else ""
        return _fail(f"{exc}{fix}", 1)
    except RendezvousError as exc:
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:  # the last resort: an operator gets a line, not a traceback
        return _fail(f"unexpected {type(exc).__name__}: {exc}", 1)
