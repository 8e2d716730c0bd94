"""What the exporter's mirror of one run counts (``etcd_rdzv/exporter.py``), fed states directly."""

from __future__ import annotations

from rdzv_common.codec import encode_state
from rdzv_common.state import NodeDesc, RendezvousState
from etcd_rdzv.exporter import RunMirror
from etcd_rdzv.keys import RunKeys

A, B = NodeDesc("10.0.0.1", 1, 0), NodeDesc("10.0.0.2", 2, 0)


def _complete(round_: int) -> bytes:
    return encode_state(RendezvousState(round=round_, complete=True, participants={A: 0, B: 1}, world_size=2))


def test_a_run_whose_first_write_completes_its_round_counts_that_round():
    """Bug: a round counted only if the exporter had seen the state before it completed. When the
    first write folded every join of the first round, the key appeared complete and the counter
    stayed at 0 (integration test of the exporter, failing now and then)."""
    created = RunMirror(RunKeys("/p", "job"))
    created.set_state(_complete(0), 10.0, created=True)
    assert (created.rounds_completed, created.last_completed_at) == (1, 10.0)


def test_a_state_found_complete_at_load_was_not_seen_completing():
    loaded = RunMirror(RunKeys("/p", "job"))
    loaded.set_state(_complete(3), 10.0)
    assert loaded.rounds_completed == 0 and loaded.last_completed_at is None
    loaded.set_state(_complete(3), 11.0)  # rewritten, same group
    assert loaded.rounds_completed == 0
    loaded.set_state(encode_state(RendezvousState(round=4)), 12.0)
    loaded.set_state(_complete(4), 13.0)
    assert (loaded.rounds_completed, loaded.last_completed_at) == (1, 13.0)
