"""What the dashboard's pages show, computed from what the client returns (pure).

Filtering by template and text, paging, queue depth per project and "why is this
task waiting" are worked out here over lists of `TaskInfo` and `NodeInfo`, so each
is written once and tested without a server. The client lists tasks newest first by
status and project only; the rest is filtered here within a bounded window of the
newest tasks (`SCAN_LIMIT`), and the page says so when the window was full.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .._models import NodeInfo, Status, TaskInfo
from .._rules import Occupancy, Slot, blocked_by

#: The newest tasks a filtered list or a count looks through.
SCAN_LIMIT = 5000
PAGE_SIZE = 50
MAX_FILTER_CHARS = 200


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """The task list's filters, as read from the query string."""

    status: Status | None = None
    project: str | None = None
    template: str | None = None
    text: str | None = None
    page: int = 1

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> TaskFilter:
        """Unknown or bad values are ignored rather than refused: a stale bookmark
        still opens the list."""

        def text(name: str) -> str | None:
            value = query.get(name, "").strip()[:MAX_FILTER_CHARS]
            return value or None

        status = query.get("status", "")
        page = query.get("page", "1")
        return cls(
            status=Status(status) if status in Status.__members__.values() else None,
            project=text("project"),
            template=text("template"),
            text=text("q"),
            page=int(page) if page.isdigit() and 0 < len(page) < 7 and int(page) > 0 else 1,
        )

    @property
    def needs_scan(self) -> bool:
        """Whether the store's own filters are not enough (template, text)."""
        return self.template is not None or self.text is not None

    def query(self, **changes: object) -> dict[str, str]:
        """The query string for these filters with `changes`, empty values left out."""
        values: dict[str, object] = {
            "status": self.status.value if self.status else None,
            "project": self.project,
            "template": self.template,
            "q": self.text,
            "page": self.page if self.page > 1 else None,
        }
        values.update(changes)
        return {k: str(v) for k, v in values.items() if v not in (None, "", 1)}

    def matches(self, task: TaskInfo) -> bool:
        if self.template is not None and task.spec.template != self.template:
            return False
        if self.text is not None:
            needle = self.text.casefold()
            haystack = " ".join([str(task.id), *task.spec.argv, task.reason or ""])
            return needle in haystack.casefold()
        return True


@dataclass(frozen=True, slots=True)
class Page:
    tasks: list[TaskInfo]
    has_next: bool
    window_full: bool  # the scan window was full: older tasks were not looked at


def page_of(found: Sequence[TaskInfo], f: TaskFilter, *, fetched: int, limit: int) -> Page:
    """The filter's page of `found` (the newest `fetched` tasks, asked with `limit`)."""
    matching = [t for t in found if f.matches(t)]
    start = (f.page - 1) * PAGE_SIZE
    return Page(
        matching[start : start + PAGE_SIZE], len(matching) > start + PAGE_SIZE, fetched >= limit
    )


def fetch_limit(f: TaskFilter) -> int:
    """How many tasks to ask the client for to show the filter's page."""
    return SCAN_LIMIT if f.needs_scan else f.page * PAGE_SIZE + 1


@dataclass(frozen=True, slots=True)
class QueueDepth:
    project: str
    waiting: int
    running: int
    oldest_waiting_s: float | None


def queue_depths(
    waiting: Iterable[TaskInfo], running: Iterable[TaskInfo], *, now: float
) -> list[QueueDepth]:
    """Waiting and running tasks per project, deepest queue first."""
    waits: Counter[str] = Counter()
    runs: Counter[str] = Counter()
    oldest: dict[str, float] = {}
    for task in waiting:
        waits[task.spec.project] += 1
        oldest[task.spec.project] = min(oldest.get(task.spec.project, now), task.submitted_at)
    for task in running:
        runs[task.spec.project] += 1
    projects = sorted(set(waits) | set(runs), key=lambda p: (-waits[p], -runs[p], p))
    return [
        QueueDepth(p, waits[p], runs[p], now - oldest[p] if p in oldest else None) for p in projects
    ]


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


def _slot(task: TaskInfo) -> Slot:
    spec = task.spec
    return Slot(task.id, spec.project, spec.template, spec.template_parallel, spec.locks)


def _holder(task: TaskInfo, nodes: Mapping[str, NodeInfo], now: float) -> str:
    node = nodes.get(task.owner_node or "")
    where = f" on node {task.owner_node[:8]}" if task.owner_node else ""
    if node is not None:
        where += f" on host {node.host}"
    since = f" for {duration(now - task.started_at)}" if task.started_at else ""
    return f"task {task.id} (running{where}{since})"


def explain_waiting(
    task: TaskInfo, running: Sequence[TaskInfo], live_nodes: Sequence[NodeInfo], *, now: float
) -> str:
    """Why a waiting task has not started, in an operator's words.

    What the store alone can tell: a start time not reached, no live node, a template
    or lock held (by the blocking rules' own `blocked_by`, naming the holder), every
    node full. Per-node project limits are each worker's configuration, not in the
    store; a task none of these holds is waiting for a node's next claim."""
    spec = task.spec
    if spec.not_before is not None and spec.not_before > now:
        when = f"{utc(spec.not_before)} (in {duration(spec.not_before - now)})"
        if task.attempts_used and task.reason:
            return f"retry backoff until {when}; last attempt: {task.reason}"
        return f"not before {when}"
    if not live_nodes:
        return "no live node: no worker is running on this store"
    by_id = {n.id: n for n in live_nodes}
    others = [t for t in running if t.id != task.id]
    rule = blocked_by(
        _slot(task),
        Occupancy.of([_slot(t) for t in others], node_running=0),
        max_parallel=1 << 62,
        project_limits={},
    )
    if rule is not None:
        for other in others:
            same_template = spec.template is not None and other.spec.template == spec.template
            if same_template and not (spec.template_parallel and other.spec.template_parallel):
                return f"template {spec.template!r} is held by {_holder(other, by_id, now)}"
        for other in others:
            shared = sorted(spec.locks & other.spec.locks)
            if shared:
                return f"lock {shared[0]!r} is held by {_holder(other, by_id, now)}"
        return rule
    busy = Counter(t.owner_node for t in running)
    if all(busy[n.id] >= n.max_parallel for n in live_nodes):
        each = ", ".join(f"{busy[n.id]}/{n.max_parallel} on {n.host}" for n in live_nodes)
        return f"every node is full ({each})"
    return "ready: waiting for a node's next claim (or a project limit of the workers)"
