"""``etcd-rdzv``: look at and repair the rendezvous runs that live in etcd, without reading code.

Subcommands::

    etcd-rdzv status RUN_ID [--json]        one run: round, members, liveness, pending joins
    etcd-rdzv watch RUN_ID [--json] [--timeout S] [--count N]
                                            print each change to the run as it happens
    etcd-rdzv list [--json]                 every run under the key prefix, one line each
    etcd-rdzv close RUN_ID [--now]          no node joins the run any more; with --now its
                                            running group stops its workers and exits too
    etcd-rdzv reset RUN_ID --yes [--force]  delete every key of the run (the fix for a corrupt
                                            state); --force while nodes of it are alive
    etcd-rdzv quarantine RUN_ID [--add HOST --for 10m | --remove HOST]
                                            keep a host out of the run, let it back in, or list
    etcd-rdzv exporter [--listen HOST:PORT]  serve Prometheus metrics of every run at /metrics

The connection options are the backend's ``--rdzv-conf`` keys, validated by the same code
(``config_from_params``); each may also come from an ``ETCD_RDZV_*`` environment variable, and a
flag wins over its variable. Failures print one line, ``etcd-rdzv: error: ...``, on stderr and exit
with 2 (usage or configuration), 1 (etcd unreachable, corrupt state, other runtime failure) or
3 (no such run).
"""

from .command_line import main

__all__ = ["main"]
