"""What the dashboard's pages show, computed from what the client returns (pure).

Filtering by template and text, paging and queue depth per project are worked out
here over lists of `TaskInfo`, so each is written once and tested without a server
("why is this task waiting" is `taskpool._explain`'s, shared with the client and
the CLI). The client lists tasks newest first by
status and project only; the rest is filtered here within a bounded window of the
newest tasks (`SCAN_LIMIT`), and the page says so when the window was full.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .._explain import duration as duration
from .._explain import utc as utc
from .._models import Status, TaskInfo

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
