"""The state codec: round trips, deterministic bytes, and every way a stored value is refused."""

from __future__ import annotations

import json
import math
import os
import random
import re

import pytest
from torch.distributed.elastic.rendezvous import RendezvousStateError

from rdzv_common import codec
from rdzv_common.codec import MAX_STATE_BYTES, decode_state, encode_join, encode_state
from rdzv_common.state import NodeDesc, RendezvousState

WHERE = "the unit-test backend, run 'codec-run'"

A = NodeDesc("10.0.0.1", 41, 0)
B = NodeDesc("10.0.0.2", 7, 1)
C = NodeDesc("10.0.0.3", 99, 0)
D = NodeDesc("host-d", 5, 3)
E = NodeDesc("host-e", 6, 0)


def _decode_record(data, where="the mailbox"):
    """The node a mailbox record names."""
    return codec.decode_announcement(data, where).node


def _complete_state(**kw) -> RendezvousState:
    """A complete state; the world size (where this release stores one) is the group's size."""
    world_size = kw.pop("world_size", None)
    state = RendezvousState(complete=True, **kw)
    state.world_size = len(state.participants) if world_size is None else world_size
    return state


def _full_state() -> RendezvousState:
    return _complete_state(
        round=3,
        deadline=None,
        closed=False,
        participants={A: 1, B: 0, C: 2},
        wait_list={D},
        redundancy_list={E},
        cursor=17,
    )


def _incomplete(doc: dict) -> dict:
    """Turn an encoded complete state into an incomplete one (ranks 0, no world size)."""
    doc["complete"] = False
    for p in doc["participants"]:
        p["rank"] = 0
    if "world_size" in doc:
        doc["world_size"] = 0
    return doc


def _doc(state: RendezvousState | None = None) -> dict:
    return json.loads(encode_state(state or _full_state()))


def _bytes(doc) -> bytes:
    return json.dumps(doc).encode()


def _assert_refused(data, problem: str, where: str = WHERE, decode=decode_state):
    with pytest.raises(RendezvousStateError) as info:
        decode(data, where)
    message = str(info.value)
    assert where in message, message
    assert re.search(problem, message), f"{problem!r} not in {message!r}"
    return message


# --------------------------------------------------------------------------- round trips


def test_round_trip_of_a_complete_state():
    state = _full_state()
    back = decode_state(encode_state(state), WHERE)
    assert back == state
    assert back.participants == {A: 1, B: 0, C: 2}
    assert back.wait_list == {D} and back.redundancy_list == {E}
    assert back.cursor == 17 and back.round == 3 and back.complete is True


def test_round_trip_with_deadline_and_closed():
    state = RendezvousState(
        round=0,
        complete=False,
        deadline=1_700_000_000.125,
        closed=True,
        participants={A: 0, B: 0},
        wait_list=set(),
        redundancy_list={C, D},
        cursor=0,
    )
    back = decode_state(encode_state(state), WHERE)
    assert back == state
    assert back.deadline == pytest.approx(1_700_000_000.125)
    assert isinstance(back.deadline, float)
    assert back.closed is True


def test_stop_now_is_written_only_when_set_and_must_be_a_flag():
    closed = RendezvousState(round=1, closed=True)
    assert "stop_now" not in json.loads(encode_state(closed))  # what earlier releases wrote, unchanged
    assert decode_state(encode_state(closed), WHERE).stop_now is False
    stopping = RendezvousState(round=1, closed=True, stop_now=True)
    assert json.loads(encode_state(stopping))["stop_now"] is True
    assert decode_state(encode_state(stopping), WHERE) == stopping
    doc = json.loads(encode_state(stopping))
    doc["stop_now"] = 1
    with pytest.raises(RendezvousStateError, match="stop_now"):
        decode_state(_bytes(doc), WHERE)


def test_integer_deadline_decodes_as_float():
    doc = _incomplete(_doc())
    doc["deadline"] = 1700000000
    state = decode_state(_bytes(doc), WHERE)
    assert state.deadline == 1700000000.0 and isinstance(state.deadline, float)


def test_round_trip_of_the_empty_state():
    assert decode_state(encode_state(RendezvousState()), WHERE) == RendezvousState()


def test_completed_round_that_lost_participants_still_decodes():
    # A participant leaving a complete round leaves a gap in the ranks; that state is legal.
    state = _complete_state(round=2, participants={B: 1, C: 2}, world_size=3)
    assert decode_state(encode_state(state), WHERE) == state


