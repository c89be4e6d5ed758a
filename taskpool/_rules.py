"""The blocking policy as a pure function over plain data: `plan_claims` is its oracle.

The in-memory store calls `plan_claims` over every waiting task; SQLite calls it
through `claim_in_windows`, which reads waiting tasks a window at a time, minus
those `Prefilter` says are certainly blocked (a speed-up, never a second policy).
When blocked tasks crowd the head of the queue, SQLite reads a window group by
group (`merge_group_windows`), skipping the groups `Prefilter.blocks_group` rules
out whole without reading their rows. PostgreSQL restates the policy in PL/pgSQL
(`taskpool_claim`, migration 0006) to decide in one statement, under per-node and
per-blocking-key locks instead of one cluster-wide lock.

Fair sharing (`fair_share`, opt-in per pool) changes only which runnable task a free
slot goes to, never what is runnable: see `plan_claims`. Its windows read the head of
every project (`claim_fair_in_windows`); its clock's tags (`FairClock`) are kept by
each store (SQLite migration 0010, PostgreSQL 0014); PostgreSQL restates it in
`taskpool_claim_fair` (migration 0014).
The differential claim test (tests/integration/test_claim_differential.py) runs the
same random scenarios through `plan_claims` and every backend's claim and requires
the same ordered choice.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar


@dataclass(frozen=True, slots=True)
class Slot:
    """The routing of one task, which is all the rules look at."""

    task_id: int
    project: str
    template: str | None = None
    template_parallel: bool = False
    locks: frozenset[str] = frozenset()


@dataclass(slots=True)
class Occupancy:
    """What the attempts holding a live lease occupy right now."""

    node_running: int = 0  # on the claiming node
    per_project: Counter[str] = field(default_factory=Counter)
    templates_exclusive: set[str] = field(default_factory=set)  # a non-parallel task runs
    templates_any: set[str] = field(default_factory=set)  # any task of the template runs
    locks_held: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, running: Iterable[Slot], *, node_running: int) -> Occupancy:
        occ = cls(node_running)
        for slot in running:
            occ.take(slot, on_this_node=False)
        return occ

    def take(self, slot: Slot, *, on_this_node: bool) -> None:
        if on_this_node:
            self.node_running += 1
        self.per_project[slot.project] += 1
        if slot.template is not None:
            self.templates_any.add(slot.template)
            if not slot.template_parallel:
                self.templates_exclusive.add(slot.template)
        self.locks_held.update(slot.locks)


def blocked_by(
    slot: Slot, occ: Occupancy, *, max_parallel: int, project_limits: Mapping[str, int]
) -> str | None:
    """Say why `slot` cannot start now, or None if it can."""
    if occ.node_running >= max_parallel:
        return f"node is at its limit of {max_parallel} running"
    limit = project_limits.get(slot.project)
    if limit is not None and occ.per_project[slot.project] >= limit:
        return f"project {slot.project!r} is at its limit of {limit} running"
    if slot.template is not None:
        if slot.template in occ.templates_exclusive:
            return f"template {slot.template!r} is running and does not allow parallel runs"
        if not slot.template_parallel and slot.template in occ.templates_any:
            return f"template {slot.template!r} does not allow parallel runs"
    held = slot.locks & occ.locks_held
    if held:
        return f"lock {sorted(held)[0]!r} is held"
    return None


#: Fair sharing's weight per project (a project not listed weighs 1); None: no fair
#: sharing, slots go in queue order.
FairShare = Mapping[str, float] | None


def check_fair_share(fair_share: bool | Mapping[str, float] | None) -> FairShare:
    """The weights a pool's `fair_share` option stands for (True: every project weighs 1),
    or ValueError naming what is wrong: a weight must be a finite number above 0."""
    if fair_share is None or fair_share is False:
        return None
    if fair_share is True:
        return {}
    if not isinstance(fair_share, Mapping):
        raise ValueError(
            f"fair_share must be None, True or a mapping of project to weight, got {fair_share!r}"
        )
    weights: dict[str, float] = {}
    for project, weight in fair_share.items():
        if not isinstance(project, str) or not project:
            raise ValueError(f"fair_share: a project must be a non-empty string, got {project!r}")
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not math.isfinite(weight)
            or weight <= 0
        ):
            raise ValueError(
                f"fair_share: the weight of project {project!r} must be a finite number"
                f" above 0, got {weight!r}"
            )
        weights[project] = float(weight)
    return weights


@dataclass(frozen=True, slots=True)
class FairClock:
    """Fair sharing's memory of the slots given so far: a virtual clock, as start-time
    fair queuing keeps one. A slot given to a project starts at its start tag,
    `max(now, its finish tag)`, and moves the project's finish tag on to that plus
    1 / its weight; `now` is then that start tag. A project that waited idle starts at
    `now`, so it has no credit saved up to burst with; one served often has its finish
    tag ahead and waits for the others to catch up. Stores keep, per project, the
    start and finish tags of its latest slot (`tags`): `now` is the greatest start."""

    now: float = 0.0
    finish: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, tags: Mapping[str, tuple[float, float]]) -> FairClock:
        """The clock as stored: each project's (start tag, finish tag) of its latest slot."""
        starts = [start for start, _ in tags.values()]
        return cls(max(starts, default=0.0), {p: finish for p, (_, finish) in tags.items()})

    def start_tag(self, project: str) -> float:
        return max(self.now, self.finish.get(project, 0.0))

    def given(self, project: str, weights: Mapping[str, float]) -> FairClock:
        """The clock once a slot is given to `project`."""
        start = self.start_tag(project)
        # The same IEEE operations PostgreSQL makes (float8), so both keep equal tags.
        finish = start + 1.0 / weights.get(project, 1.0)
        return FairClock(start, {**self.finish, project: finish})


