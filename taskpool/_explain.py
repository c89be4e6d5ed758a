"""Why a waiting task has not started, as the claim's own rules decide it (pure).

The client's `why`, the CLI's `why` and `show`, and the dashboard all explain from
here. The answer is worked out with the blocking policy of `taskpool._rules`
(`blocked_by`, `Occupancy`), never restated: a task is claimable when the live
nodes would start it from the queue as it stands, the queue taken in order (as
`plan_claims` takes it), each task by the oldest live node whose own `max_parallel`
and project limits (as it registered them) allow it; otherwise every reason given
is a real block:

- a task it runs after (`after`) has not succeeded yet;
- its start time (`not_before`, or a retry's backoff) is not reached;
- no live node;
- on every live node something that runs holds it: the node is full, its project
  is at that node's limit, its template or one of its locks is held;
- or nothing that runs holds it, but tasks ahead of it in the queue would be
  started first and take the free slots (or its template, a lock, its project's
  last place).

Running tasks count only while their lease is live, as in the claim.

Fair sharing (`TaskPool(fair_share=...)`, as each node registered it) does not change
the answer, which takes the queue in its order; it is named instead. A task waiting
for full nodes, or behind earlier tasks, is told which of the nodes that could claim
it share their slots fairly and what its project weighs there: on those the order
projects start in follows their weights, so another project's task may start first,
and one said to wait behind earlier tasks may start before them. A task said to be
claimable may wait for its project's turn; the blocks named (start time, no node, a
full node, a limit, a template, a lock) hold all the same.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ._decisions import lease_live
from ._models import NodeInfo, Status, TaskInfo
from ._reasons import waiting_for_dependency
from ._rules import Occupancy, Slot, blocked_by

#: A limit no count reaches: lets `blocked_by` judge one rule at a time.
_NO_LIMIT = 1 << 62
#: At most this many holder ids are named in one reason's text.
_NAMED_HOLDERS = 10
#: The text for a waiting task that nothing holds.
READY_TEXT = "nothing holds it: a node will claim it at its next claim"


class WaitKind(enum.StrEnum):
    """What kind of block holds a waiting task."""

    DEPENDENCY = "dependency"  # a task it runs after has not succeeded yet
    NOT_BEFORE = "not_before"  # its start time is not reached
    RETRY_BACKOFF = "retry_backoff"  # a retry's backoff is not over
    NO_LIVE_NODE = "no_live_node"
    NODES_FULL = "nodes_full"  # every live node runs its max_parallel
    PROJECT_LIMIT = "project_limit"  # every node with room is at its limit for the project
    TEMPLATE = "template"  # its template is held by a running task
    LOCK = "lock"  # one of its locks is held by a running task
    BEHIND = "behind"  # earlier tasks in the queue will be claimed first


@dataclass(frozen=True, slots=True)
class Holder:
    """A running task that holds what a waiting one needs."""

    task_id: int
    node_id: str | None
    host: str | None  # None when its node is not among the live ones
    started_at: float | None


@dataclass(frozen=True, slots=True)
class NodeLoad:
    """A live node as a reason names it: its load and, for a project, its limit."""

    node_id: str
    host: str
    running: int
    max_parallel: int
    project_limit: int | None = None


@dataclass(frozen=True, slots=True)
class WaitReason:
    """One thing that holds a waiting task, with `text` saying it in an operator's words."""

    kind: WaitKind
    text: str
    at: float  # when it was judged (UNIX seconds): the durations in `text` count to it
    subject: str | None = None  # the template, lock or project; DEPENDENCY: its task id
    holders: tuple[Holder, ...] = ()
    nodes: tuple[NodeLoad, ...] = ()  # NODES_FULL, PROJECT_LIMIT: the nodes it is about
    until: float | None = None  # NOT_BEFORE, RETRY_BACKOFF
    limit: int | None = None  # PROJECT_LIMIT: the highest limit of the nodes with room
    ahead: int = 0  # BEHIND: how many earlier tasks will be claimed first

    @property
    def holder_ids(self) -> tuple[int, ...]:
        return tuple(h.task_id for h in self.holders)


