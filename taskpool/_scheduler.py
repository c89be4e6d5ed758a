"""The schedules a store keeps, and the loop every pool runs to fire them.

`ScheduleStore` is the narrow interface each backend implements (SQLite and
PostgreSQL in `taskpool.stores._schedules_sql`, `MemorySchedules` here for
`MemoryStore`); `Store.schedules()` returns it. Its `fire_due` is the scheduler's
step: in one write transaction it takes the due schedules (PostgreSQL: `FOR UPDATE
SKIP LOCKED`, so two nodes never take the same one; SQLite: the file's write lock),
asks `taskpool._schedules.plan_step` what to do, submits, cancels and advances
`next_fire_at`, and records each run in `schedule_runs`, whose unique (schedule,
tick) key is the database's own guard against a tick fired twice. A node that dies
mid-step rolls back: the tick is still due, and the next step of any node fires it.
No leader is elected; every pool runs `run_scheduler`, and an idle one costs one
indexed read per interval.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import anyio

from ._errors import StoreUnavailable, TaskpoolError
from ._schedules import (
    Schedule,
    ScheduledBy,
    ScheduleError,
    fire_reason,
    new_schedule,
    plan_step,
)
from ._store import Store

log = logging.getLogger("taskpool.scheduler")

#: Schedules one step takes at most; the rest wait for the next step.
STEP_LIMIT = 100


class ScheduleNotFound(TaskpoolError, LookupError):
    """No schedule of that name."""


@dataclass(frozen=True, slots=True)
class Fired:
    """One tick a step handled: the run it submitted (None: `skip` overlap submitted
    nothing) and the previous run it cancelled, if any."""

    schedule: str
    tick: float
    task_id: int | None
    cancelled: int | None = None


def resumed(schedule: Schedule, now: float) -> Schedule:
    """`schedule` resumed at `now`: the ticks it slept through are not misfires."""
    next_fire_at = schedule.next_fire_at
    if next_fire_at <= now:
        next_fire_at = schedule.timing.after(now)
    return dataclasses.replace(schedule, paused=False, next_fire_at=next_fire_at)


class ScheduleStore(abc.ABC):
    """A store's schedules. Every method is one transaction."""

    @abc.abstractmethod
    async def add(self, schedule: Schedule, now: float) -> Schedule:
        """Store a new schedule (first tick after `now`); `ScheduleError` if the name is
        taken or the schedule is invalid."""

    @abc.abstractmethod
    async def get(self, name: str) -> Schedule:
        """One schedule, or `ScheduleNotFound`."""

    @abc.abstractmethod
    async def all(self) -> list[Schedule]:
        """Every schedule, by name."""

    @abc.abstractmethod
    async def set_paused(self, name: str, paused: bool, now: float) -> Schedule:
        """Pause or resume (see `resumed`)."""

    @abc.abstractmethod
    async def remove(self, name: str) -> None:
        """Delete the schedule (its runs stay); `ScheduleNotFound` if there is none."""

    @abc.abstractmethod
    async def runs(self, name: str, *, limit: int = 100) -> list[int]:
        """Ids of the tasks the schedule submitted, newest first."""

    @abc.abstractmethod
    async def scheduled_by(self, task_ids: Collection[int]) -> dict[int, ScheduledBy]:
        """The schedule and tick of each of `task_ids` a schedule submitted (the others
        are left out), in one query for all of them: a page of tasks asks once."""

    @abc.abstractmethod
    async def fire_due(self, now: float, *, limit: int = STEP_LIMIT) -> list[Fired]:
        """The scheduler step (see the module docstring)."""