def fair_tags(
    clock: FairClock, chosen: Sequence[Slot], weights: Mapping[str, float]
) -> dict[str, tuple[float, float]]:
    """The (start tag, finish tag) a fair claim records for each project it gave slots
    to (`chosen`, in the order given), its latest slot's; the store keeps the greater."""
    tags: dict[str, tuple[float, float]] = {}
    for slot in chosen:
        clock = clock.given(slot.project, weights)
        tags[slot.project] = (clock.now, clock.finish[slot.project])
    return tags


def plan_claims(
    candidates: Sequence[Slot],
    running: Iterable[Slot],
    *,
    node_running: int,
    max_parallel: int,
    project_limits: Mapping[str, int],
    fair_share: FairShare = None,
    clock: FairClock | None = None,
) -> list[Slot]:
    """Choose which candidates to start now, in the order they are given the slots.

    `candidates` are waiting tasks in queue order (priority, then submit order);
    `running` are the attempts holding a live lease on any node, of which
    `node_running` are on the claiming node. A blocked candidate is skipped, never
    waited on, so it cannot hold up an unrelated task behind it; within one
    blocking group the earliest candidate wins.

    Without `fair_share` the free slots go in queue order. With it (weights per
    project, 1 for a project not listed) each free slot in turn goes to the project
    whose running attempts, on every node and counting those chosen so far, are
    fewest per weight (`running / weight`); among projects tied there, to the one
    with the earliest start tag on the fair `clock` (the slots given before, by
    weight: see `FairClock`), then to the one whose first runnable candidate comes
    first in the queue; within a project, queue order. What is runnable is unchanged
    (`blocked_by`).

    Why this rule: it reads only durable state (what holds a live lease, and the tags
    fair claims record with `fair_tags`), so no node keeps memory of its own and every
    node and backend decides the same. Every slot that frees goes to whoever runs least
    per weight, so while there are slots for every project the running tasks split in
    proportion to the weights, and a project with a deep queue cannot starve another.
    When the projects tie there, as they do with one slot re-claimed as each task ends
    (nothing runs at each claim), running counts cannot tell them apart; the clock
    then hands the slots out round-robin, in proportion to the weights, instead of to
    the project whose backlog was submitted first.
    """
    occ = Occupancy.of(running, node_running=node_running)
    if fair_share is not None:
        return _fair_steps(
            candidates,
            occ,
            max_parallel=max_parallel,
            project_limits=project_limits,
            weights=fair_share,
            clock=clock or FairClock(),
        )
    chosen: list[Slot] = []
    for slot in candidates:
        if occ.node_running >= max_parallel:
            break
        if blocked_by(slot, occ, max_parallel=max_parallel, project_limits=project_limits):
            continue
        occ.take(slot, on_this_node=True)
        chosen.append(slot)
    return chosen