def describe(reasons: Sequence[WaitReason]) -> str:
    """A waiting task's reasons on one line, or that nothing holds it."""
    return "; ".join(r.text for r in reasons) if reasons else READY_TEXT


def fair_share_text(weights: Mapping[str, float] | None) -> str:
    """A node's `fair_share` in an operator's words: `off`, `on (every project 1)`, or
    `on (a=3, b=1, others 1)` (a project not listed weighs 1, as the claim takes it)."""
    return "off" if weights is None else f"on ({_weights_text(weights)})"


def _weights_text(weights: Mapping[str, float]) -> str:
    if not weights:
        return "every project 1"
    listed = ", ".join(f"{project}={weight:g}" for project, weight in sorted(weights.items()))
    return f"{listed}, others 1"


def duration(seconds: float) -> str:
    """`3 min 12 s`, `2 h 5 min`, `4 d 3 h`: short and exact enough for an operator."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def utc(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(at))


def queue_order(task: TaskInfo) -> tuple[int, int]:
    """The claim's order among waiting tasks: priority first, then submit order."""
    return (-task.spec.priority, task.id)


def slot(task: TaskInfo) -> Slot:
    spec = task.spec
    return Slot(task.id, spec.project, spec.template, spec.template_parallel, spec.locks)


@dataclass(frozen=True, slots=True)
class _Fleet:
    """What the claim sees right now: live nodes (oldest first), live leases."""

    nodes: list[NodeInfo]
    running: list[TaskInfo]
    busy: Counter[str]  # node id -> its running attempts
    now: float
    shared: Occupancy  # what the running tasks hold on every node; never changed

    @classmethod
    def of(cls, running: Iterable[TaskInfo], nodes: Iterable[NodeInfo], now: float) -> _Fleet:
        live = sorted((n for n in nodes if n.stopped_at is None), key=lambda n: n.started_at)
        # In id order: reasons name their holders oldest first.
        leased = sorted(
            (
                t
                for t in running
                if t.status is Status.RUNNING and lease_live(t.lease_expires_at, now)
            ),
            key=lambda t: t.id,
        )
        busy = Counter(t.owner_node for t in leased if t.owner_node)
        return cls(live, leased, busy, now, Occupancy.of(map(slot, leased), node_running=0))

    def claims(self, queue: Sequence[TaskInfo]) -> list[Slot]:
        """What the live nodes would start from `queue`, taken in queue order: each
        task by the oldest node whose own limits allow it, after the tasks before it.
        For one node this is `plan_claims`'s choice (tests/unit/test_explain.py)."""
        occ = Occupancy.of(map(slot, self.running), node_running=0)  # taken into below
        busy = Counter(self.busy)
        chosen: list[Slot] = []
        for candidate in map(slot, queue):
            for node in self.nodes:
                occ.node_running = busy[node.id]
                if not blocked_by(
                    candidate,
                    occ,
                    max_parallel=node.max_parallel,
                    project_limits=node.project_limits,
                ):
                    occ.take(candidate, on_this_node=False)
                    busy[node.id] += 1
                    chosen.append(candidate)
                    break
        return chosen

    def occupancy(self, node: NodeInfo | None) -> Occupancy:
        """What the running tasks occupy as `node` sees it (to read, not to take into)."""
        return dataclasses.replace(self.shared, node_running=self.busy[node.id] if node else 0)

    def blocks_on(self, task: TaskInfo, node: NodeInfo) -> bool:
        """Whether what runs blocks the task on `node`, queue aside."""
        held = blocked_by(
            slot(task),
            self.occupancy(node),
            max_parallel=node.max_parallel,
            project_limits=node.project_limits,
        )
        return held is not None

    def blocks_everywhere(self, task: TaskInfo) -> bool:
        """Whether what runs blocks the task on every live node, queue aside."""
        return all(self.blocks_on(task, node) for node in self.nodes)