def test_encoding_is_deterministic_and_order_independent():
    s1 = _full_state()
    s2 = _complete_state(
        round=3,
        participants={C: 2, A: 1, B: 0},  # other insertion order
        wait_list={D},
        redundancy_list={E},
        cursor=17,
    )
    assert encode_state(s1) == encode_state(s2)
    assert encode_state(s1) == encode_state(decode_state(encode_state(s1), WHERE))
    s3 = RendezvousState(wait_list={A, B, C, D, E})
    s4 = RendezvousState(wait_list={E, D, C, B, A})
    assert encode_state(s3) == encode_state(s4)


def test_encoding_is_versioned_json():
    doc = json.loads(encode_state(_full_state()).decode("utf-8"))
    assert doc["format"] == codec.FORMAT
    assert doc["version"] == codec.VERSION
    assert [p["rank"] for p in doc["participants"]] == [1, 0, 2]  # sorted by node, not rank
    assert doc["wait_list"] == [{"addr": D.addr, "pid": D.pid, "local_id": D.local_id}]


def test_join_announcement_round_trip():
    assert _decode_record(encode_join(D)) == D


# --------------------------------------------------------------------------- rejections


@pytest.mark.parametrize(
    "data",
    # Fixed bytes (random.Random(7)): every test process must collect the same parameters.
    [b"", b"\x00\x01\x02\xff\xfe", random.Random(7).randbytes(64) + b"\xff", b"{not json", b"\x80abc"],
)
def test_random_bytes_are_refused(data):
    _assert_refused(data, "not UTF-8 JSON")


def test_non_utf8_is_refused():
    good = encode_state(_full_state())
    _assert_refused(good.replace(b"10.0.0.1", b"10.0.0.\xff"), "not UTF-8 JSON")
    _assert_refused("{}".encode("utf-16"), "not UTF-8 JSON")


def test_non_bytes_value_is_refused():
    _assert_refused(encode_state(_full_state()).decode(), "not bytes")


@pytest.mark.parametrize("doc", [[], [1, 2], "state", 3, None, True])
def test_non_object_json_is_refused(doc):
    _assert_refused(_bytes(doc), "not an object")


@pytest.mark.parametrize("fmt", ["torch-rdzv-state-v2", "", None, 1])
def test_wrong_format_is_refused(fmt):
    doc = _doc()
    doc["format"] = fmt
    _assert_refused(_bytes(doc), "format is")


def test_missing_format_is_refused():
    doc = _doc()
    del doc["format"]
    _assert_refused(_bytes(doc), "format is None")


@pytest.mark.parametrize("version", [0, 4, 99, "1", None, 1.5, True])
def test_unknown_version_is_refused(version):
    doc = _doc()
    doc["version"] = version
    msg = _assert_refused(_bytes(doc), "version")
    assert "not supported" in msg


@pytest.mark.parametrize("version", [True, 1.0])
def test_version_must_be_the_integer_one(version):
    # True == 1.0 == 1 in Python; neither a bool nor a float may pass for the version number.
    doc = _doc()
    doc["version"] = version
    _assert_refused(_bytes(doc), "version")


@pytest.mark.parametrize(
    "name", ["round", "complete", "closed", "cursor", "participants", "wait_list", "redundancy_list"]
)
def test_missing_field_is_refused(name):
    doc = _doc()
    del doc[name]
    _assert_refused(_bytes(doc), f"field '{name}' is missing")


@pytest.mark.parametrize("name", ["addr", "pid", "local_id", "rank"])
def test_missing_participant_field_is_refused(name):
    doc = _doc()
    del doc["participants"][0][name]
    _assert_refused(_bytes(doc), f"field '{name}' is missing")


@pytest.mark.parametrize(
    "name, value",
    [
        ("round", True),  # bool where an int belongs
        ("round", 1.0),
        ("round", "3"),
        ("cursor", False),
        ("cursor", 2.5),
        ("complete", 1),  # int where a bool belongs
        ("complete", 0),
        ("complete", "true"),
        ("closed", 1),
        ("closed", None),
        ("deadline", True),
        ("deadline", "soon"),
        ("participants", {}),
        ("wait_list", "a,b"),
        ("redundancy_list", None),
    ],
)
def test_wrong_top_level_type_is_refused(name, value):
    doc = _doc()
    if name == "deadline":
        _incomplete(doc)
    doc[name] = value
    _assert_refused(_bytes(doc), f"field '{name}' has")


