"""Rank order (sorted, natural, topology), stable ranks across rounds, whole node units, their
configuration, and the topology label in the wire format."""

from __future__ import annotations

import json
import random

import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters, RendezvousStateError

from rdzv_common.codec import MembershipChange, decode_announcement, decode_state, encode_join, encode_state
from rdzv_common.handler import _topology_label
from rdzv_common.ops import fold, nodes_waiting, settle
from rdzv_common.ranks import check_topology, natural_key, order_nodes
from rdzv_common.settings import RendezvousSettings, settings_from_params
from rdzv_common.state import NodeDesc, RendezvousState

WALL = 1_000_000.0


def _nodes(*addrs: str) -> list[NodeDesc]:
    return [NodeDesc(addr, 100, 0) for addr in addrs]


# Natural order.


@pytest.mark.parametrize(
    "ordered",
    [
        ["node2", "node10", "node100"],
        ["10.0.0.2", "10.0.0.10", "10.0.1.1", "192.168.0.1"],
        ["9.255.255.255", "10.0.0.1"],  # by numeric value, not as text
        ["10.0.0.9", "gpu-a1", "gpu-a2"],  # addresses before names
        ["gpu1-r2", "gpu1-r10", "gpu2-r1"],  # every run of digits counts
        ["Node1", "node2", "NODE3"],  # letters compared case-insensitively
        ["node007", "node7", "node08"],  # equal numbers: the text breaks the tie
        ["a", "a0", "a1b", "a1c", "b"],
        ["host.example", "host1.example", "host2.example", "host10.example"],  # label by label
        ["gpu2.dc10", "gpu10.dc2", "gpu10.dc10"],
        ["::1", "::2", "fe80::1"],
    ],
)
def test_natural_order(ordered):
    shuffled = list(ordered)
    random.Random(7).shuffle(shuffled)
    assert sorted(shuffled, key=natural_key) == ordered


def test_natural_key_tells_distinct_texts_apart():
    texts = ["node7", "node07", "Node7", "NODE7", "node7 "]
    assert len({natural_key(t) for t in texts}) == len(texts)


def test_sorted_is_torchs_order_and_natural_breaks_ties_by_pid_then_local_id():
    nodes = [NodeDesc("node10", 5, 0), NodeDesc("node9", 7, 1), NodeDesc("node9", 7, 0), NodeDesc("node9", 12, 0)]
    assert order_nodes(nodes, "sorted", {}) == sorted(nodes)
    assert [n.addr for n in order_nodes(nodes, "sorted", {})] == ["node10", "node9", "node9", "node9"]
    assert order_nodes(nodes, "natural", {}) == [nodes[2], nodes[1], nodes[3], nodes[0]]


# Topology order.


def test_topology_groups_by_longest_shared_prefix_labelled_first():
    a1, a2, b1, c1, x, y, z = _nodes("n1", "n2", "n3", "n4", "n5", "n6", "n10")
    labels = {
        a1: "zone-a/rack-10/sw-1",
        a2: "zone-a/rack-9/sw-2",
        b1: "zone-b/rack-1/sw-1",
        c1: "zone-a/rack-9/sw-1",
        z: "zone-a/rack-10/sw-1",
    }
    ordered = order_nodes([x, a1, b1, z, y, c1, a2], "topology", labels)
    # zone-a before zone-b; rack-9 before rack-10 (natural); switches within racks; nodes naturally
    # within a switch; unlabelled nodes last, naturally.
    assert ordered == [c1, a2, a1, z, b1, x, y]


def test_topology_labels_of_different_depths_stay_contiguous_with_their_prefix():
    n = _nodes("n1", "n2", "n3", "n4")
    labels = {n[0]: "zone-b", n[1]: "zone-a/rack-1", n[2]: "zone-a", n[3]: "zone-a/rack-1/sw-1"}
    assert order_nodes(n, "topology", labels) == [n[2], n[1], n[3], n[0]]