class MemorySchedules(ScheduleStore):
    """`ScheduleStore` for `MemoryStore`: the same decisions, under one lock."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._schedules: dict[str, Schedule] = {}
        self._runs: dict[tuple[str, float], int] = {}
        self._run_of: dict[int, ScheduledBy] = {}  # `_runs` read the other way
        self._lock = anyio.Lock()

    async def add(self, schedule: Schedule, now: float) -> Schedule:
        async with self._lock:
            schedule = new_schedule(schedule, now)
            if schedule.name in self._schedules:
                raise ScheduleError(f"a schedule named {schedule.name!r} exists")
            self._schedules[schedule.name] = schedule
            return schedule

    async def get(self, name: str) -> Schedule:
        try:
            return self._schedules[name]
        except KeyError:
            raise ScheduleNotFound(f"no schedule {name!r}") from None

    async def all(self) -> list[Schedule]:
        return [self._schedules[name] for name in sorted(self._schedules)]

    async def set_paused(self, name: str, paused: bool, now: float) -> Schedule:
        async with self._lock:
            schedule = await self.get(name)
            if paused:
                schedule = dataclasses.replace(schedule, paused=True)
            else:
                schedule = resumed(schedule, now)
            self._schedules[name] = schedule
            return schedule

    async def remove(self, name: str) -> None:
        async with self._lock:
            await self.get(name)
            del self._schedules[name]

    async def runs(self, name: str, *, limit: int = 100) -> list[int]:
        ids = sorted((t for (s, _), t in self._runs.items() if s == name), reverse=True)
        return ids[:limit]

    async def scheduled_by(self, task_ids: Collection[int]) -> dict[int, ScheduledBy]:
        return {i: self._run_of[i] for i in task_ids if i in self._run_of}

    async def fire_due(self, now: float, *, limit: int = STEP_LIMIT) -> list[Fired]:
        async with self._lock:
            due = sorted(
                (s for s in self._schedules.values() if not s.paused and s.next_fire_at <= now),
                key=lambda s: s.next_fire_at,
            )[:limit]
            fired: list[Fired] = []
            for schedule in due:
                previous = None
                if schedule.last_task_id is not None:
                    statuses = await self.store.statuses([schedule.last_task_id])
                    previous = statuses.get(schedule.last_task_id)
                step = plan_step(schedule, previous, now)
                last_task_id = schedule.last_task_id
                for tick in step.ticks:
                    cancelled = None
                    if tick.action.cancel_previous and last_task_id is not None:
                        await self.store.request_cancel(last_task_id)
                        cancelled = last_task_id
                    task_id = None
                    if tick.action.submit:
                        reason = fire_reason(schedule.name, tick.tick)
                        task_id = await self.store.submit(schedule.spec, reason=reason)
                        self._runs[(schedule.name, tick.tick)] = task_id
                        self._run_of[task_id] = ScheduledBy(schedule.name, tick.tick)
                        last_task_id = task_id
                    fired.append(Fired(schedule.name, tick.tick, task_id, cancelled))
                self._schedules[schedule.name] = dataclasses.replace(
                    schedule,
                    next_fire_at=step.next_fire_at,
                    last_fire_at=step.last_fire_at,
                    last_task_id=last_task_id,
                )
            return fired


def schedules_of(store: Store) -> ScheduleStore:
    """The store's schedules; `StoreError`-like `ScheduleError` if it keeps none."""
    schedules = store.schedules()
    if schedules is None:
        raise ScheduleError(f"{type(store).__name__} keeps no schedules")
    return schedules


async def run_scheduler(
    store: Store,
    interval_s: float = 1.0,
    on_fired: Callable[[], None] | None = None,
    *,
    clock: Callable[[], float] = time.time,
) -> None:
    """Fire due schedules every `interval_s` until cancelled; `on_fired` after a step
    that submitted (the pool's claim loop wakes). A store that keeps no schedules, or
    an outage, costs nothing but a log line: the ticks stay due in the store."""
    schedules = store.schedules()
    if schedules is None:
        return
    while True:
        try:
            fired = await schedules.fire_due(clock())
        except StoreUnavailable as exc:
            log.warning("scheduler step failed, retried in %gs: %s", interval_s, exc)
            fired = []
        for f in fired:
            log.info("schedule %s fired at %s: task %s", f.schedule, f.tick, f.task_id)
        if on_fired is not None and any(f.task_id is not None for f in fired):
            on_fired()
        await anyio.sleep(interval_s)