@pytest.mark.parametrize(
    "name, value",
    [("pid", True), ("pid", "41"), ("local_id", False), ("local_id", 0.0), ("addr", 5), ("rank", True), ("rank", 1.0)],
)
def test_wrong_node_field_type_is_refused(name, value):
    doc = _doc()
    doc["participants"][0][name] = value
    _assert_refused(_bytes(doc), f"field '{name}' has")


@pytest.mark.parametrize("entry", [5, "node", None, [1, 2]])
def test_node_entry_not_an_object_is_refused(entry):
    doc = _doc()
    doc["wait_list"].append(entry)
    _assert_refused(_bytes(doc), "not an object")


@pytest.mark.parametrize("change", [{"addr": ""}, {"pid": -1}, {"local_id": -2}])
def test_node_out_of_range_is_refused(change):
    doc = _doc()
    doc["redundancy_list"][0].update(change)
    _assert_refused(_bytes(doc), "out of range")


@pytest.mark.parametrize("name", ["round", "cursor"])
def test_negative_round_or_cursor_is_refused(name):
    doc = _doc()
    doc[name] = -1
    _assert_refused(_bytes(doc), "must not be negative")


@pytest.mark.parametrize("name", ["participants", "wait_list", "redundancy_list"])
def test_duplicate_node_in_a_list_is_refused(name):
    doc = _doc()
    entry = dict(doc[name][0])
    if name == "participants":
        entry["rank"] = 7
    doc[name].append(entry)
    _assert_refused(_bytes(doc), "twice")


@pytest.mark.parametrize(
    "first, second",
    [("participants", "wait_list"), ("participants", "redundancy_list"), ("wait_list", "redundancy_list")],
)
def test_node_in_two_lists_is_refused(first, second):
    # No transition ever puts one node in two lists; a state that does is not one we wrote.
    doc = _doc()
    node = {k: doc[first][0][k] for k in ("addr", "pid", "local_id")}
    doc[second].append(node)
    with pytest.raises(RendezvousStateError) as info:
        decode_state(_bytes(doc), WHERE)
    assert WHERE in str(info.value)


@pytest.mark.parametrize("ranks", [[0, 0, 1], [0, 1, 1], [-1, 0, 1], [0, 1, -5]])
def test_complete_round_with_bad_ranks_is_refused(ranks):
    doc = _doc()
    for p, r in zip(doc["participants"], ranks):
        p["rank"] = r
    _assert_refused(_bytes(doc), "rank")


def test_negative_rank_in_incomplete_round_is_refused():
    doc = _incomplete(_doc())
    doc["participants"][1]["rank"] = -1
    _assert_refused(_bytes(doc), "rank")


def test_missing_world_size_is_refused():
    doc = _doc()
    del doc["world_size"]
    _assert_refused(_bytes(doc), "field 'world_size' is missing")


@pytest.mark.parametrize("value", [True, 3.0, "3"])
def test_world_size_of_wrong_type_is_refused(value):
    doc = _doc()
    doc["world_size"] = value
    _assert_refused(_bytes(doc), "field 'world_size' has")


@pytest.mark.parametrize("world_size", [-1, 0, 2])
def test_complete_round_ranks_must_fit_the_world_size(world_size):
    doc = _doc()  # ranks 0, 1, 2
    doc["world_size"] = world_size
    _assert_refused(_bytes(doc), "negative|world_size|fit|rank")


@pytest.mark.parametrize("change", ["world_size", "rank"])
def test_incomplete_round_carries_no_ranks(change):
    doc = _incomplete(_doc())
    if change == "world_size":
        doc["world_size"] = 3
    else:
        doc["participants"][0]["rank"] = 2
    _assert_refused(_bytes(doc), "incomplete|rank")


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_non_finite_deadline_is_refused(literal):
    doc = _incomplete(_doc())
    doc["deadline"] = "__DEADLINE__"
    data = _bytes(doc).replace(b'"__DEADLINE__"', literal)
    _assert_refused(data, "not a finite time")


def test_oversized_value_is_refused_before_parsing():
    data = b" " * (MAX_STATE_BYTES + 1)
    msg = _assert_refused(data, "byte limit")
    assert str(MAX_STATE_BYTES) in msg


def test_value_at_the_size_limit_is_parsed():
    good = encode_state(_full_state())
    padded = good + b" " * (MAX_STATE_BYTES - len(good))
    assert len(padded) == MAX_STATE_BYTES
    assert decode_state(padded, WHERE) == _full_state()