def fills_every_node(
    queue: Sequence[TaskInfo], running: Iterable[TaskInfo], nodes: Iterable[NodeInfo], *, now: float
) -> bool:
    """Whether the claims from `queue` alone would fill every live node: then no task
    queued after it can start now, whatever else is queued. Lets a reader stop reading
    the queue early."""
    fleet = _Fleet.of(running, nodes, now)
    free = sum(max(0, n.max_parallel - fleet.busy[n.id]) for n in fleet.nodes)
    return len(fleet.claims(sorted(queue, key=queue_order))) >= free


def explain_waiting(
    tasks: Iterable[TaskInfo],
    *,
    queue: Iterable[TaskInfo],
    running: Iterable[TaskInfo],
    nodes: Iterable[NodeInfo],
    now: float,
    dependencies: Mapping[int, Status] | None = None,
) -> dict[int, list[WaitReason]]:
    """Why each of `tasks` has not started: its reasons, empty if nothing holds it
    (a node will claim it) or it is not waiting.

    `queue` is the waiting tasks due now that come before the deepest of `tasks` in
    queue order: all of them, or a first part of them that `fills_every_node`.
    `running` is the running tasks, `nodes` the live nodes; `dependencies` the status
    of each task that `tasks` run after (`after`; one not found there, pruned, holds
    nothing)."""
    fleet = _Fleet.of(running, nodes, now)
    tasks = list(tasks)
    wanted = [t for t in tasks if t.status is Status.WAITING]
    queue = [t for t in queue if t.status is Status.WAITING]
    unmet = {t.id: _unmet(t, dependencies or {}) for t in wanted}
    due = {t.id: t for t in [*queue, *wanted] if not _starts_later(t, now) and not unmet.get(t.id)}
    ordered = sorted(due.values(), key=queue_order)
    position = {t.id: i for i, t in enumerate(ordered)}
    chosen = fleet.claims(ordered) if fleet.nodes else []
    claimed = {s.task_id for s in chosen}
    result: dict[int, list[WaitReason]] = {t.id: [] for t in tasks}
    for task in wanted:
        if unmet[task.id]:
            result[task.id] = [
                WaitReason(
                    WaitKind.DEPENDENCY,
                    waiting_for_dependency(task_id, status.value),
                    now,
                    subject=str(task_id),
                )
                for task_id, status in unmet[task.id]
            ]
            if _starts_later(task, now):
                result[task.id].append(_start_time(task, now))
        elif _starts_later(task, now):
            result[task.id] = [_start_time(task, now)]
        elif not fleet.nodes:
            result[task.id] = [
                WaitReason(
                    WaitKind.NO_LIVE_NODE, "no live node: no worker is running on this store", now
                )
            ]
        elif task.id in claimed:
            result[task.id] = []
        elif fleet.blocks_everywhere(task):
            result[task.id] = _held(task, fleet)
        else:
            ahead = sum(1 for s in chosen if position[s.task_id] < position[task.id])
            could = [n for n in fleet.nodes if not fleet.blocks_on(task, n)]
            fair = _fair_sharing(task.spec.project, could, fleet)
            result[task.id] = [_behind(ahead, fair, now)]
    return result


def _unmet(task: TaskInfo, dependencies: Mapping[int, Status]) -> list[tuple[int, Status]]:
    """The tasks `task` runs after that have not succeeded, with their status."""
    return [
        (task_id, dependencies[task_id])
        for task_id in task.spec.after
        if task_id in dependencies and dependencies[task_id] is not Status.SUCCEEDED
    ]


def _starts_later(task: TaskInfo, now: float) -> bool:
    return task.spec.not_before is not None and task.spec.not_before > now