@pytest.mark.parametrize("label", ["", "a//b", "/a", "a/", "a b", "a/b\n", "x" * 257, "zone/ä"])
def test_bad_topology_labels_are_refused(label):
    with pytest.raises(ValueError):
        check_topology(label)


def test_topology_environment_variable_is_checked_and_named():
    assert _topology_label({"TORCH_RDZV_TOPOLOGY": " zone-a/rack-07/switch-3 "}) == "zone-a/rack-07/switch-3"
    assert _topology_label({}) is None
    with pytest.raises(ValueError, match="TORCH_RDZV_TOPOLOGY is 'zone a'.*zone-a/rack-07/switch-3"):
        _topology_label({"TORCH_RDZV_TOPOLOGY": "zone a"})


# Rank assignment through the completion rule, over sequences of rounds.


def _settings(min_nodes=1, max_nodes=8, **kw) -> RendezvousSettings:
    kw.setdefault("last_call_timeout", 1)
    return RendezvousSettings("ranks-run", min_nodes, max_nodes, **kw)


def _round(state: RendezvousState, nodes, settings, labels=None) -> dict[NodeDesc, int]:
    """Let ``nodes`` join ``state``'s open round, complete it, and return the ranks."""
    for node in nodes:
        fold(state, MembershipChange("join", node, topology=(labels or {}).get(node)), settings)
    settle(state, settings, WALL)
    settle(state, settings, WALL + settings.last_call_timeout + 1)
    assert state.complete
    # Through the wire format, as every write stores it.
    state.__dict__.update(decode_state(encode_state(state)).__dict__)
    return dict(state.participants)


def _end_round(state: RendezvousState, leaving) -> None:
    for node in leaving:
        state.remove_node(node)


def test_stable_ranks_over_deaths_newcomers_and_shrinking():
    s = _settings()
    a, b, c, d, e, f = _nodes("n1", "n2", "n3", "n4", "n5", "n6")
    state = RendezvousState()
    assert _round(state, [d, b, a, c], s) == {a: 0, b: 1, c: 2, d: 3}

    # b dies; e replaces it: survivors keep their ranks, e takes the free rank 1.
    _end_round(state, [b, a, c, d])
    assert _round(state, [a, c, d, e], s) == {a: 0, e: 1, c: 2, d: 3}

    # a and c die, nobody replaces them: d's rank 3 is not below 2, so d is displaced to a free rank.
    _end_round(state, [a, c, d, e])
    assert _round(state, [d, e], s) == {e: 1, d: 0}

    # Growing again: survivors keep 0 and 1, newcomers fill 2 and 3 in natural order.
    _end_round(state, [d, e])
    assert _round(state, [f, b, e, d], s) == {d: 0, e: 1, b: 2, f: 3}

    # A node that sat out one round is a newcomer in the next (only the last group counts).
    _end_round(state, [b, d, e, f])
    assert _round(state, [b, d, e], s) == {d: 0, e: 1, b: 2}
    _end_round(state, [b, d, e])
    assert _round(state, [a, b, d, e], s) == {d: 0, e: 1, b: 2, a: 3}


def test_without_stable_ranks_every_round_ranks_afresh():
    s = _settings(stable_ranks=False)
    a, b, c, d = _nodes("n1", "n2", "n3", "n4")
    state = RendezvousState()
    assert _round(state, [b, c, d], s) == {b: 0, c: 1, d: 2}
    _end_round(state, [b, c, d])
    assert _round(state, [a, c, d], s) == {a: 0, c: 1, d: 2}


def test_stable_ranks_with_topology_fill_free_ranks_in_topology_order():
    s = _settings(rank_order="topology")
    a, b, c, d, e = _nodes("n1", "n2", "n3", "n4", "n5")
    labels = {a: "z2/r1", b: "z1/r1", c: "z1/r2", d: "z2/r1", e: "z1/r1"}
    state = RendezvousState()
    assert _round(state, [a, b, c, d], s, labels) == {b: 0, c: 1, a: 2, d: 3}
    assert state.topology == {n: labels[n] for n in [a, b, c, d]}
    _end_round(state, [a, b, c, d])
    # b and c die; e (z1/r1) and a newcomer without a label take ranks 0 and 1 in topology order.
    f = NodeDesc("n0", 1, 0)
    assert _round(state, [f, a, d, e], s, labels) == {a: 2, d: 3, e: 0, f: 1}