def _fair_steps(
    candidates: Sequence[Slot],
    occ: Occupancy,
    *,
    max_parallel: int,
    project_limits: Mapping[str, int],
    weights: Mapping[str, float],
    clock: FairClock,
    incomplete: frozenset[str] = frozenset(),
) -> list[Slot]:
    """`plan_claims`' fair choice, one slot at a time, taken into `occ`.

    `incomplete` are projects of which `candidates` may hold only a first part (a
    window): while one of them shows no runnable candidate, its next one is unknown,
    so the steps stop there and the caller reads on."""
    chosen: list[Slot] = []
    taken: set[int] = set()
    while occ.node_running < max_parallel:
        heads: set[str] = set()  # projects whose first runnable candidate was seen
        best: Slot | None = None
        best_key = (0.0, 0.0)
        for slot in candidates:
            if slot.project in heads or slot.task_id in taken:
                continue
            if blocked_by(slot, occ, max_parallel=max_parallel, project_limits=project_limits):
                continue
            heads.add(slot.project)
            # The same IEEE division PostgreSQL makes (count::float8 / weight::float8).
            share = occ.per_project[slot.project] / weights.get(slot.project, 1.0)
            key = (share, clock.start_tag(slot.project))
            if best is None or key < best_key:  # a tie on both: the earlier head wins
                best, best_key = slot, key
        if best is None or not incomplete <= heads:
            break
        occ.take(best, on_this_node=True)
        clock = clock.given(best.project, weights)
        taken.add(best.task_id)
        chosen.append(best)
    return chosen


@dataclass(frozen=True, slots=True)
class Group:
    """What a task shares with every task of its blocking group: all that a `Prefilter`
    looks at but its locks, so a group is blocked whole or not at all."""

    project: str
    template: str | None
    template_parallel: bool

    @classmethod
    def of(cls, slot: Slot) -> Group:
        return cls(slot.project, slot.template, slot.template_parallel)


@dataclass(frozen=True, slots=True)
class Prefilter:
    """What is certainly blocked by an occupancy, as lists a candidate query can filter
    on: a waiting task `drops` here is blocked by `blocked_by` for a reason other than
    the node's own limit, and stays blocked while that occupancy only grows."""

    full_projects: tuple[str, ...] = ()
    templates_exclusive: tuple[str, ...] = ()  # no task of these may start
    templates_any: tuple[str, ...] = ()  # no non-parallel task of these may start
    locks_held: tuple[str, ...] = ()

    @classmethod
    def of(cls, occ: Occupancy, project_limits: Mapping[str, int]) -> Prefilter:
        return cls(
            full_projects=tuple(
                sorted(p for p, limit in project_limits.items() if occ.per_project[p] >= limit)
            ),
            templates_exclusive=tuple(sorted(occ.templates_exclusive)),
            templates_any=tuple(sorted(occ.templates_any)),
            locks_held=tuple(sorted(occ.locks_held)),
        )

    def blocks_group(self, group: Group) -> bool:
        """Every task of `group` is dropped, whatever its locks."""
        if group.project in self.full_projects:
            return True
        if group.template is not None:
            if group.template in self.templates_exclusive:
                return True
            if not group.template_parallel and group.template in self.templates_any:
                return True
        return False

    def drops(self, slot: Slot) -> bool:
        """The filter a backend's query applies, in Python (for the property tests)."""
        return self.blocks_group(Group.of(slot)) or not slot.locks.isdisjoint(self.locks_held)


#: At most how many waiting tasks one window of `claim_in_windows` reads. Certainly
#: blocked ones are filtered out by the query, so the first candidate of a window is
#: always runnable and a few per free slot suffice.
CLAIM_WINDOW = 64


def claim_window(free_slots: int, max_window: int = CLAIM_WINDOW) -> int:
    return min(max_window, 2 * free_slots + 2)


#: Reads at most `window` waiting tasks in queue order, but those the prefilter drops
#: and those whose ids are given (taken by this claim already, still waiting until the
#: claim is written).
FetchCandidates = Callable[[Prefilter, Sequence[int], int], Sequence[Slot]]


