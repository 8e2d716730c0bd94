"""The store that bootstraps the trainers' process group (NCCL, gloo), published once per round.

With torch's shared-store mode on, rank 0's agent hosts a ``TCPStore`` the trainers connect to.
A fresh server is started for every round and its address is published under that round's
prefix, so that (a) a node joining in a later round finds it, and (b) no trainer key (such as an
NCCL unique id) can leak from one round or restart into the next (pytorch issue #135712).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist
from torch.distributed.elastic.rendezvous import RendezvousError, RendezvousStoreInfo, RendezvousTimeoutError

from .hosting import hosted

# How often a rank waiting for rank 0 to publish the trainers' store checks that rank 0 is still
# in the group.
LEADER_CHECK_SECONDS = 1.0


def shared_store_enabled() -> bool:
    """Whether trainers use the agent-hosted store; torch's opt-out variable turns it off."""
    return os.getenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "0") != "1"


class TrainerStoreAddressError(RendezvousError):
    """Rank 0 cannot serve the trainers' store at its node's address (``local_addr``)."""


def listen_problem(addr: str) -> OSError | None:
    """Why this machine cannot listen at ``addr`` (a host name or an IP address), or ``None``.

    A ``TCPStore`` server listens on every interface whatever its host, then its own client
    connects to the host given, retrying an address that is not this machine's for the store's
    whole timeout (300 s); a bind to the address itself fails at once instead.
    """
    try:
        candidates = socket.getaddrinfo(addr, 0, type=socket.SOCK_STREAM)
    except OSError as exc:
        return exc
    problem: OSError | None = None
    for family, kind, proto, _, sockaddr in candidates:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.bind(sockaddr)
            return None
        except OSError as exc:
            problem = exc
    return problem


class TrainerStoreHost:
    """Hosts (on rank 0) and publishes (to every rank) the trainers' store for each round."""

    def __init__(self, addr: str) -> None:
        self._addr = addr
        self._server: dist.TCPStore | None = None

    @property
    def server(self) -> dist.TCPStore | None:
        """The server this node hosts for the current round, if it is rank 0."""
        return self._server

    def publish(self, rank: int, round_store: dist.Store, group_stands: Callable[[], bool]) -> RendezvousStoreInfo | None:
        """Return the round's store address; rank 0 starts a fresh server and publishes it.

        ``round_store`` must be private to the round (prefixed by run id and round), and every
        rank of the round must call this. Non-zero ranks block until rank 0 has published, asking
        ``group_stands`` every ``LEADER_CHECK_SECONDS`` whether rank 0 is still in the group;
        ``None`` once it is not (its call failed or it died before publishing: it never will, and
        waiting for the store's timeout would hold the other ranks 300 s).

        Raises:
            TrainerStoreAddressError: this node is rank 0 and cannot listen at its address.
            RendezvousTimeoutError: rank 0 stayed in the group and published nothing within the
                store's timeout; the message states the time waited.
        """
        self.stop()
        if not shared_store_enabled():
            return RendezvousStoreInfo.build(rank, round_store, local_addr=self._addr)
        keys = [RendezvousStoreInfo.MASTER_ADDR_KEY, RendezvousStoreInfo.MASTER_PORT_KEY]
        if rank == 0:
            problem = listen_problem(self._addr)
            if problem is not None:
                raise TrainerStoreAddressError(
                    f"This node is rank 0 and must serve the trainers' store at its local_addr "
                    f"'{self._addr}', but cannot listen at that address on this machine ({problem}). Set "
                    "local_addr (torchrun's --local-addr) to an address of this machine that the other "
                    "nodes can reach, or leave it unset for the host's FQDN."
                )
            self._server = hosted.add(
                dist.TCPStore(self._addr, 0, is_master=True, multi_tenant=True, wait_for_workers=False)
            )
            # One write and one blocking read per rank, where torch's build() makes two of each.
            round_store.multi_set(keys, [self._addr, str(self._server.port)])
            return RendezvousStoreInfo(self._addr, self._server.port)
        started = time.monotonic()
        give_up = started + round_store.timeout.total_seconds()
        while True:
            wait = min(LEADER_CHECK_SECONDS, give_up - time.monotonic())
            try:
                round_store.wait(keys, timedelta(seconds=max(wait, 0.001)))
                break
            except dist.DistStoreError as exc:
                if not group_stands():
                    return None
                if time.monotonic() >= give_up:
                    # The store's own message names only the last short wait.
                    raise RendezvousTimeoutError(
                        f"Rank {rank} waited {time.monotonic() - started:.1f}s (the store's timeout) for "
                        "rank 0 of its group to publish the trainers' store address, while rank 0 stayed "
                        "in the group; rank 0's log says why it did not."
                    ) from exc
        addr, port = round_store.multi_get(keys)
        return RendezvousStoreInfo(addr.decode(), int(port.decode()))

    def stop(self) -> None:
        """Drop the server of the previous round; its trainers are gone by now."""
        self._server = None