def test_previous_ranks_survive_the_round_change_in_the_state():
    s = _settings()
    a, b = _nodes("n1", "n2")
    state = RendezvousState()
    _round(state, [a, b], s)
    _end_round(state, [a, b])
    assert state.round == 1 and not state.complete
    assert decode_state(encode_state(state)).previous_ranks == {a: 0, b: 1}


# Whole node units.


@pytest.mark.parametrize(
    "min_nodes, max_nodes, unit, joined, world",
    [
        (2, 8, 2, 5, 4),
        (2, 8, 2, 9, 8),
        (4, 8, 4, 7, 4),
        (4, 8, 4, 12, 8),
        (3, 10, 3, 10, 9),
        (1, 1, 1, 3, 1),
        (2, 7, 3, 7, 6),  # max_world is 6
        (6, 6, 2, 6, 6),
    ],
)
def test_a_round_completes_with_whole_units_and_extras_wait(min_nodes, max_nodes, unit, joined, world):
    s = _settings(min_nodes, max_nodes, node_unit=unit)
    nodes = _nodes(*(f"n{i}" for i in range(joined)))
    state = RendezvousState()
    for node in nodes:
        fold(state, MembershipChange("join", node), s)
    settle(state, s, WALL)
    settle(state, s, WALL + 2)
    assert state.complete and state.world_size == world
    assert sorted(state.participants.values()) == list(range(world))
    # Joins beyond the largest group are redundant, as if the round had completed when it filled;
    # participants left over by the unit rounding wait for the next round.
    assert state.redundancy_list == set(nodes[s.max_world :])
    assert state.wait_list == set(nodes[: s.max_world]) - set(state.participants)
    # Extras are the last in rank order.
    assert set(state.participants) == set(nodes[:world])


def test_a_round_waits_for_a_whole_unit():
    s = _settings(4, 8, node_unit=4)
    state = RendezvousState()
    for node in _nodes("n1", "n2", "n3"):
        fold(state, MembershipChange("join", node), s)
    settle(state, s, WALL)
    assert state.deadline is None and not state.complete
    fold(state, MembershipChange("join", NodeDesc("n4", 1, 0)), s)
    settle(state, s, WALL)
    assert state.deadline == WALL + 1 and not state.complete
    settle(state, s, WALL + 2)
    assert state.complete and state.world_size == 4


def test_a_full_unit_completes_at_once_at_max_world():
    s = _settings(2, 7, node_unit=3)
    state = RendezvousState()
    for node in _nodes(*(f"n{i}" for i in range(6))):
        fold(state, MembershipChange("join", node), s)
    settle(state, s, WALL)
    assert state.complete and state.world_size == 6


def test_num_nodes_waiting_counts_whole_units_only():
    s = _settings(2, 8, node_unit=2)
    state = RendezvousState()
    nodes = _nodes(*(f"n{i}" for i in range(5)))
    for node in nodes:
        fold(state, MembershipChange("join", node), s)
    settle(state, s, WALL + 2)
    settle(state, s, WALL + 4)
    assert state.world_size == 4 and len(state.wait_list) == 1
    assert nodes_waiting(state, s) == 0  # one node cannot grow a group of pairs
    fold(state, MembershipChange("join", NodeDesc("n9", 1, 0)), s)
    assert len(state.wait_list) == 2 and nodes_waiting(state, s) == 2


def test_nodes_beyond_max_world_of_a_complete_group_are_redundant():
    s = _settings(2, 5, node_unit=2)
    state = RendezvousState()
    for node in _nodes("n1", "n2", "n3", "n4"):
        fold(state, MembershipChange("join", node), s)
    settle(state, s, WALL)
    assert state.complete and state.world_size == 4
    late = NodeDesc("n9", 1, 0)
    fold(state, MembershipChange("join", late), s)
    assert late in state.redundancy_list and nodes_waiting(state, s) == 0


