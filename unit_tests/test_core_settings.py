"""Settings: defaults, parsing of every ``--rdzv-conf`` key, and refusal of bad values."""

from __future__ import annotations

import dataclasses

import pytest
import torch.distributed as dist
from torch.distributed.elastic.rendezvous import RendezvousParameters

from rdzv_common.handler import DynamicRendezvousHandler, create_handler
from rdzv_common.memory import MemoryBackend, MemoryStore
from rdzv_common.settings import CORE_KEYS, RendezvousSettings, settings_from_params

FLOAT_KEYS = [k for k in CORE_KEYS if k not in ("keep_alive_max_attempt", "node_unit")]


def _params(backend="memory", run_id="set-run", min_nodes=1, max_nodes=2, **conf) -> RendezvousParameters:
    return RendezvousParameters(backend, "localhost:0", run_id, min_nodes, max_nodes, **conf)


def test_defaults_match_torch():
    s = settings_from_params(_params())
    assert s.run_id == "set-run" and s.min_nodes == 1 and s.max_nodes == 2
    assert s.join_timeout == 600
    assert s.last_call_timeout == 30
    assert s.close_timeout == 30
    assert s.heartbeat_timeout == 5
    assert s.keep_alive_interval == 5
    assert s.keep_alive_max_attempt == 3
    assert isinstance(s.keep_alive_max_attempt, int)
    assert s.liveness_ttl == 15
    assert s == RendezvousSettings("set-run", 1, 2)


def test_core_keys_are_exactly_the_documented_ones():
    assert set(CORE_KEYS) == {
        "join_timeout",
        "last_call_timeout",
        "close_timeout",
        "heartbeat_timeout",
        "keep_alive_interval",
        "keep_alive_max_attempt",
        "health_check_timeout",
        "health_cooldown",
        "node_unit",
    }
    assert {f.name for f in dataclasses.fields(RendezvousSettings)} >= set(CORE_KEYS)


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("raw, expected", [("12", 12.0), ("0.25", 0.25), (7, 7.0), (1.5, 1.5), ("1e1", 10.0)])
def test_every_float_key_is_parsed(key, raw, expected):
    s = settings_from_params(_params(**{key: raw}))
    assert getattr(s, key) == expected
    # Nothing else moved.
    for other in FLOAT_KEYS:
        if other != key:
            assert getattr(s, other) == CORE_KEYS[other]


@pytest.mark.parametrize("raw, expected", [("4", 4), (4, 4), (4.0, 4), ("1", 1)])
def test_keep_alive_max_attempt_is_parsed_as_int(raw, expected):
    s = settings_from_params(_params(keep_alive_max_attempt=raw))
    assert s.keep_alive_max_attempt == expected
    assert type(s.keep_alive_max_attempt) is int


def test_all_keys_together():
    s = settings_from_params(
        _params(
            join_timeout="3",
            last_call_timeout="0.2",
            close_timeout="4",
            heartbeat_timeout="0.5",
            keep_alive_interval="0.1",
            keep_alive_max_attempt="6",
        )
    )
    assert (s.join_timeout, s.last_call_timeout, s.close_timeout) == (3.0, 0.2, 4.0)
    assert (s.heartbeat_timeout, s.keep_alive_interval, s.keep_alive_max_attempt) == (0.5, 0.1, 6)
    assert s.liveness_ttl == pytest.approx(0.6)


BAD_VALUES = ["0", 0, -1, "-3", "abc", "", "nan", float("nan"), "inf", float("inf"), "-inf", None, [1]]


@pytest.mark.parametrize("key", list(CORE_KEYS))
@pytest.mark.parametrize("raw", BAD_VALUES, ids=repr)
def test_bad_value_is_refused_naming_key_and_value(key, raw):
    with pytest.raises(ValueError) as info:
        settings_from_params(_params(**{key: raw}))
    msg = str(info.value)
    assert f"'{key}'" in msg, msg
    assert repr(raw) in msg, msg


@pytest.mark.parametrize("raw", [2.5, "2.5", 0.5, "1.0e0x"], ids=repr)
def test_fractional_keep_alive_max_attempt_is_refused(raw):
    with pytest.raises(ValueError, match="keep_alive_max_attempt") as info:
        settings_from_params(_params(keep_alive_max_attempt=raw))
    assert repr(raw) in str(info.value)


def test_min_greater_than_max_is_refused():
    with pytest.raises(ValueError, match="max_nodes|maximum"):
        RendezvousSettings("r", 3, 2)
    with pytest.raises(ValueError):
        _params(min_nodes=3, max_nodes=2)


def test_min_below_one_is_refused():
    with pytest.raises(ValueError, match="min_nodes"):
        RendezvousSettings("r", 0, 2)


def test_empty_run_id_is_refused():
    with pytest.raises(ValueError, match="run id"):
        settings_from_params(_params(run_id=""))
    with pytest.raises(ValueError, match="run id"):
        RendezvousSettings("", 1, 1)


def test_create_handler_reports_the_params_backend_name():
    store = dist.HashStore()
    backend = MemoryBackend(MemoryStore(), "set-run", name="memory-internal")
    handler = create_handler(store, backend, _params(backend="etcd_rdzv", keep_alive_interval="0.1"))
    try:
        assert isinstance(handler, DynamicRendezvousHandler)
        assert handler.get_backend() == "etcd_rdzv"
        assert handler.get_run_id() == "set-run"
        assert handler.settings.keep_alive_interval == 0.1
        assert handler.settings.min_nodes == 1 and handler.settings.max_nodes == 2
    finally:
        backend.close()


def test_create_handler_uses_local_addr():
    backend = MemoryBackend(MemoryStore(), "set-run")
    handler = create_handler(dist.HashStore(), backend, _params(local_addr="node-7.example"))
    assert handler.node.addr == "node-7.example"


def test_create_handler_refuses_a_bad_value_and_records_the_failure(monkeypatch):
    import torch.distributed.elastic.events as events

    seen = []
    monkeypatch.setattr(events, "construct_and_record_rdzv_event", lambda **kw: seen.append(kw))
    backend = MemoryBackend(MemoryStore(), "set-run")
    with pytest.raises(ValueError, match="join_timeout"):
        create_handler(dist.HashStore(), backend, _params(join_timeout="-1"))
    assert seen and seen[-1]["run_id"] == "set-run"
    assert "join_timeout" in seen[-1]["message"]
