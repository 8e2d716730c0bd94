"""etcd in containers: the leader of a 3-member cluster paused (frozen, its connections open and
silent, as a hung machine) mid-rendezvous. Needs a Docker engine; skipped without one."""

from __future__ import annotations

import pytest

from integration_tests.faultrun import STEP, Run, assert_group, ordered_endpoint, wait_for_participants

pytestmark = pytest.mark.timeout(180)


def test_cluster_leader_paused_mid_rendezvous_the_round_still_completes(etcd_container_cluster):
    cluster = etcd_container_cluster
    leader = cluster.leader()
    # A request to a frozen member hangs rather than fails: the handlers must give up on it
    # (their per-request timeout) and fail over within one read_timeout.
    run = Run(ordered_endpoint(leader, cluster.members), 3, 3, read_timeout=10)
    try:
        handlers = [run.handler() for _ in range(3)]
        with run.checker() as checker:
            early = run.next(handlers[:2])
            wait_for_participants(checker, 2)
            leader.pause()
            try:
                late = run.next(handlers[2:])
                infos = [f.result(timeout=STEP + run.read_timeout) for f in early + late]
                round_ = assert_group(infos, checker, handlers, run)
                assert cluster.leader() is not leader
            finally:
                leader.unpause()
            # Thawed, the old leader rejoins as a follower, and the run goes on.
            infos = [f.result(timeout=STEP) for f in run.next(handlers)]
            assert assert_group(infos, checker, handlers, run) > round_
    finally:
        run.close()
