"""``EtcdStore`` against a real etcd, directly and wrapped in torch's ``PrefixStore``."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch.distributed as dist

from etcd_rdzv.config import EtcdConfig, parse_endpoints
from etcd_rdzv import run as runs
from etcd_rdzv.store import EtcdStore

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def store(etcd_run):
    config = EtcdConfig(endpoints=parse_endpoints(etcd_run.endpoint), key_prefix=etcd_run.key_prefix, read_timeout=10)
    run = runs.acquire(config, etcd_run.run_id)
    yield EtcdStore(run, timeout=timedelta(seconds=10))
    runs.release(run)


def test_set_get_and_value_types(store):
    store.set("text", "value")
    store.set("raw", b"\x00\xffbytes")
    assert store.get("text") == b"value"
    assert store.get("raw") == b"\x00\xffbytes"
    store.set("text", "changed")
    assert store.get("text") == b"changed"


def test_blocking_get_times_out_with_a_store_error(store):
    store.set_timeout(timedelta(seconds=0.5))
    started = time.monotonic()
    with pytest.raises(dist.DistStoreError, match="missing-key"):
        store.get("missing-key")
    assert 0.4 < time.monotonic() - started < 3


def test_blocking_get_is_woken_by_a_later_set(store):
    threading.Timer(0.3, lambda: store.set("late", "here")).start()
    started = time.monotonic()
    assert store.get("late") == b"here"
    assert time.monotonic() - started < 3


def test_add_is_atomic_across_threads(store):
    assert store.add("counter", 5) == 5
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: store.add("counter", 1), range(40)))
    assert sorted(results) == list(range(6, 46))
    assert store.get("counter") == b"45"
    assert store.add("counter", -45) == 0


def test_add_on_a_value_set_as_text(store):
    store.set("n", "41")
    assert store.add("n", 1) == 42


def test_compare_set_follows_tcpstore_semantics(store):
    # Absent key, non-empty expectation: nothing is set, the expectation comes back.
    assert store.compare_set("k", "old", "new") == b"old"
    assert not store.check(["k"])
    # Absent key, empty expectation: set.
    assert store.compare_set("k", "", "first") == b"first"
    # Match: swapped.
    assert store.compare_set("k", "first", "second") == b"second"
    # Mismatch: the current value comes back, unchanged.
    assert store.compare_set("k", "wrong", "third") == b"second"
    assert store.get("k") == b"second"


def test_wait_and_check(store):
    assert store.check([]) is True
    assert store.check(["a"]) is False
    threading.Timer(0.2, lambda: store.set("a", "1")).start()
    threading.Timer(0.4, lambda: store.set("b", "2")).start()
    store.wait(["a", "b"])
    assert store.check(["a", "b"])
    with pytest.raises(dist.DistStoreError):
        store.wait(["a", "never"], timedelta(seconds=0.3))


def test_a_wait_the_view_can_answer_reads_no_values(store, monkeypatch):
    """A wait needs no values: a rank waiting for rank 0's trainers' store address waits, then
    reads it, and the wait's own read of the values made a join cost each node a fifth request."""
    store.set("addr", "10.0.0.1")
    reads = []
    read = store._read
    monkeypatch.setattr(store, "_read", lambda keys: reads.append(keys) or read(keys))
    store.wait(["addr"], timedelta(seconds=5))
    assert reads == []
    assert store.multi_get(["addr"]) == [b"10.0.0.1"] and reads == [["addr"]]


def test_delete_and_num_keys(store):
    assert store.num_keys() == 0
    store.set("x", "1")
    store.set("y", "2")
    assert store.num_keys() == 2
    assert store.delete_key("x") is True
    assert store.delete_key("x") is False
    assert store.num_keys() == 1


def test_multi_get_and_multi_set(store):
    keys = [f"k{i}" for i in range(200)]  # more than one transaction's worth
    store.multi_set(keys, [f"v{i}" for i in range(200)])
    assert store.multi_get(keys) == [f"v{i}".encode() for i in range(200)]
    with pytest.raises(ValueError):
        store.multi_set(["a"], [])


def test_append(store):
    store.append("log", "a")
    store.append("log", b"b")
    assert store.get("log") == b"ab"


def test_prefix_store_wrapping(store):
    wrapped = dist.PrefixStore("round/1", store)
    wrapped.set("MASTER_ADDR", "127.0.0.1")
    assert wrapped.get("MASTER_ADDR") == b"127.0.0.1"
    assert store.get("round/1/MASTER_ADDR") == b"127.0.0.1"
    assert wrapped.add("members", 2) == 2
    assert wrapped.compare_set("c", "", "x") == b"x"
    wrapped.multi_set(["r0", "r1"], ["a", "b"])
    assert wrapped.multi_get(["r0", "r1"]) == [b"a", b"b"]
    wrapped.wait(["r0", "r1"])
    wrapped.wait(["r0"], timedelta(seconds=1))
    assert wrapped.check(["r0", "members"])
    assert wrapped.delete_key("r0")
    assert wrapped.num_keys() == 4
    wrapped.set_timeout(timedelta(seconds=0.3))
    with pytest.raises(dist.DistStoreError):
        wrapped.get("absent")


def test_store_timeout_property(store):
    assert store.timeout == timedelta(seconds=10)
    store.set_timeout(timedelta(seconds=3))
    assert store.timeout == timedelta(seconds=3)


def test_an_add_retried_across_an_outage_longer_than_the_session_lease_applies_once(etcd_server):
    """Its receipt lived on the process's session lease (10 s): the response of the add was lost,
    then the client was cut off for 12 s, the session lease lapsed and took the receipt along, and
    the retry applied the add again (3 where 2 is right). Exactly once must hold for every retry
    within read_timeout."""
    from benchmarks.invariants import etcd_client
    from integration_tests.tools import wait_until
    from integration_tests.nemesis import Proxy

    server = etcd_server()
    admin = etcd_client(server.endpoint)
    with Proxy.to(server.endpoint) as proxy:
        config = EtcdConfig(endpoints=parse_endpoints(proxy.endpoint), key_prefix="/rdzv-receipt", read_timeout=40)
        run = runs.acquire(config, "receipt")
        try:
            store = EtcdStore(run, timeout=timedelta(seconds=40))
            assert store.add("count", 1) == 1  # connected; the session and the run's lease granted
            # The add's first transaction guesses the key absent and fails; its second commits.
            proxy.drop_responses_after(1, then_blackhole=True)
            with ThreadPoolExecutor(1) as pool:
                adding = pool.submit(store.add, "count", 1)
                wait_until(lambda: proxy.faults["drop_response"] == 1, 10, 0.05, "the add's lost response")
                assert int(admin.get(store.prefix + "count")[0]) == 2  # it did apply
                time.sleep(12)  # longer than the session lease's TTL
                proxy.heal()
                assert adding.result(timeout=40) == 2
            assert int(admin.get(store.prefix + "count")[0]) == 2
        finally:
            runs.release(run)
            admin.close()
