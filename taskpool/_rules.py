"""The blocking policy as a pure function over plain data.

Every backend gathers the same inputs inside its claim transaction (the attempts
holding a live lease, and waiting candidates in priority order) and calls
`plan_claims`; the SQL may pre-filter candidates that are certainly blocked, as
a speed-up only, never as a second policy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field


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


def plan_claims(
    candidates: Sequence[Slot],
    running: Iterable[Slot],
    *,
    node_running: int,
    max_parallel: int,
    project_limits: Mapping[str, int],
) -> list[Slot]:
    """Choose which candidates to start now.

    `candidates` are waiting tasks in queue order (priority, then submit order);
    `running` are the attempts holding a live lease on any node, of which
    `node_running` are on the claiming node. A blocked candidate is skipped, never
    waited on, so it cannot hold up an unrelated task behind it; within one
    blocking group the earliest candidate wins.
    """
    occ = Occupancy.of(running, node_running=node_running)
    chosen: list[Slot] = []
    for slot in candidates:
        if occ.node_running >= max_parallel:
            break
        if blocked_by(slot, occ, max_parallel=max_parallel, project_limits=project_limits):
            continue
        occ.take(slot, on_this_node=True)
        chosen.append(slot)
    return chosen
