"""Schedules, decided without I/O: when a schedule's ticks fall, which of them fire
after the scheduler was away (misfire), and what a tick does to a run still going
(overlap).

A schedule fires the same `TaskSpec` on every tick of a cron expression (in a time
zone, parsed by `cronsim`) or of a fixed interval. The store keeps each schedule's
`next_fire_at`; a node's scheduler step (`taskpool._scheduler`) reads the due ones in
a write transaction, asks `plan_fires` and `overlap_action` here what to do, submits
and advances `next_fire_at` in that same transaction, so a tick fires once whatever
the number of nodes and however they die.

Time zones and daylight saving time follow Debian's cron, as cronsim does: a time
that does not exist (spring forward, 02:30 in Europe/Berlin on the last Sunday of
March) fires at the first minute after the gap (03:00); a time that happens twice
(fall back) fires once, at its first occurrence, unless the expression names every
hour or a step of minutes (`*/30 * * * *` fires in both).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from ._errors import InvalidTask
from ._models import Status, TaskSpec

#: How many due ticks a misfire scan walks one by one before it takes the newest
#: ones from `now` backwards instead (a minutely schedule after a week's outage).
SCAN_CAP = 10_000


class Overlap(enum.StrEnum):
    """What a tick does while the schedule's previous run is still waiting or running."""

    SKIP = "skip"  # submit nothing for this tick
    QUEUE = "queue"  # submit anyway: the new run waits its turn
    CANCEL_PREVIOUS = "cancel_previous"  # cancel the previous run, then submit


class Misfire(enum.StrEnum):
    """What the scheduler does with ticks it missed (nobody ran it, or it was late by
    more than the schedule's grace)."""

    RUN_ONCE = "run_once"  # one run for all of them, at the newest
    RUN_ALL = "run_all"  # a run for each, the newest `misfire_bound` of them
    SKIP = "skip"  # none; wait for the next tick


class ScheduleError(InvalidTask):
    """A schedule that cannot be stored: bad cron expression, time zone, interval,
    policy or name; or a name already taken."""


@dataclass(frozen=True, slots=True)
class Timing:
    """When a schedule's ticks fall: a cron expression in time zone `tz`, or every
    `every_s` seconds. Ticks are UNIX times."""

    cron: str | None = None
    tz: str = "UTC"
    every_s: float | None = None

    def checked(self) -> Timing:
        if (self.cron is None) == (self.every_s is None):
            raise ScheduleError("a schedule needs a cron expression or an interval, not both")
        if self.every_s is not None and not (math.isfinite(self.every_s) and self.every_s > 0):
            raise ScheduleError(f"the interval must be > 0 seconds, got {self.every_s!r}")
        zone = self._zone()
        if self.cron is not None:
            try:
                CronSim(self.cron, datetime.fromtimestamp(0, zone))
            except CronSimError as exc:
                raise ScheduleError(f"bad cron expression {self.cron!r}: {exc}") from None
        return self

    def _zone(self) -> ZoneInfo:
        try:
            return ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise ScheduleError(f"unknown time zone {self.tz!r}") from None

    def describe(self) -> str:
        if self.cron is not None:
            return f"cron {self.cron!r} ({self.tz})"
        return f"every {self.every_s:g}s"

    def after(self, t: float) -> float:
        """The first tick strictly after `t` (an interval counts from `t`)."""
        return next(self._forward(t))

    def ticks_from(self, first: float) -> Iterator[float]:
        """`first` (a tick), then every tick after it, in order."""
        yield first
        yield from self._forward(first)

    def _forward(self, t: float) -> Iterator[float]:
        if self.every_s is not None:
            k = 1
            while True:
                yield t + k * self.every_s
                k += 1
        assert self.cron is not None
        for moment in CronSim(self.cron, datetime.fromtimestamp(t, self._zone())):
            yield moment.timestamp()

    def newest_until(self, now: float, n: int) -> list[float]:
        """The newest `n` cron ticks at or before `now`, oldest first."""
        assert self.cron is not None
        # Cron ticks fall on whole minutes; backwards, cronsim starts strictly before
        # its start: the minute after `now`'s own.
        start = math.floor(now / 60) * 60 + 60
        found: list[float] = []
        for moment in CronSim(self.cron, datetime.fromtimestamp(start, self._zone()), True):
            if len(found) == n:
                break
            found.append(moment.timestamp())
        return found[::-1]


