"""One rule for ``--rdzv-conf`` values, whichever part of the package reads the key: the core
(``settings_from_params``), the etcd backend and the c10d backend give the same value the same
verdict, and the same parsed value (``rdzv_common.settings``' module docstring states the rule).

Each owner is driven through its public entry point, so a backend that parsed a key its own way
would show up here."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters

import c10d_rdzv.config
import etcd_rdzv.config
from rdzv_common.settings import settings_from_params


def _params(**conf) -> RendezvousParameters:
    return RendezvousParameters("etcd-v2", "127.0.0.1:1234", "rule-run", 2, 4, **conf)


def _core(key: str) -> Callable[[object], object]:
    return lambda value: getattr(settings_from_params(_params(**{key: value}), environ={}), key)


def _etcd(key: str) -> Callable[[object], object]:
    return lambda value: getattr(etcd_rdzv.config.config_from_params(_params(**{key: value})), key)


def _c10d(key: str) -> Callable[[object], object]:
    return lambda value: getattr(c10d_rdzv.config.config_from_params(_params(**{key: value})), key)


REFUSED = "refused"


def _verdict(owner: Callable[[object], object], key: str, value: object) -> object:
    """What ``owner`` makes of ``value`` for ``key``: the parsed value, or ``REFUSED`` after
    checking that the error names the key, the value and what to pass."""
    try:
        return owner(value)
    except ValueError as exc:
        message = str(exc)
        assert f"'{key}'" in message and repr(value) in message and "it must be" in message, message
        return REFUSED


def _same_verdict(owners: dict[str, tuple[str, Callable[[object], object]]], value: object, expected: object):
    verdicts = {name: _verdict(owner, key, value) for name, (key, owner) in owners.items()}
    assert verdicts == {name: expected for name in owners}, f"{value!r}: {verdicts}"


SECONDS = {
    "core join_timeout": ("join_timeout", _core("join_timeout")),
    "core heartbeat_timeout": ("heartbeat_timeout", _core("heartbeat_timeout")),
    "etcd read_timeout": ("read_timeout", _etcd("read_timeout")),
    "etcd ttl": ("ttl", _etcd("ttl")),
    "c10d read_timeout": ("read_timeout", _c10d("read_timeout")),
}


@pytest.mark.parametrize(
    "value, expected",
    [
        (30, 30.0),
        (0.5, 0.5),
        (1.5, 1.5),
        ("30", 30.0),
        ("1.5", 1.5),
        (" 2.5 ", 2.5),
        ("1e3", 1000.0),
        (True, REFUSED),
        (False, REFUSED),
        (0, REFUSED),
        ("0", REFUSED),
        (-1, REFUSED),
        ("-0.5", REFUSED),
        ("inf", REFUSED),
        (math.inf, REFUSED),
        ("nan", REFUSED),
        pytest.param(10**400, REFUSED, id="10**400"),
        ("30s", REFUSED),
        ("", REFUSED),
        (None, REFUSED),
        ([30], REFUSED),
    ],
    ids=repr,
)
def test_a_number_of_seconds_gets_one_verdict_from_core_etcd_and_c10d(value, expected):
    _same_verdict(SECONDS, value, expected)


# Only the core reads counts; its two count keys follow one rule too.
COUNTS = {
    "core keep_alive_max_attempt": ("keep_alive_max_attempt", _core("keep_alive_max_attempt")),
    "core node_unit": ("node_unit", _core("node_unit")),
}


@pytest.mark.parametrize(
    "value, expected",
    [
        (2, 2),
        (2.0, 2),
        ("2", 2),
        (" 2 ", 2),
        (True, REFUSED),
        (False, REFUSED),
        (0, REFUSED),
        ("0", REFUSED),
        (-2, REFUSED),
        (1.5, REFUSED),
        ("1.5", REFUSED),
        ("2.0", REFUSED),
        (math.inf, REFUSED),
        (math.nan, REFUSED),
        ("two", REFUSED),
        (None, REFUSED),
    ],
    ids=repr,
)
def test_a_count_gets_one_verdict_from_every_key_that_holds_one(value, expected):
    verdicts = {name: _verdict(owner, key, value) for name, (key, owner) in COUNTS.items()}
    assert verdicts == {name: expected for name in COUNTS}, f"{value!r}: {verdicts}"
    if expected is not REFUSED:
        assert all(type(parsed) is int for parsed in verdicts.values())


# The etcd backend reads no flag.
FLAGS = {
    "core stable_ranks": ("stable_ranks", _core("stable_ranks")),
    "c10d is_host": ("is_host", _c10d("is_host")),
}


@pytest.mark.parametrize(
    "value, expected",
    [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        ("true", True),
        ("False", False),
        ("YES", True),
        ("no", False),
        ("y", True),
        ("n", False),
        ("t", True),
        ("f", False),
        ("1", True),
        ("0", False),
        (" yes ", True),
        (2, REFUSED),
        (-1, REFUSED),
        (1.0, REFUSED),
        ("2", REFUSED),
        ("maybe", REFUSED),
        ("on", REFUSED),
        ("", REFUSED),
    ],
    ids=repr,
)
def test_a_flag_gets_one_verdict_from_core_and_c10d(value, expected):
    _same_verdict(FLAGS, value, expected)


# A choice: each owner's own choices, written in the ways the rule allows and refuses.
CHOICES = {
    "core rank_order": ("rank_order", _core("rank_order"), "sorted"),
    "etcd protocol": ("protocol", _etcd("protocol"), "https"),
    "c10d store_type": ("store_type", _c10d("store_type"), "tcp"),
}


@pytest.mark.parametrize(
    "spell, accepted",
    [
        (str, True),
        (str.upper, True),
        (lambda choice: f"  {choice.title()} ", True),
        (lambda choice: "", False),
        (lambda choice: "   ", False),
        (lambda choice: choice + "x", False),
        (lambda choice: 1, False),
        (lambda choice: True, False),
    ],
    ids=["as-is", "upper", "spaced-title", "empty", "blank", "unknown", "int", "bool"],
)
def test_a_choice_gets_one_verdict_from_core_etcd_and_c10d(spell, accepted):
    for name, (key, owner, choice) in CHOICES.items():
        value = spell(choice)
        verdict = _verdict(owner, key, value)
        assert verdict == (choice if accepted else REFUSED), f"{name} {value!r}: {verdict}"
