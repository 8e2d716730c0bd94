"""What each rendezvous node was *told*, and a checker for it.

The invariant checker (``invariants.InvariantChecker``) judges what etcd stores. A node can still
be handed something the store never said, or an old round again after a retried write; so the
fault tests also log every answer a node got from ``next_rendezvous`` (``record_rendezvous``) and
every close (``record_close``), and ``check`` judges that history:

* per round: one world size, unique ranks below it (exactly ``0..n-1`` once all ``n`` answered),
  one bootstrap store address;
* per node: the rounds of its successive answers strictly increase;
* with ``completed_groups`` (round -> {node: rank}, e.g. ``InvariantChecker.groups``): each answer
  matches the group stored for its round;
* no answer returns later than ``grace`` seconds after the run was closed.

``check_worker_results`` does the same for torchrun workers' result files, which know no round:
they are grouped by the bootstrap store (``master``) they were given.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["Answer", "AnswerLog", "Closed", "check", "check_worker_results", "record_close", "record_rendezvous"]


@dataclass(frozen=True)
class Answer:
    """One ``next_rendezvous`` result: ``store`` is the bootstrap store's ``addr:port``, ``t`` the
    ``time.monotonic()`` at which the call returned."""

    node: str
    round: int
    rank: int
    world_size: int
    store: str
    t: float


@dataclass(frozen=True)
class Closed:
    """The run was closed (``shutdown`` or ``set_closed`` returned) at ``t``."""

    node: str
    t: float


class AnswerLog:
    """Thread-safe, in order of recording."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[Answer | Closed] = []

    def add(self, event: Answer | Closed) -> None:
        with self._lock:
            self._events.append(event)

    @property
    def events(self) -> list[Answer | Closed]:
        with self._lock:
            return list(self._events)

    @property
    def answers(self) -> list[Answer]:
        return [e for e in self.events if isinstance(e, Answer)]

    def describe(self) -> str:
        return "\n".join(map(str, self.events))


def record_rendezvous(handler, log: AnswerLog):
    """``handler.next_rendezvous()``, with its answer logged; returns the ``RendezvousInfo``."""
    info = handler.next_rendezvous()
    t = time.monotonic()
    store_info = info.bootstrap_store_info
    log.add(
        Answer(
            node=handler.node.key,
            round=handler.last_timings.round,
            rank=info.rank,
            world_size=info.world_size,
            store=f"{store_info.master_addr}:{store_info.master_port}",
            t=t,
        )
    )
    return info


def record_close(handler, log: AnswerLog) -> bool:
    """``handler.shutdown()`` (which closes the run), logged once it returned; returns its result."""
    ok = handler.shutdown()
    if ok:
        log.add(Closed(handler.node.key, time.monotonic()))
    return ok


def _ranks_problems(where: str, ranks: Mapping[str, int], world_size: int) -> list[str]:
    problems = []
    by_rank: dict[int, list[str]] = defaultdict(list)
    for who, rank in ranks.items():
        by_rank[rank].append(who)
    for rank, holders in sorted(by_rank.items()):
        if len(holders) > 1:
            problems.append(f"{where}: rank {rank} given to {sorted(holders)}")
        if not 0 <= rank < world_size:
            problems.append(f"{where}: rank {rank} of {sorted(holders)} outside 0..{world_size - 1}")
    if len(ranks) > world_size:
        problems.append(f"{where}: {len(ranks)} members answered for a world of size {world_size}: {sorted(ranks)}")
    return problems