# Configuration.


def _params(min_nodes=1, max_nodes=4, **conf) -> RendezvousParameters:
    return RendezvousParameters("memory", "localhost:0", "ranks-run", min_nodes, max_nodes, **conf)


def test_defaults_are_natural_stable_and_single_nodes():
    s = settings_from_params(_params(), environ={})
    assert (s.rank_order, s.stable_ranks, s.node_unit, s.health_check) == ("natural", True, 1, None)
    assert (s.health_check_timeout, s.health_cooldown) == (60, 60)


def test_options_are_read():
    s = settings_from_params(
        _params(2, 8, rank_order="Topology", stable_ranks="false", node_unit="2", health_cooldown="0.5"), environ={}
    )
    assert (s.rank_order, s.stable_ranks, s.node_unit, s.health_cooldown, s.max_world) == ("topology", False, 2, 0.5, 8)


@pytest.mark.parametrize(
    "conf, match",
    [
        ({"rank_order": "random"}, "'rank_order' is 'random'; it must be one of sorted, natural, topology"),
        ({"stable_ranks": "maybe"}, "'stable_ranks' is 'maybe'; it must be a boolean"),
        ({"node_unit": "0"}, "'node_unit' is '0'; it must be a positive integer"),
        ({"node_unit": "1.5"}, "'node_unit' is '1.5'; it must be a positive integer"),
        ({"health_check_timeout": "-1"}, "'health_check_timeout' is '-1'"),
        ({"health_cooldown": "x"}, "'health_cooldown' is 'x'"),
        ({"health_check": "/nonexistent/check"}, "'health_check' is '/nonexistent/check', which is not an executable"),
    ],
)
def test_bad_options_are_value_errors_naming_key_and_value(conf, match):
    with pytest.raises(ValueError, match=match):
        settings_from_params(_params(**conf), environ={})


@pytest.mark.parametrize("min_nodes, max_nodes, unit", [(3, 3, 2), (5, 7, 4), (1, 3, 4), (11, 14, 5)])
def test_node_unit_that_admits_no_world_size_is_refused_naming_the_keys(min_nodes, max_nodes, unit):
    with pytest.raises(ValueError, match=rf"min_nodes \({min_nodes}\) and max_nodes \({max_nodes}\) admit no multiple of node_unit \({unit}\)"):
        settings_from_params(_params(min_nodes, max_nodes, node_unit=str(unit)), environ={})


@pytest.mark.parametrize("min_nodes, max_nodes, unit, max_world", [(2, 3, 2, 2), (1, 7, 4, 4), (8, 8, 8, 8), (3, 9, 3, 9)])
def test_node_unit_with_admissible_sizes(min_nodes, max_nodes, unit, max_world):
    assert RendezvousSettings("r", min_nodes, max_nodes, node_unit=unit).max_world == max_world


def test_health_check_comes_from_the_environment_when_not_configured(tmp_path):
    check = tmp_path / "check.sh"
    check.write_text("#!/bin/sh\nexit 0\n")
    check.chmod(0o755)
    env = {"TORCH_RDZV_HEALTH_CHECK": str(check)}
    assert settings_from_params(_params(), environ=env).health_check == str(check)
    with pytest.raises(ValueError, match="TORCH_RDZV_HEALTH_CHECK' is '/no/such'"):
        settings_from_params(_params(), environ={"TORCH_RDZV_HEALTH_CHECK": "/no/such"})
    check.chmod(0o644)
    with pytest.raises(ValueError, match="not an executable file"):
        settings_from_params(_params(health_check=str(check)), environ={})


# The wire format.


def test_topology_travels_with_the_join_and_lives_in_the_state():
    node = NodeDesc("10.0.0.1", 7, 0)
    note = decode_announcement(encode_join(node, "zone-a/rack-07"))
    assert (note.kind, note.node, note.topology) == ("join", node, "zone-a/rack-07")
    assert decode_announcement(encode_join(node)).topology is None
    state = RendezvousState()
    fold(state, note, _settings())
    doc = json.loads(encode_state(state))
    assert doc["version"] == 3 and doc["participants"][0]["topology"] == "zone-a/rack-07"
    assert decode_state(encode_state(state)).topology == {node: "zone-a/rack-07"}