def test_error_message_tells_how_to_recover():
    msg = _assert_refused(b"garbage", "corrupt")
    assert "reset" in msg.lower() or "new run id" in msg


def test_default_where_is_named():
    with pytest.raises(RendezvousStateError, match="the backend"):
        decode_state(b"[]")


# --------------------------------------------------------------------------- mailbox records

MAILBOX = "the mailbox of run 'codec-run'"


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"\xff\xfe", "not UTF-8 JSON"),
        (b"[1]", ""),
        (b'{"nope": {}}', ""),
        (b'{"join": 5}', "not an object"),
        (b'{"join": {"addr": "a", "pid": 1}}', "field 'local_id' is missing"),
        (b'{"join": {"addr": "a", "pid": true, "local_id": 0}}', "field 'pid' has"),
        (b'{"join": {"addr": "a", "pid": 1, "local_id": -1}}', "out of range"),
        (b'{"join": {"addr": "", "pid": 1, "local_id": 0}}', "out of range"),
    ],
)
def test_malformed_mailbox_record_is_refused(data, problem):
    _assert_refused(data, problem, where=MAILBOX, decode=_decode_record)


def test_oversized_mailbox_record_is_refused():
    _assert_refused(b" " * (MAX_STATE_BYTES + 1), "byte limit", where=MAILBOX, decode=_decode_record)


# --------------------------------------------------------------------------- no pickle anywhere

_PICKLE = re.compile(r"^\s*(import|from)\s+[^#\n]*\b(c?pickle|dill|cloudpickle|_pickle)\b|\bpickle\.(loads?|dumps?|Unpickler|Pickler)\b", re.M)


def test_no_pickle_in_the_installed_packages():
    import c10d_rdzv
    import etcd_rdzv
    import rdzv_common

    scanned = 0
    offenders = []
    for pkg in (rdzv_common, etcd_rdzv, c10d_rdzv):
        root = os.path.dirname(pkg.__file__)
        for dirpath, _, files in os.walk(root):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                scanned += 1
                for m in _PICKLE.finditer(text):
                    offenders.append(f"{path}: {m.group(0).strip()}")
    assert scanned >= 12  # the core alone has a dozen modules; the scan must have looked
    assert not offenders, offenders


def test_pickle_pattern_catches_what_it_should():
    # The scan above must be able to fail.
    for line in ["import pickle", "from pickle import loads", "x = pickle.loads(b)", "import cloudpickle as cp"]:
        assert _PICKLE.search(line), line
    assert not _PICKLE.search("# never pickle\nx = 1  # not pickled")
    assert math.isfinite(1.0)


# --------------------------------------------------------------------------- leave announcements

@pytest.mark.parametrize("complete", [True, False])
def test_leave_announcement_round_trip(complete):
    ann = codec.decode_announcement(codec.encode_leave(C, 4, complete), MAILBOX)
    assert ann == codec.MembershipChange("leave", C, 4, complete)
    assert ann.complete is complete
    join = codec.decode_announcement(encode_join(C), MAILBOX)
    assert join == codec.MembershipChange("join", C)
    assert (join.round, join.complete) == (None, None)


def test_leave_announcement_bytes_are_deterministic():
    assert codec.encode_leave(C, 4, True) == codec.encode_leave(C, 4, True)
    assert codec.encode_leave(C, 4, True) != codec.encode_leave(C, 4, False)
    assert json.loads(codec.encode_leave(C, 4, False)) == {
        "leave": {"addr": C.addr, "pid": C.pid, "local_id": C.local_id},
        "round": 4,
        "complete": False,
    }


@pytest.mark.parametrize(
    "doc, problem",
    [
        ({"leave": {"addr": "a", "pid": 1, "local_id": 0}, "complete": True}, "field 'round' is missing"),
        ({"leave": {"addr": "a", "pid": 1, "local_id": 0}, "round": True, "complete": True}, "field 'round' has"),
        ({"leave": {"addr": "a", "pid": 1, "local_id": 0}, "round": "2", "complete": True}, "field 'round' has"),
        ({"leave": {"addr": "a", "pid": 1}, "round": 2, "complete": True}, "field 'local_id' is missing"),
        ({"leave": "a_1_0", "round": 2, "complete": True}, "not an object"),
        ({"leave": {"addr": "a", "pid": 1, "local_id": 0}, "round": -1, "complete": True}, "round -1"),
        # A leave that does not say whether its round was complete cannot be told from a take-back.
        ({"leave": {"addr": "a", "pid": 1, "local_id": 0}, "round": 2}, "field 'complete' is missing"),
        ({"leave": {"addr": "a", "pid": 1, "local_id": 0}, "round": 2, "complete": 1}, "field 'complete' has"),
        ({"leave": {"addr": "a", "pid": 1, "local_id": 0}, "round": 2, "complete": "true"}, "field 'complete' has"),
        ({"leave": {"addr": "a", "pid": 1, "local_id": 0}, "round": 2, "complete": None}, "field 'complete' has"),
    ],
)
def test_malformed_leave_announcement_is_refused(doc, problem):
    _assert_refused(_bytes(doc), problem, where=MAILBOX, decode=codec.decode_announcement)


