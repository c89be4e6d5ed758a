"""Retention: which finished tasks (and which output) to prune, and the loop that prunes.

`Retention` is the policy an operator writes: keep finished tasks at most so long
(per status if wanted: failed ones longer), at most so many, and optionally drop
output sooner than the rows. `Retention.plan(now)` turns it into the cut-offs a
store applies (`PrunePlan`); `select_prunable` applies a plan to finished tasks in
Python (MemoryStore, and the oracle of tests); the SQL stores say the same in SQL,
in bounded batches (taskpool/stores/_prune.py). Only finished tasks are ever chosen:
waiting and running ones are not in a plan's statuses, and nothing else refers to a
task (a retry is a new task that only names its origin in its first event's reason).

`keep_pruning` is the pool's background loop (`TaskPool(retention=...)`).
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from ._errors import StoreError
from ._models import Status

if TYPE_CHECKING:
    from ._store import Store

log = logging.getLogger("taskpool")

DAY_S = 86400.0
#: The default retention: finished tasks are kept 30 days, output with them. A month
#: covers a monthly review and the postmortem of anything noticed late, while bounding
#: the database (100,000 trivial tasks a day is about 2 GB on SQLite at steady state).
DEFAULT_OLDER_THAN_S = 30 * DAY_S
#: How often a pool prunes by default. A prune that finds nothing reads the finished
#: tasks once (tens of ms for 100,000 on SQLite), so hourly costs nothing noticeable.
DEFAULT_INTERVAL_S = 3600.0
#: Tasks deleted per transaction: small enough that claims wait milliseconds, not the
#: whole prune, behind it.
BATCH_TASKS = 1000

FINISHED = frozenset(s for s in Status if s.is_terminal)


def _seconds(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(
            f"Retention.{name} must be a number of seconds >= 0 or None, not {value!r}"
        )
    if math.isinf(value):
        return None  # forever: no limit
    return float(value)


def _finished_status(name: str, value: Status | str) -> Status:
    try:
        status = Status(value)
    except ValueError:
        raise ValueError(f"Retention.{name}: {value!r} is not a task status") from None
    if not status.is_terminal:
        names = ", ".join(sorted(s.value for s in FINISHED))
        raise ValueError(
            f"Retention.{name}: {status.value!r} is not a finished status; only finished"
            f" tasks are pruned ({names})"
        )
    return status


@dataclass(frozen=True)
class Retention:
    """What finished tasks to keep; everything else finished is pruned.

    - `older_than_s`: a finished task is pruned this long after it finished (None: no
      age limit). `per_status` overrides it for some statuses, e.g.
      `{"failed": 90 * 86400}` keeps failed tasks longer (None there: no age limit for
      that status).
    - `keep_last`: at most this many finished tasks are kept, the most recently
      finished (None: no count limit).
    - `output_older_than_s`: the output of a task that finished this long ago is
      dropped, its row, attempts and events kept (None: output goes with its task).
    - `statuses`: which finished statuses this policy prunes at all (default: every
      one); `keep_last` counts among them.

    Pruning a task removes its row, attempts, events and output. Waiting and running
    tasks are never touched. The default, `Retention()`, keeps finished tasks 30 days.
    """

    older_than_s: float | None = DEFAULT_OLDER_THAN_S
    per_status: Mapping[Status | str, float | None] = field(default_factory=dict)
    keep_last: int | None = None
    output_older_than_s: float | None = None
    statuses: Iterable[Status | str] = FINISHED

    def __post_init__(self) -> None:
        # Normalised in place (the dataclass is frozen): the stores read exact types.
        statuses = frozenset(_finished_status("statuses", s) for s in self.statuses)
        if not statuses:
            raise ValueError("Retention.statuses is empty: the policy would prune nothing")
        per_status: dict[Status, float | None] = {}
        for key, age in self.per_status.items():
            status = _finished_status("per_status", key)
            if status not in statuses:
                raise ValueError(
                    f"Retention.per_status gives an age for {status.value!r}, which"
                    f" Retention.statuses leaves out"
                )
            per_status[status] = _seconds(f"per_status[{status.value!r}]", age)
        object.__setattr__(self, "statuses", statuses)
        object.__setattr__(self, "per_status", per_status)
        object.__setattr__(self, "older_than_s", _seconds("older_than_s", self.older_than_s))
        object.__setattr__(
            self, "output_older_than_s", _seconds("output_older_than_s", self.output_older_than_s)
        )
        keep = self.keep_last
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
            raise ValueError(f"Retention.keep_last must be an integer >= 0 or None, not {keep!r}")
        ages = [self.age_of(s) for s in statuses]
        if all(a is None for a in ages) and keep is None and self.output_older_than_s is None:
            raise ValueError(
                "this Retention prunes nothing: give older_than_s, per_status, keep_last"
                " or output_older_than_s"
            )

    @property
    def pruned_statuses(self) -> list[Status]:
        """`statuses`, normalised, in a stable order."""
        return sorted(Status(s) for s in self.statuses)

    def age_of(self, status: Status) -> float | None:
        """How long a finished task of `status` is kept (None: no age limit)."""
        if status in self.per_status:
            return self.per_status[status]
        return self.older_than_s

    def plan(self, now: float) -> PrunePlan:
        """The cut-offs of this policy at `now` (UNIX time)."""
        cutoffs: dict[Status, float | None] = {}
        for status in self.pruned_statuses:
            age = self.age_of(status)
            cutoffs[status] = None if age is None else now - age
        output_age = self.output_older_than_s
        return PrunePlan(
            cutoffs=cutoffs,
            keep_last=self.keep_last,
            output_cutoff=None if output_age is None else now - output_age,
        )

    def describe(self) -> str:
        """One line for logs and `--help`, e.g. 'finished tasks kept 30 d; failed 90 d'."""
        parts = [f"finished tasks kept {_age_text(self.older_than_s)}"]
        parts += [f"{Status(s).value} {_age_text(a)}" for s, a in sorted(self.per_status.items())]
        if self.keep_last is not None:
            parts.append(f"at most {self.keep_last}")
        if self.output_older_than_s is not None:
            parts.append(f"output kept {_age_text(self.output_older_than_s)}")
        if frozenset(self.statuses) != FINISHED:
            parts.append("only " + ", ".join(s.value for s in self.pruned_statuses))
        return "; ".join(parts)


def _age_text(age: float | None) -> str:
    if age is None:
        return "forever"
    for unit, size in (("d", DAY_S), ("h", 3600.0), ("min", 60.0)):
        if age >= size and age % size == 0:
            return f"{age / size:g} {unit}"
    return f"{age:g} s"


#: What a pool prunes unless told otherwise: finished tasks kept 30 days.
DEFAULT_RETENTION = Retention()


@dataclass(frozen=True)
class PrunePlan:
    """A `Retention` at one instant: what a store deletes.

    A finished task whose status is in `cutoffs` is pruned if it finished before its
    status's cut-off (None: no age limit) or is not among the `keep_last` most recently
    finished of those statuses (ties broken by id). Of the tasks kept, those that
    finished before `output_cutoff` lose their output."""

    cutoffs: Mapping[Status, float | None]
    keep_last: int | None
    output_cutoff: float | None

    @property
    def statuses(self) -> list[str]:
        return [s.value for s in self.cutoffs]

    def too_old(self, status: Status, finished_at: float) -> bool:
        cutoff = self.cutoffs.get(status)
        return cutoff is not None and finished_at < cutoff


#: (finished_at, id): tasks are ranked by when they finished, newest first; a kept
#: boundary says every task strictly before it is beyond `keep_last`.
Rank = tuple[float, int]

#: The boundary when `keep_last` is 0: every task is beyond it.
NOTHING_KEPT: Rank = (math.inf, 2**62)


def keep_boundary(newest_first: Sequence[Rank], keep_last: int | None) -> Rank | None:
    """The rank of the `keep_last`-th most recently finished task (None: nothing is
    beyond the count). `newest_first` needs only its first `keep_last` entries."""
    if keep_last is None:
        return None
    if keep_last == 0:
        return NOTHING_KEPT
    return newest_first[keep_last - 1] if len(newest_first) >= keep_last else None


@dataclass(frozen=True)
class FinishedTask:
    """What a plan needs to know of a finished task."""

    id: int
    status: Status
    finished_at: float
    has_output: bool


@dataclass(frozen=True)
class Selection:
    """What a plan prunes: whole tasks, and tasks that only lose their output."""

    tasks: list[int]
    output_only: list[int]


def select_prunable(finished: Iterable[FinishedTask], plan: PrunePlan) -> Selection:
    """Apply `plan` to finished tasks (any order); ids ascending."""
    mine = [t for t in finished if t.status in plan.cutoffs and t.status.is_terminal]
    ranks = sorted(((t.finished_at, t.id) for t in mine), reverse=True)
    boundary = keep_boundary(ranks, plan.keep_last)
    tasks, output_only = [], []
    for t in sorted(mine, key=lambda t: t.id):
        beyond = boundary is not None and (t.finished_at, t.id) < boundary
        if beyond or plan.too_old(t.status, t.finished_at):
            tasks.append(t.id)
        elif t.has_output and plan.output_cutoff is not None and t.finished_at < plan.output_cutoff:
            output_only.append(t.id)
    return Selection(tasks, output_only)


@dataclass(frozen=True)
class PruneReport:
    """What a prune removed (or, with `dry_run`, would remove)."""

    dry_run: bool = False
    tasks: int = 0  # tasks removed with their attempts, events and output
    attempts: int = 0
    events: int = 0
    output_chunks: int = 0  # of removed tasks and of tasks that only lost their output
    output_tasks: int = 0  # tasks kept whose output alone was dropped
    bytes_freed: int | None = None  # the database file shrank by this much, when known
    note: str = ""  # e.g. how to make an SQLite file shrink

    def plus(
        self, tasks: int, attempts: int, events: int, chunks: int, output_tasks: int
    ) -> PruneReport:
        return PruneReport(
            self.dry_run,
            self.tasks + tasks,
            self.attempts + attempts,
            self.events + events,
            self.output_chunks + chunks,
            self.output_tasks + output_tasks,
            self.bytes_freed,
            self.note,
        )

    def describe(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        text = (
            f"{verb} {self.tasks} finished tasks ({self.attempts} attempts, {self.events}"
            f" events, {self.output_chunks} output chunks)"
        )
        if self.output_tasks:
            text += f"; output dropped from {self.output_tasks} tasks kept"
        if self.bytes_freed is not None:
            text += f"; database file {_bytes_text(self.bytes_freed)} smaller"
        return text + (f"\n{self.note}" if self.note else "")


def _bytes_text(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


_AGE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|m|min|h|d|w)?\s*$", re.IGNORECASE)
_AGE_UNITS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": DAY_S, "w": 7 * DAY_S}


def parse_age(text: str) -> float:
    """Seconds from `7d`, `12h`, `30m`, `90s`, `2w` or a plain number of seconds."""
    match = _AGE.match(text)
    if match is None:
        raise ValueError(f"not an age: {text!r} (e.g. 7d, 12h, 30m, 90s)")
    number, unit = match.groups()
    return float(number) * _AGE_UNITS[(unit or "s").lower()]


async def keep_pruning(store: Store, policy: Retention, interval_s: float) -> None:
    """Prune `store` by `policy` every `interval_s`, forever. Nodes started together
    do not all prune at once (the first prune comes after a random part of the
    interval, at most a minute); when they do, their prunes share the work safely
    (each batch takes rows no other holds). A prune that fails is logged and tried
    again at the next interval: retention never stops a pool."""
    await anyio.sleep(random.uniform(0, min(interval_s, 60.0)))
    while True:
        try:
            report = await store.prune(policy)
        except StoreError as exc:  # StoreUnavailable included: next time
            log.warning("retention: prune failed, trying again in %g s: %s", interval_s, exc)
        else:
            if report.tasks or report.output_tasks:
                log.info("retention (%s): %s", policy.describe(), report.describe())
        await anyio.sleep(interval_s)