def claim_in_windows(
    fetch: FetchCandidates,
    running: Sequence[Slot],
    *,
    node_running: int,
    max_parallel: int,
    project_limits: Mapping[str, int],
    max_window: int = CLAIM_WINDOW,
) -> list[Slot]:
    """`plan_claims` over a queue read a window at a time through `fetch`: the same
    choice, in the same order, without reading every waiting task.

    A full window may hide runnable tasks behind ones blocked by this very claim; the
    next window is read with a prefilter that drops those, until a window adds nothing
    or comes back short (the queue is exhausted). Each window leaves out the tasks
    already chosen: nothing in the prefilter drops a chosen task that blocks nothing of
    its own kind (a parallel template, no lock), which would be chosen twice."""
    chosen: list[Slot] = []
    while node_running + len(chosen) < max_parallel:
        window = claim_window(max_parallel - node_running - len(chosen), max_window)
        occ = Occupancy.of([*running, *chosen], node_running=node_running + len(chosen))
        candidates = fetch(Prefilter.of(occ, project_limits), [s.task_id for s in chosen], window)
        picked = plan_claims(
            candidates,
            [*running, *chosen],
            node_running=node_running + len(chosen),
            max_parallel=max_parallel,
            project_limits=project_limits,
        )
        chosen.extend(picked)
        if not picked or len(candidates) < window:
            break
    return chosen


#: Reads, for each project, its first `n` waiting tasks in queue order but those the
#: prefilter drops and those whose ids are given; all of them in queue order.
FetchProjectHeads = Callable[[Prefilter, Sequence[int], int], Sequence[Slot]]


def claim_fair_in_windows(
    fetch_heads: FetchProjectHeads,
    running: Sequence[Slot],
    *,
    node_running: int,
    max_parallel: int,
    project_limits: Mapping[str, int],
    fair_share: Mapping[str, float],
    clock: FairClock,
    max_window: int = CLAIM_WINDOW,
) -> list[Slot]:
    """`plan_claims` with `fair_share` and `clock` over a queue read as the head of each project:
    the same choice, in the same order, however deep a project's first task lies
    behind another project's backlog.

    Each window holds every project's first `n` tasks the prefilter keeps, so at its
    start every task in it is runnable (the prefilter drops exactly what
    `blocked_by` blocks for a reason other than the node's limit). A project with `n`
    tasks in the window may have more: once this claim's own choices block all `n`
    (or take them), the steps stop and the next window is read with the prefilter of
    what is chosen by then. A window without such a project holds the whole queue."""
    chosen: list[Slot] = []
    while node_running + len(chosen) < max_parallel:
        per_project = claim_window(max_parallel - node_running - len(chosen), max_window)
        occ = Occupancy.of([*running, *chosen], node_running=node_running + len(chosen))
        candidates = fetch_heads(
            Prefilter.of(occ, project_limits), [s.task_id for s in chosen], per_project
        )
        counts = Counter(s.project for s in candidates)
        incomplete = frozenset(p for p, n in counts.items() if n >= per_project)
        picked = _fair_steps(
            candidates,
            occ,
            max_parallel=max_parallel,
            project_limits=project_limits,
            weights=fair_share,
            clock=_after(clock, chosen, fair_share),
            incomplete=incomplete,
        )
        chosen.extend(picked)
        if not picked or not incomplete:
            break
    return chosen


def _after(clock: FairClock, chosen: Sequence[Slot], weights: Mapping[str, float]) -> FairClock:
    for slot in chosen:
        clock = clock.given(slot.project, weights)
    return clock


#: A waiting task's place in the queue: (-priority, id) ascends in queue order.
QueueKey = tuple[int, int]
G = TypeVar("G")
T = TypeVar("T")


def merge_group_windows(
    ranked: Sequence[G],
    fetch_group: Callable[[G, int], Sequence[T]],
    key: Callable[[T], QueueKey],
    window: int,
) -> list[T]:
    """The first `window` tasks of a queue split into groups, reading few of them.

    `ranked` are the groups that have a task to offer, in the queue order of their
    first one; `fetch_group(group, n)` reads a group's first `n` tasks in queue
    order. A group's j-th task (from 0) has j tasks of its own group and the first
    task of each of the r groups ranked before it ahead of it in the merged queue,
    so the group ranked r (from 0) contributes only among its first `window - r`
    tasks, and groups ranked `window` or later contribute nothing."""
    merged = [
        task
        for rank, group in enumerate(ranked[:window])
        for task in fetch_group(group, window - rank)
    ]
    merged.sort(key=key)
    return merged[:window]
