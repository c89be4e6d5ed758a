"""The schedule half of `Client`: add, list, pause, resume and remove the store's
schedules, read their next fire times and their runs. Every pool on the store fires
them (`taskpool._scheduler`); a client only edits them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ._models import Status, TaskSpec
from ._scheduler import ScheduleStore, schedules_of
from ._schedules import Misfire, Overlap, Schedule, ScheduledBy, Timing
from ._store import Store


class ScheduleMethods:
    """Mixed into `Client`: needs its `store`."""

    store: Store
    #: The clock a new or resumed schedule's next tick is counted from (tests set it).
    schedule_clock: Callable[[], float] = staticmethod(time.time)

    @property
    def _schedules(self) -> ScheduleStore:
        return schedules_of(self.store)

    async def add_schedule(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cron: str | None = None,
        tz: str = "UTC",
        every_s: float | None = None,
        overlap: Overlap | str = Overlap.SKIP,
        misfire: Misfire | str = Misfire.RUN_ONCE,
        misfire_bound: int = 10,
        grace_s: float = 60.0,
        paused: bool = False,
        **task_options: Any,
    ) -> Schedule:
        """Store a schedule that submits `argv` (with `task_options`, as `submit`'s) on
        every tick of the cron expression `cron` in time zone `tz`, or every `every_s`
        seconds; its first tick is the first after now. `overlap`: what a tick does
        while the previous run still waits or runs (`skip`, `queue`,
        `cancel_previous`). `misfire`: what happens to ticks missed while no pool ran
        or more than `grace_s` late (`run_once`, `run_all` up to `misfire_bound`, or
        `skip`). `ScheduleError` (an `InvalidTask`) for bad input or a taken name."""
        schedule = Schedule(
            name=name,
            timing=Timing(cron=cron, tz=tz, every_s=every_s),
            spec=TaskSpec.build(argv, **task_options),
            overlap=Overlap(overlap),
            misfire=Misfire(misfire),
            misfire_bound=misfire_bound,
            grace_s=grace_s,
            paused=paused,
        )
        return await self._schedules.add(schedule, self.schedule_clock())

    async def get_schedule(self, name: str) -> Schedule:
        """One schedule (`ScheduleNotFound` if there is none)."""
        return await self._schedules.get(name)

    async def list_schedules(self) -> list[Schedule]:
        """Every schedule, by name, with its `next_fire_at`."""
        return await self._schedules.all()

    async def pause_schedule(self, name: str) -> Schedule:
        """Stop firing the schedule until `resume_schedule`."""
        return await self._schedules.set_paused(name, True, self.schedule_clock())

    async def resume_schedule(self, name: str) -> Schedule:
        """Fire the schedule again from its next tick after now: ticks that fell while
        it was paused are not misfires."""
        return await self._schedules.set_paused(name, False, self.schedule_clock())

    async def remove_schedule(self, name: str) -> None:
        """Delete the schedule; its runs stay (`ScheduleNotFound` if there is none)."""
        await self._schedules.remove(name)

    async def next_fires(self, name: str, n: int = 5) -> list[float]:
        """The schedule's next `n` fire times (UNIX seconds)."""
        return (await self._schedules.get(name)).next_fires(n)

    async def schedule_runs(self, name: str, *, limit: int = 100) -> list[int]:
        """Ids of the tasks the schedule submitted, newest first."""
        return await self._schedules.runs(name, limit=limit)

    async def scheduled_by(self, task_ids: Iterable[int]) -> dict[int, ScheduledBy]:
        """For each of these tasks a schedule submitted, that schedule's name and the
        tick it fired (the other tasks are left out; all of them on a store that keeps
        no schedules). One query for all: ask once for a page of tasks."""
        schedules = self.store.schedules()
        if schedules is None:
            return {}
        return await schedules.scheduled_by(set(task_ids))

    async def latest_schedule_runs(
        self, names: Iterable[str], n: int = 5
    ) -> dict[str, list[tuple[int, Status]]]:
        """Each named schedule's newest `n` runs with their status, newest first (a
        run whose task was pruned is left out); the statuses in one query for all."""
        runs = {name: await self._schedules.runs(name, limit=n) for name in names}
        statuses = await self.store.statuses({i for ids in runs.values() for i in ids})
        return {
            name: [(i, statuses[i]) for i in ids if i in statuses] for name, ids in runs.items()
        }