def test_a_label_of_a_node_that_left_is_not_written():
    node = NodeDesc("10.0.0.1", 7, 0)
    state = RendezvousState()
    fold(state, MembershipChange("join", node, topology="z1"), _settings())
    state.remove_node(node)
    assert "z1" not in encode_state(state).decode()


def test_a_version_1_state_reads_without_labels_or_previous_ranks():
    doc = {
        "format": "torch-rdzv-state", "version": 1, "round": 2, "complete": True, "closed": False,
        "deadline": None, "cursor": 4, "world_size": 1,
        "participants": [{"addr": "a", "pid": 1, "local_id": 0, "rank": 0}], "wait_list": [], "redundancy_list": [],
    }
    state = decode_state(json.dumps(doc).encode())
    assert state.round == 2 and state.topology == {} and state.previous_ranks == {}


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda d: d.pop("previous_ranks"), "'previous_ranks' is missing"),
        (lambda d: d["participants"][0].update(topology="a//b"), "topology label"),
        (lambda d: d["participants"][0].update(topology=7), "'topology' has int"),
        (lambda d: d.update(previous_ranks=[{"addr": "a", "pid": 1, "local_id": 0, "rank": 0},
                                            {"addr": "b", "pid": 1, "local_id": 0, "rank": 0}]), "previous ranks"),
    ],
)
def test_bad_version_2_fields_are_refused(change, problem):
    state = RendezvousState(participants={NodeDesc("a", 1, 0): 0})
    doc = json.loads(encode_state(state))
    change(doc)
    with pytest.raises(RendezvousStateError, match=problem):
        decode_state(json.dumps(doc).encode(), where="test")


def test_num_nodes_waiting_counts_against_the_live_group_not_the_world_size_it_formed():
    # A group of 2 (min = max = 2) lost a member; the spare that waited for a free place is now on
    # the wait list. torchrun's monitor restarts the survivor only if this is above 0.
    s = _settings(2, 2)
    state = RendezvousState()
    a, b, spare = _nodes("a", "b", "spare")
    for node in (a, b):
        fold(state, MembershipChange("join", node), s)
    settle(state, s, WALL)
    fold(state, MembershipChange("join", spare), s)
    assert spare in state.redundancy_list and nodes_waiting(state, s) == 0
    state.remove_node(b)  # b's liveness lapsed
    state.redundancy_list.discard(spare)
    fold(state, MembershipChange("join", spare), s)
    assert state.world_size == 2 and spare in state.wait_list
    assert nodes_waiting(state, s) == 1


def test_num_nodes_waiting_after_a_loss_then_a_newcomer_below_max():
    s = _settings(2, 3)
    state = RendezvousState()
    a, b, c, late = _nodes("a", "b", "c", "late")
    for node in (a, b, c):
        fold(state, MembershipChange("join", node), s)
    settle(state, s, WALL)
    assert state.world_size == 3
    state.remove_node(c)
    assert nodes_waiting(state, s) == 0  # nobody to add: the survivors train on
    fold(state, MembershipChange("join", late), s)
    assert late in state.wait_list and nodes_waiting(state, s) == 1


def test_num_nodes_waiting_fills_lost_units_only_with_whole_units():
    s = _settings(2, 4, node_unit=2)
    state = RendezvousState()
    nodes = _nodes("n1", "n2", "n3", "n4")
    for node in nodes:
        fold(state, MembershipChange("join", node), s)
    settle(state, s, WALL)
    state.remove_node(nodes[3])  # 3 live members of a group of 4
    assert nodes_waiting(state, s) == 0  # a restart would form a group of 2
    fold(state, MembershipChange("join", NodeDesc("n9", 1, 0)), s)
    assert nodes_waiting(state, s) == 1  # 3 + 1: a whole group of 4 again