@dataclass(frozen=True, slots=True)
class Due:
    """The ticks due at `now` from `next_fire_at`: how many (None: more than
    `SCAN_CAP`), the newest `keep` of them, and the first tick after `now`."""

    count: int | None
    newest: list[float]
    next_fire_at: float


def due_ticks(timing: Timing, next_fire_at: float, now: float, *, keep: int) -> Due:
    """The ticks in [`next_fire_at`, `now`] (`next_fire_at` is a tick)."""
    if next_fire_at > now:
        return Due(0, [], next_fire_at)
    if timing.every_s is not None:
        count = math.floor((now - next_fire_at) / timing.every_s) + 1
        last = count - 1
        newest = [next_fire_at + k * timing.every_s for k in range(max(0, count - keep), count)]
        return Due(count, newest, next_fire_at + (last + 1) * timing.every_s)
    window: deque[float] = deque(maxlen=keep)
    for scanned, tick in enumerate(timing.ticks_from(next_fire_at)):
        if tick > now:
            return Due(scanned, list(window), tick)
        if scanned == SCAN_CAP:
            break
        window.append(tick)
    return Due(None, timing.newest_until(now, keep), timing.after(now))


@dataclass(frozen=True, slots=True)
class FirePlan:
    """What one scheduler step does for a schedule: the ticks to fire (oldest first),
    how many due ticks it leaves without a run, and the new `next_fire_at`."""

    fire: list[float]
    dropped: int | None  # None: more than SCAN_CAP
    next_fire_at: float


def plan_fires(
    timing: Timing,
    next_fire_at: float,
    now: float,
    *,
    misfire: Misfire,
    bound: int,
    grace_s: float,
) -> FirePlan:
    """The ticks to fire at `now`. On time (one due tick, late by at most `grace_s`)
    every policy fires it. Otherwise the scheduler missed ticks: `RUN_ONCE` fires the
    newest, `RUN_ALL` the newest `bound`, `SKIP` only the newest if it is within
    `grace_s` of `now` (it is not missed itself). Either way `next_fire_at` moves past
    `now`, so the same ticks are never planned again."""
    keep = max(1, bound) if misfire is Misfire.RUN_ALL else 1
    due = due_ticks(timing, next_fire_at, now, keep=keep)
    if not due.newest:
        return FirePlan([], 0, due.next_fire_at)
    newest = due.newest[-1]
    if misfire is Misfire.SKIP and now - newest > grace_s:
        fire: list[float] = []
    else:
        fire = due.newest
    dropped = None if due.count is None else due.count - len(fire)
    return FirePlan(fire, dropped, due.next_fire_at)


@dataclass(frozen=True, slots=True)
class OverlapAction:
    """What a tick does: cancel the previous run first, and/or submit a new one."""

    cancel_previous: bool
    submit: bool


ACTIVE = frozenset({Status.WAITING, Status.RUNNING})


def overlap_action(previous: Status | None, overlap: Overlap) -> OverlapAction:
    """A tick's action given the status of the schedule's previous run (None: it has
    none, or it was pruned)."""
    if previous not in ACTIVE:
        return OverlapAction(cancel_previous=False, submit=True)
    if overlap is Overlap.SKIP:
        return OverlapAction(cancel_previous=False, submit=False)
    return OverlapAction(cancel_previous=overlap is Overlap.CANCEL_PREVIOUS, submit=True)


def fire_reason(name: str, tick: float) -> str:
    """The first event's reason of a run: names its schedule and tick (UTC)."""
    at = datetime.fromtimestamp(tick, ZoneInfo("UTC")).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"schedule {name} at {at}"