# --------------------------------------------------------------------------- rejoin announcements

def test_rejoin_announcement_round_trip():
    ann = codec.decode_announcement(codec.encode_rejoin(C, 4), MAILBOX)
    assert ann == codec.MembershipChange("rejoin", C, 4, True)
    labelled = codec.decode_announcement(codec.encode_rejoin(C, 4, "zone-a/rack-1"), MAILBOX)
    assert labelled == codec.MembershipChange("rejoin", C, 4, True, "zone-a/rack-1")
    assert json.loads(codec.encode_rejoin(C, 4)) == {
        "rejoin": {"addr": C.addr, "pid": C.pid, "local_id": C.local_id},
        "round": 4,
    }


@pytest.mark.parametrize(
    "doc, problem",
    [
        ({"rejoin": {"addr": "a", "pid": 1, "local_id": 0}}, "field 'round' is missing"),
        ({"rejoin": {"addr": "a", "pid": 1, "local_id": 0}, "round": True}, "field 'round' has"),
        ({"rejoin": {"addr": "a", "pid": 1, "local_id": 0}, "round": -2}, "a rejoin announcement names round -2"),
        ({"rejoin": {"addr": "a", "pid": 1}, "round": 2}, "field 'local_id' is missing"),
        ({"rejoin": {"addr": "a", "pid": 1, "local_id": 0, "topology": "a//b"}, "round": 2}, "topology"),
        # A kind this release does not know may come from a newer one: the error says what to do.
        ({"move": {"addr": "a", "pid": 1, "local_id": 0}}, "every node of a job must run the same release"),
    ],
)
def test_malformed_rejoin_announcement_is_refused(doc, problem):
    _assert_refused(_bytes(doc), problem, where=MAILBOX, decode=codec.decode_announcement)


def test_a_version_2_state_reads_as_it_was_written():
    """Version 3 stores what version 2 does (it marks a mailbox that may hold rejoins)."""
    doc = json.loads(encode_state(_full_state()))
    doc["version"] = 2
    assert decode_state(_bytes(doc)) == _full_state()
    assert json.loads(encode_state(decode_state(_bytes(doc))))["version"] == 3


def test_a_peeked_state_is_the_shared_parse_and_a_decoded_one_a_copy():
    data = encode_state(_full_state())
    assert codec.peek_state(data) is codec.peek_state(data)
    assert decode_state(data) is not codec.peek_state(data)
    assert codec.peek_state(data) == _full_state()


def test_decoded_states_are_the_callers_own():
    data = encode_state(_full_state())
    first = decode_state(data)
    first.participants.clear()
    first.wait_list.clear()
    second = decode_state(data)
    assert second == _full_state()


def test_a_state_that_many_threads_read_at_once_is_parsed_once(monkeypatch):
    """When a write lands, the hundreds of nodes of a large process read the new state at once; an
    LRU cache let each of them parse it (half of the process's CPU at N = 1024 over 4 processes)."""
    import threading
    import time

    from rdzv_common import codec

    state = RendezvousState(round=3)
    state.participants = {NodeDesc("10.0.0.%d" % i, 1, 0): 0 for i in range(50)}
    data = encode_state(state)
    parse, parses = codec._decode_state.parse, []

    def slow_parse(data, where):
        parses.append(1)
        time.sleep(0.2)  # long enough for every thread to ask while the first one parses
        return parse(data, where)

    monkeypatch.setattr(codec._decode_state, "parse", slow_parse)
    results = []
    threads = [threading.Thread(target=lambda: results.append(decode_state(data))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(parses) == 1
    assert len(results) == 8 and all(r == state for r in results)
    assert len({id(r) for r in results}) == 8  # each caller owns its copy