def _start_time(task: TaskInfo, now: float) -> WaitReason:
    until = task.spec.not_before or now
    when = f"{utc(until)} (in {duration(until - now)})"
    if task.attempts_used:
        last = f"; last attempt: {task.reason}" if task.reason else ""
        return WaitReason(
            WaitKind.RETRY_BACKOFF, f"retry backoff until {when}{last}", now, until=until
        )
    return WaitReason(WaitKind.NOT_BEFORE, f"not before {when}", now, until=until)


def _behind(ahead: int, fair: str | None, now: float) -> WaitReason:
    tasks = "1 earlier task" if ahead == 1 else f"{ahead} earlier tasks"
    text = f"waiting behind {tasks} that a node will claim first" + _clause(fair)
    return WaitReason(WaitKind.BEHIND, text, now, ahead=ahead)


def _clause(fair: str | None) -> str:
    return f"; {fair}" if fair else ""


def _fair_sharing(project: str, nodes: Sequence[NodeInfo], fleet: _Fleet) -> str | None:
    """That those of `nodes` (the ones that could claim a task of `project`) share
    their slots fairly, and what the project weighs there (None if none of them does):
    on those the order projects start in follows their weights, not the queue's."""
    fair = [(n, n.fair_share) for n in nodes if n.fair_share is not None]
    if not fair:
        return None
    who = ", ".join(_node_label(n, fleet) for n, _ in fair)
    verb = "shares" if len(fair) == 1 else "share"
    tables = {_weights_text(weights) for _, weights in fair}
    if len(tables) == 1:
        weighs = f" ({tables.pop()}): project {project!r} weighs {fair[0][1].get(project, 1.0):g}"
    else:
        each = ", ".join(
            f"{weights.get(project, 1.0):g} on {_node_label(n, fleet)}" for n, weights in fair
        )
        weighs = f": project {project!r} weighs {each}"
    return (
        f"{who} {verb} slots fairly across projects{weighs},"
        " so another project's task may start first"
    )


def _held(task: TaskInfo, fleet: _Fleet) -> list[WaitReason]:
    """The blocks of a task that what runs holds on every live node, in the order the
    rules check them: the nodes' room, the project's limit, the template, the locks."""
    reasons: list[WaitReason] = []
    bare = Slot(task.id, task.spec.project)  # only the node's and the project's rules apply
    full = [
        n
        for n in fleet.nodes
        if blocked_by(bare, fleet.occupancy(n), max_parallel=n.max_parallel, project_limits={})
    ]
    room = [n for n in fleet.nodes if n not in full]
    limited = [
        n
        for n in room
        if blocked_by(
            bare, fleet.occupancy(n), max_parallel=_NO_LIMIT, project_limits=n.project_limits
        )
    ]
    if not room:
        reasons.append(_nodes_full(fleet, full, _fair_sharing(task.spec.project, full, fleet)))
    elif limited == room:
        reasons.append(_project_limit(task.spec.project, fleet, room, full))
    shared = fleet.occupancy(None)
    if blocked_by(slot(task), shared, max_parallel=_NO_LIMIT, project_limits={}):
        reasons += _template_and_locks(task, fleet, shared)
    return reasons


def _node_label(node: NodeInfo, fleet: _Fleet) -> str:
    """Its host, and its id where another live node shares the host."""
    if sum(1 for n in fleet.nodes if n.host == node.host) > 1:
        return f"{node.host} (node {node.id[:8]})"
    return node.host


def _load(node: NodeInfo, fleet: _Fleet, project: str | None = None) -> NodeLoad:
    limit = node.project_limits.get(project) if project is not None else None
    return NodeLoad(node.id, node.host, fleet.busy[node.id], node.max_parallel, limit)