def check(
    log: AnswerLog | Iterable[Answer | Closed],
    completed_groups: Mapping[int, object] | None = None,
    grace: float = 1.0,
) -> list[str]:
    """Every violation in the logged history (see the module docstring); empty when it is sound.

    Args:
        completed_groups: round -> {node key: rank}, or -> an object with such a ``ranks``
            attribute (``invariants.Group``).
        grace: how long after a close an answer already on its way may still return.
    """
    events = log.events if isinstance(log, AnswerLog) else list(log)
    answers = sorted((e for e in events if isinstance(e, Answer)), key=lambda a: a.t)
    closes = [e for e in events if isinstance(e, Closed)]
    problems: list[str] = []

    by_round: dict[int, list[Answer]] = defaultdict(list)
    for answer in answers:
        by_round[answer.round].append(answer)
    for round_, group in sorted(by_round.items()):
        where = f"round {round_}"
        sizes = {a.world_size for a in group}
        if len(sizes) > 1:
            problems.append(f"{where}: world sizes {sorted(sizes)} ({_who(group)})")
        stores = {a.store for a in group}
        if len(stores) > 1:
            problems.append(f"{where}: bootstrap stores {sorted(stores)} ({_who(group, 'store')})")
        # A node answered twice in one round is the per-node check's to report.
        ranks = {a.node: a.rank for a in group}
        problems += _ranks_problems(where, ranks, max(sizes))

    last: dict[str, Answer] = {}
    for answer in answers:
        before = last.get(answer.node)
        if before is not None and answer.round <= before.round:
            problems.append(
                f"node {answer.node}: handed round {answer.round} (rank {answer.rank}) after it had "
                f"been in round {before.round}"
            )
        last[answer.node] = answer

    if completed_groups is not None:
        for round_, group in sorted(by_round.items()):
            stored = completed_groups.get(round_)
            if stored is None:
                problems.append(f"round {round_}: answered to {_who(group)} but never stored as complete")
                continue
            ranks = dict(getattr(stored, "ranks", stored))
            for answer in group:
                if answer.node not in ranks:
                    problems.append(f"round {round_}: {answer.node} was answered but is not in the stored group {ranks}")
                elif ranks[answer.node] != answer.rank:
                    problems.append(
                        f"round {round_}: {answer.node} was told rank {answer.rank}, the stored group "
                        f"gives it rank {ranks[answer.node]}"
                    )
                if answer.world_size != len(ranks):
                    problems.append(
                        f"round {round_}: {answer.node} was told world size {answer.world_size}, the "
                        f"stored group has {len(ranks)}"
                    )

    if closes:
        first = min(closes, key=lambda c: c.t)
        for answer in answers:
            if answer.t > first.t + grace:
                problems.append(
                    f"node {answer.node}: answered round {answer.round} {answer.t - first.t:.2f}s after "
                    f"{first.node} closed the run"
                )
    return problems


def _who(group: list[Answer], field: str = "world_size") -> str:
    return ", ".join(f"{a.node}: rank {a.rank} {field} {getattr(a, field)}" for a in group)


def check_worker_results(results: Iterable[Mapping]) -> list[str]:
    """Violations among torchrun workers' result dicts (``scripts/allreduce.py``'s): grouped by
    their bootstrap store (``master``, or ``master_addr`` and ``master_port``), each group has
    one world size and unique ranks below it, exactly ``0..n-1`` when all ``n`` reported; and
    where a worker reports its all-reduce ``sum`` of ``rank + 1``, it is ``n(n+1)/2``."""
    groups: dict[str, list[Mapping]] = defaultdict(list)
    for result in results:
        master = result.get("master") or f"{result['master_addr']}:{result['master_port']}"
        groups[master].append(result)
    problems: list[str] = []
    for master, group in sorted(groups.items()):
        where = f"workers of store {master}"
        sizes = {r["world_size"] for r in group}
        if len(sizes) > 1:
            problems.append(f"{where}: world sizes {sorted(sizes)}")
        n = max(sizes)
        ranks = {f"#{i} (pid {r.get('pid', '?')}, restart {r.get('restart', '?')})": r["rank"] for i, r in enumerate(group)}
        problems += _ranks_problems(where, ranks, n)
        for r in group:
            if "sum" in r and r["sum"] != r["world_size"] * (r["world_size"] + 1) / 2:
                problems.append(f"{where}: rank {r['rank']} reduced {r['sum']} in a world of {r['world_size']}")
    return problems
