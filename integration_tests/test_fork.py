"""Process-wide state of the etcd backend across fork, abandonment and server loss (issue 16).

torch's own elastic-agent tests leave handlers without ``shutdown()`` and then fork agents from
the same process. These tests check the behaviour those patterns need, black-box: a forked child
must be able to rendezvous on its own, an abandoned handler must stop its background threads, and
a server that went away must not flood the log. Every process that may crash (gRPC aborts a child
forked while its threads are busy) runs below a subprocess, so a crash cannot take pytest down.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters

from integration_tests.agents import etcd_agent_group
from rdzv_common import create_handler
from etcd_rdzv.factory import create_backend

# Short enough that a lost node or a lapsed lease shows within a test; long enough for 2 cores.
FAST = {"keep_alive_interval": 1, "keep_alive_max_attempt": 3, "last_call_timeout": 1, "join_timeout": 60}

# Whether a child forked amid gRPC activity aborts is a race (about one fork in 20 aborted on the
# code of issue 16), so the parent forks this many children in turn, each into a run of its own.
FORK_ROUNDS = 20

# A node that joins runs ``<argv[2]>-<i>`` (min = max = 2) one after the other and reports its
# rank in each; ``argv`` are endpoint, run id, key prefix, role, the other node's role. Both nodes
# publish a key in the round's store and wait for the other's before shutting down, so neither
# closes the run while the other still reads it.
NODE = textwrap.dedent(
    """
    import json, os, sys
    from datetime import timedelta
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from rdzv_common import create_handler
    from etcd_rdzv.factory import create_backend

    FAST = {fast}
    ROUNDS = {rounds}

    def rendezvous(endpoint, run_id, key_prefix, role, other):
        params = RendezvousParameters(
            "etcd_rdzv", endpoint, run_id, 2, 2, local_addr="127.0.0.1", key_prefix=key_prefix,
            read_timeout=10, **FAST,
        )
        backend, store = create_backend(params, name="etcd_rdzv")
        handler = create_handler(store, backend, params)
        info = handler.next_rendezvous()
        print(json.dumps({{"role": role, "rank": info.rank, "world_size": info.world_size}}), flush=True)
        info.store.set(f"done/{{role}}", b"1")
        info.store.wait([f"done/{{other}}"], timedelta(seconds=30))
        handler.shutdown()

    if __name__ == "__main__":
        endpoint, run_id, key_prefix, role, other = sys.argv[1:6]
        for attempt in range(ROUNDS):
            rendezvous(endpoint, f"{{run_id}}-{{attempt}}", key_prefix, role, other)
    """
).format(fast=FAST, rounds=FORK_ROUNDS)

# A process with a live handler (one finished rendezvous, no shutdown) that forks children, one
# after another; child ``i`` joins run ``<argv[2]>-<i>`` with ``NODE``'s ``rendezvous``. Prints each
# child's exit code.
FORKING_PARENT = textwrap.dedent(
    """
    import json, multiprocessing, sys
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from rdzv_common import create_handler
    from etcd_rdzv.factory import create_backend
    from node import FAST, ROUNDS, rendezvous

    endpoint, run_id, key_prefix = sys.argv[1:4]
    params = RendezvousParameters(
        "etcd_rdzv", endpoint, run_id + "-parent", 1, 1, local_addr="127.0.0.1",
        key_prefix=key_prefix, read_timeout=10, **FAST,
    )
    backend, store = create_backend(params, name="etcd_rdzv")
    handler = create_handler(store, backend, params)
    handler.next_rendezvous()  # the parent's state is live from here on; it never shuts down
    for attempt in range(ROUNDS):
        child = multiprocessing.get_context("fork").Process(
            target=rendezvous, args=(endpoint, f"{run_id}-{attempt}", key_prefix, "child", "third")
        )
        child.start()
        child.join(60)
        print(json.dumps({"child_exit": child.exitcode}), flush=True)
        if child.exitcode != 0:
            break  # the third node waits for this child in vain from here on
    """
)


def _results(output: str) -> list[dict]:
    found = []
    for line in output.splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in found if isinstance(r, dict)]


def test_child_forked_from_a_process_with_a_live_handler_forms_a_rendezvous(etcd_run, scratch_dir):
    (scratch_dir / "node.py").write_text(NODE)
    (scratch_dir / "parent.py").write_text(FORKING_PARENT)
    cwd = str(scratch_dir)  # the parent imports node.py from here
    args = [etcd_run.endpoint, etcd_run.run_id, etcd_run.key_prefix]
    parent = subprocess.Popen(
        [sys.executable, "parent.py", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    third = subprocess.Popen(
        [sys.executable, "node.py", *args, "third", "child"],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        parent_out, parent_err = parent.communicate(timeout=180)
        try:
            third_out, third_err = third.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            # Left waiting for a child that died; its output still tells what happened.
            third.kill()
            third_out, third_err = third.communicate()
    finally:
        for proc in (parent, third):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    parent_results, third_results = _results(parent_out), _results(third_out)
    detail = f"parent stderr:\n{parent_err[-4000:]}\nthird stderr:\n{third_err[-4000:]}"
    # Each child ran its rendezvous to the end and exited normally (a gRPC abort shows as -6).
    assert [r for r in parent_results if "child_exit" in r] == [{"child_exit": 0}] * FORK_ROUNDS, detail
    assert parent.returncode == 0, detail
    assert third.returncode == 0, detail
    children = [r for r in parent_results if r.get("role") == "child"]
    assert len(children) == len(third_results) == FORK_ROUNDS, detail
    for child, other in zip(children, third_results):
        assert child["world_size"] == other["world_size"] == 2, detail
        assert {child["rank"], other["rank"]} == {0, 1}, detail


@pytest.fixture
def fork_job(tmp_path, etcd_endpoints):
    with etcd_agent_group(
        tmp_path,
        etcd_endpoints[0],
        f"fork-{uuid.uuid4().hex[:8]}",
        nnodes="2",
        conf={"join_timeout": "90", "last_call_timeout": "2", "read_timeout": "20"},
        nproc_per_node=2,
        start_method="fork",
    ) as group:
        yield group


def test_torchrun_fork_start_method_two_workers_per_agent(fork_job):
    fork_job.start()
    fork_job.start()
    assert fork_job.wait(timeout=150) == [0, 0], fork_job.logs()
    results = fork_job.results()
    assert sorted(r["rank"] for r in results) == [0, 1, 2, 3], fork_job.logs()
    assert {r["world_size"] for r in results} == {4}
    assert {r["sum"] for r in results} == {10.0}


# Builds a handler, completes a rendezvous, drops it without shutdown and reports which threads
# that appeared meanwhile are still running after ``argv[4]`` seconds. gRPC's own threads are left
# out: they belong to its channels and polling engine, not to this package.
ABANDON = textwrap.dedent(
    """
    import gc, json, sys, threading, time
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from rdzv_common import create_handler
    from etcd_rdzv.factory import create_backend

    def grpc_owned(thread):
        target = getattr(thread, "_target", None)
        module = getattr(target, "__module__", None) or type(thread).__module__
        return module.startswith("grpc") or "grpc" in thread.name.lower()

    endpoint, run_id, key_prefix, grace = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    before = set(threading.enumerate())
    params = RendezvousParameters(
        "etcd_rdzv", endpoint, run_id, 1, 1, local_addr="127.0.0.1", key_prefix=key_prefix,
        read_timeout=10, keep_alive_interval=1, keep_alive_max_attempt=3,
    )
    backend, store = create_backend(params, name="etcd_rdzv")
    handler = create_handler(store, backend, params)
    info = handler.next_rendezvous()
    time.sleep(1.5)  # at least one heartbeat and lease renewal on the way
    started = sorted(t.name for t in set(threading.enumerate()) - before if not grpc_owned(t))
    del handler, backend, store, info
    gc.collect()
    deadline = time.monotonic() + grace
    while True:
        left = sorted(
            t.name for t in set(threading.enumerate()) - before if t.is_alive() and not grpc_owned(t)
        )
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    print(json.dumps({"started": started, "left": left}), flush=True)
    """
)


def test_abandoned_handler_stops_its_background_threads(etcd_run):
    done = subprocess.run(
        [sys.executable, "-c", ABANDON, etcd_run.endpoint, etcd_run.run_id, etcd_run.key_prefix, "5"],
        capture_output=True, text=True, timeout=90,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = _results(done.stdout)[-1]
    # The handler did start threads of its own (heartbeats at least), so the check below can fail.
    assert report["started"], report
    assert report["left"] == [], report


OUR_LOGGERS = ("etcd_rdzv", "rdzv_common")


def test_etcd_outage_is_logged_once_per_change_not_per_attempt(etcd_server, caplog):
    server = etcd_server()
    params = RendezvousParameters(
        "etcd_rdzv", server.endpoint, f"outage-{uuid.uuid4().hex[:8]}", 1, 1, local_addr="127.0.0.1",
        read_timeout=2, keep_alive_interval=1, keep_alive_max_attempt=3, heartbeat_timeout=1,
        close_timeout=2,
    )
    backend, store = create_backend(params, name="etcd_rdzv")
    handler = create_handler(store, backend, params)
    try:
        handler.next_rendezvous()
        time.sleep(1.5)  # heartbeats and renewals run against the live server first
        for name in OUR_LOGGERS:
            caplog.set_level(logging.WARNING, logger=name)
        caplog.clear()
        server.stop()
        time.sleep(8)
        ours = [
            r for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.split(".")[0] in OUR_LOGGERS
        ]
        lines = "\n".join(f"{r.name}: {r.getMessage()}" for r in ours)
        # Renewals fall due every second; the outage is one change of state and is said once
        # (or twice: heartbeat and session alike), not once per failed attempt.
        assert 1 <= len(ours) <= 2, f"{len(ours)} warnings in 8 s:\n{lines}"
    finally:
        handler.shutdown()


# A process that hosts TCPStore servers (the trainers' store of rank 0, the c10d rendezvous store)
# forks a child; the child starts threads of its own, then drops every reference to what it
# inherited and collects garbage, as it does when only a parent's thread kept a never-shut-down
# handler alive. Prints "clean" if the child exited normally.
HOSTED_SERVER_CHILD = textwrap.dedent(
    """
    import gc, os, sys, threading, time
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from c10d_rdzv.factory import create_backend
    from rdzv_common.bootstrap import TrainerStoreHost

    host = TrainerStoreHost("127.0.0.1")
    host.publish(0, dist.HashStore(), lambda: True)
    params = RendezvousParameters("c10d_rdzv", f"127.0.0.1:{sys.argv[1]}", "hosted", 1, 1, is_host=True)
    backend, store = create_backend(params)
    pid = os.fork()
    if pid == 0:
        # Threads the child starts reuse what glibc kept of the parent's threads, the server's
        # among them: destroying the server then joins one of these (a hang) or fails (an abort).
        for _ in range(8):
            threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
        del host, backend, store
        gc.collect()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print("clean" if os.waitstatus_to_exitcode(status) == 0 else f"child status {status}")
    """
)


def test_child_never_destroys_the_tcpstore_servers_it_inherited():
    # Destroying a hosting TCPStore joins its server thread, which a forked child does not have:
    # the child would hang for ever (as torch's agent tests did, forking agents from a process
    # whose earlier handler was never shut down).
    from integration_tests.etcd_fixture import free_port

    try:
        result = subprocess.run(
            [sys.executable, "-c", HOSTED_SERVER_CHILD, str(free_port())],
            capture_output=True, text=True, timeout=60,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the forked child hung destroying an inherited TCPStore server: {exc}")
    assert result.stdout.strip() == "clean", result.stderr[-3000:]