# -- the schedule itself ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Schedule:
    """A schedule as stored: what to submit, when, and its policies and state."""

    name: str
    timing: Timing
    spec: TaskSpec
    overlap: Overlap = Overlap.SKIP
    misfire: Misfire = Misfire.RUN_ONCE
    misfire_bound: int = 10  # RUN_ALL fires at most this many missed ticks at once
    grace_s: float = 60.0  # a tick fired this late is still on time
    paused: bool = False
    next_fire_at: float = 0.0
    last_fire_at: float | None = None
    last_task_id: int | None = None
    created_at: float = 0.0

    def checked(self) -> Schedule:
        if not self.name or not self.name.isprintable() or len(self.name) > 200:
            raise ScheduleError(f"bad schedule name {self.name!r}")
        if self.misfire_bound < 1:
            raise ScheduleError("misfire_bound must be >= 1")
        if not (math.isfinite(self.grace_s) and self.grace_s >= 0):
            raise ScheduleError("grace_s must be >= 0")
        return dataclasses.replace(
            self,
            timing=self.timing.checked(),
            spec=self.spec.checked(),
            overlap=Overlap(self.overlap),
            misfire=Misfire(self.misfire),
        )

    def next_fires(self, n: int) -> list[float]:
        """The next `n` ticks from `next_fire_at` (paused or not)."""
        ticks = self.timing.ticks_from(self.next_fire_at)
        return [next(ticks) for _ in range(n)]


@dataclass(frozen=True, slots=True)
class ScheduledBy:
    """The schedule that submitted a task, and the tick it fired it for."""

    schedule: str
    tick: float


def new_schedule(schedule: Schedule, now: float) -> Schedule:
    """`schedule` checked, created at `now`, first tick after `now`."""
    checked = schedule.checked()
    return dataclasses.replace(
        checked, created_at=now, next_fire_at=checked.timing.after(now), last_fire_at=None
    )


def spec_to_json(spec: TaskSpec) -> dict[str, Any]:
    """A spec as JSON-ready data (sets as sorted lists), for the schedule's row."""
    data: dict[str, Any] = {}
    for f in dataclasses.fields(TaskSpec):
        if not f.init:
            continue
        value = getattr(spec, f.name)
        if isinstance(value, frozenset | set):
            value = sorted(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Mapping):
            value = dict(value)
        data[f.name] = value
    return data


def spec_from_json(data: Mapping[str, Any]) -> TaskSpec:
    """The spec `spec_to_json` wrote; fields a newer taskpool added are left out."""
    known = {f.name: f for f in dataclasses.fields(TaskSpec) if f.init}
    values = {k: v for k, v in data.items() if k in known}
    values["argv"] = tuple(values["argv"])
    if "after" in values:
        values["after"] = tuple(values["after"])
    for key in ("pass_env", "locks"):
        if key in values:
            values[key] = frozenset(values[key])
    return TaskSpec(**values)


@dataclass(frozen=True, slots=True)
class TickAction:
    """One tick's part of a step: its time, and what it does."""

    tick: float
    action: OverlapAction


@dataclass(frozen=True, slots=True)
class Step:
    """What a scheduler step does for one due schedule, in order; then the schedule's
    new `next_fire_at` and `last_fire_at`."""

    ticks: list[TickAction]
    dropped: int | None
    next_fire_at: float
    last_fire_at: float | None


def plan_step(schedule: Schedule, previous: Status | None, now: float) -> Step:
    """The misfire plan, then each tick's overlap action; a tick that submits makes
    its run the previous (waiting) one for the ticks after it."""
    plan = plan_fires(
        schedule.timing,
        schedule.next_fire_at,
        now,
        misfire=schedule.misfire,
        bound=schedule.misfire_bound,
        grace_s=schedule.grace_s,
    )
    ticks = []
    for tick in plan.fire:
        action = overlap_action(previous, schedule.overlap)
        ticks.append(TickAction(tick, action))
        if action.submit:
            previous = Status.WAITING
    last = plan.fire[-1] if plan.fire else schedule.last_fire_at
    return Step(ticks, plan.dropped, plan.next_fire_at, last)
