"""What each rendezvous node was *told*, and a checker for it.

The invariant checker (``invariants.InvariantChecker``) judges what etcd stores. A node can still
be handed something the store never said, or an old round again after a retried write; so the
fault tests also log every answer a node got from ``next_rendezvous`` (``record_rendezvous``),
from torchrun's monitor call ``num_nodes_waiting`` (``record_waiting``) and every close
(``record_close``), and ``check`` judges that history:

* per round: one world size, unique ranks below it (exactly ``0..n-1`` once all ``n`` answered),
  one bootstrap store address;
* per node: the rounds of its successive answers strictly increase;
* with ``completed_groups`` (round -> {node: rank}, e.g. ``InvariantChecker.groups``): each answer
  matches the group stored for its round;
* no answer returns later than ``grace`` seconds after the run was closed;
* with ``states`` (every stored version of the state, ``InvariantChecker.states``): fencing, no
  node is told a round in which the state stored at the revision of the answer (etcd's when it
  returned, or the newest the node had seen) does not list it, with that rank; and on the monitor
  path, no node reports more waiting nodes than the state it read holds.

``check_worker_results`` does the same for torchrun workers' result files, which know no round:
they are grouped by the bootstrap store (``master``) they were given.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from rdzv_common.state import RendezvousState

__all__ = [
    "Answer", "AnswerLog", "Closed", "Waiting", "check", "check_worker_results", "record_close",
    "record_rendezvous", "record_waiting",
]


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
    revision: int = 0  # the newest revision of the run the node had seen when it was told (0: unknown)


@dataclass(frozen=True)
class Waiting:
    """One ``num_nodes_waiting`` answer, from the stored state with ``token`` (etcd's revision)."""

    node: str
    count: int
    token: int | None
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
        self._events: list[Answer | Waiting | Closed] = []

    def add(self, event: Answer | Waiting | Closed) -> None:
        with self._lock:
            self._events.append(event)

    @property
    def events(self) -> list[Answer | Waiting | Closed]:
        with self._lock:
            return list(self._events)

    @property
    def waiting(self) -> list[Waiting]:
        return [e for e in self.events if isinstance(e, Waiting)]

    @property
    def answers(self) -> list[Answer]:
        return [e for e in self.events if isinstance(e, Answer)]

    def describe(self) -> str:
        return "\n".join(map(str, self.events))


def record_rendezvous(handler, log: AnswerLog, now: Callable[[], int] | None = None):
    """``handler.next_rendezvous()``, with its answer logged; returns the ``RendezvousInfo``.

    Args:
        now: etcd's current revision (read past any fault proxy): the answer is then judged
            against the state stored when it was given. Without it, against the state at the
            newest revision the node had seen (its etcd backend's floor), which its own liveness
            check covered.
    """
    info = handler.next_rendezvous()
    revision = now() if now is not None else _seen(handler)
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
            revision=revision,
        )
    )
    return info


def _seen(handler) -> int:
    """The newest revision of the run an etcd handler has seen (0 for other backends). Its floor
    covers its own liveness check; a state read from the process's view may be newer than it."""
    floor = getattr(getattr(handler, "_backend", None), "floor", None)
    return max(floor.revision, handler._executor.token or 0) if floor is not None else 0


def record_waiting(handler, log: AnswerLog) -> int:
    """``handler.num_nodes_waiting()`` as torchrun's monitor loop calls it, logged with the token
    of the state it answered from; returns the count."""
    count = handler.num_nodes_waiting()
    log.add(Waiting(handler.node.key, count, handler._executor.token, time.monotonic()))
    return count


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
    log: AnswerLog | Iterable[Answer | Waiting | Closed],
    completed_groups: Mapping[int, object] | None = None,
    grace: float = 1.0,
    states: Sequence[tuple[int, RendezvousState | None]] | None = None,
) -> list[str]:
    """Every violation in the logged history (see the module docstring); empty when it is sound.

    Args:
        completed_groups: round -> {node key: rank}, or -> an object with such a ``ranks``
            attribute (``invariants.Group``).
        grace: how long after a close an answer already on its way may still return.
        states: every stored version of the state as ``(mod revision, state)``, oldest first.
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

    if states is not None:
        problems += _fencing_problems(answers, states)
        problems += _waiting_problems([e for e in events if isinstance(e, Waiting)], states)

    if closes:
        first = min(closes, key=lambda c: c.t)
        for answer in answers:
            if answer.t > first.t + grace:
                problems.append(
                    f"node {answer.node}: answered round {answer.round} {answer.t - first.t:.2f}s after "
                    f"{first.node} closed the run"
                )
    return problems


def _stored_at(states: Sequence[tuple[int, RendezvousState | None]], revision: int) -> tuple[int, RendezvousState | None]:
    """The newest stored version at or before ``revision`` (``(0, None)``: none yet)."""
    index = bisect.bisect_right([r for r, _ in states], revision)
    return states[index - 1] if index else (0, None)


def _fencing_problems(answers: list[Answer], states: Sequence[tuple[int, RendezvousState | None]]) -> list[str]:
    problems = []
    for answer in answers:
        if not answer.revision:
            continue
        at, stored = _stored_at(states, answer.revision)
        members = {n.key: r for n, r in stored.participants.items()} if stored is not None else {}
        if stored is None or stored.round != answer.round or not stored.complete or members.get(answer.node) != answer.rank:
            where = "no state" if stored is None else f"round {stored.round} complete={stored.complete} with {members}"
            problems.append(
                f"node {answer.node}: told round {answer.round} rank {answer.rank} having seen revision "
                f"{answer.revision}, where the stored state (rev {at}) is {where}"
            )
    return problems


def _waiting_problems(waiting: list[Waiting], states: Sequence[tuple[int, RendezvousState | None]]) -> list[str]:
    problems = []
    by_revision = dict(states)
    for answer in waiting:
        stored = by_revision.get(answer.token)
        if answer.token is None or stored is None:
            if answer.count:
                problems.append(f"node {answer.node}: num_nodes_waiting() said {answer.count} with no state")
            continue
        if answer.count > len(stored.wait_list):
            problems.append(
                f"node {answer.node}: num_nodes_waiting() said {answer.count} from the state of rev "
                f"{answer.token}, whose wait list is {sorted(n.key for n in stored.wait_list)}"
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