def _nodes_full(fleet: _Fleet, full: Sequence[NodeInfo], fair: str | None) -> WaitReason:
    each = ", ".join(
        f"{fleet.busy[n.id]}/{n.max_parallel} on {_node_label(n, fleet)}" for n in full
    )
    loads = tuple(_load(n, fleet) for n in full)
    text = f"every node is full ({each})" + _clause(fair)
    return WaitReason(WaitKind.NODES_FULL, text, fleet.now, nodes=loads)


def _project_limit(
    project: str, fleet: _Fleet, room: Sequence[NodeInfo], full: Sequence[NodeInfo]
) -> WaitReason:
    limits = {n.id: n.project_limits[project] for n in room}
    highest = max(limits.values())
    holders = [_holder(t, fleet) for t in fleet.running if t.spec.project == project]
    text = f"project {project!r} is at its limit {highest}: {_task_ids(holders)}"
    if len(set(limits.values())) > 1:
        each = ", ".join(
            f"{limits[n.id]} on {n.host} (node {n.id[:8]})"
            for n in sorted(room, key=lambda n: (limits[n.id], n.started_at))
        )
        text += f" (live nodes disagree on its limit: {each}; the highest counts)"
    if full:
        each = ", ".join(
            f"{fleet.busy[n.id]}/{n.max_parallel} on {_node_label(n, fleet)}" for n in full
        )
        text += f"; the other nodes are full ({each})"
    return WaitReason(
        WaitKind.PROJECT_LIMIT,
        text,
        fleet.now,
        subject=project,
        holders=tuple(holders),
        nodes=tuple(_load(n, fleet, project) for n in room),
        limit=highest,
    )


def _template_and_locks(task: TaskInfo, fleet: _Fleet, shared: Occupancy) -> list[WaitReason]:
    spec = task.spec
    reasons = []
    template = spec.template
    if template is not None and (
        template in shared.templates_exclusive
        or (not spec.template_parallel and template in shared.templates_any)
    ):
        # A parallel task is held only by the non-parallel runs of its template.
        holders = [
            _holder(t, fleet)
            for t in fleet.running
            if t.spec.template == template
            and not (spec.template_parallel and t.spec.template_parallel)
        ]
        reasons.append(_held_by(WaitKind.TEMPLATE, "template", template, holders, fleet.now))
    for lock in sorted(spec.locks & shared.locks_held):
        holders = [_holder(t, fleet) for t in fleet.running if lock in t.spec.locks]
        reasons.append(_held_by(WaitKind.LOCK, "lock", lock, holders, fleet.now))
    return reasons


def _holder(task: TaskInfo, fleet: _Fleet) -> Holder:
    nodes = {n.id: n for n in fleet.nodes}
    node = nodes.get(task.owner_node or "")
    return Holder(task.id, task.owner_node, node.host if node else None, task.started_at)


def _held_by(
    kind: WaitKind, what: str, name: str, holders: Sequence[Holder], now: float
) -> WaitReason:
    shown = ", ".join(_running(h, now) for h in holders[:_NAMED_HOLDERS])
    more = f" and {len(holders) - _NAMED_HOLDERS} more" if len(holders) > _NAMED_HOLDERS else ""
    noun = "task" if len(holders) == 1 else "tasks"
    text = f"{what} {name!r} is held by {noun} {shown}{more}"
    return WaitReason(kind, text, now, subject=name, holders=tuple(holders))


def _running(h: Holder, now: float) -> str:
    where = f" on node {h.node_id[:8]}" if h.node_id else ""
    if h.host is not None:
        where += f" on host {h.host}"
    since = f" for {duration(now - h.started_at)}" if h.started_at is not None else ""
    return f"{h.task_id} (running{where}{since})"


def _task_ids(holders: Sequence[Holder]) -> str:
    ids = [str(h.task_id) for h in holders]
    shown = ", ".join(ids[:_NAMED_HOLDERS])
    more = f" and {len(ids) - _NAMED_HOLDERS} more" if len(ids) > _NAMED_HOLDERS else ""
    return f"{'task' if len(ids) == 1 else 'tasks'} {shown}{more}"
