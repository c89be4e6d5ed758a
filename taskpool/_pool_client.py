"""The client API a `TaskPool` offers in its own process (`submit`, `get`, `wait`,
`follow`, `cancel`, ...), by delegating to a `Client` of its own over the pool's
store. What a pool adds to a client's call is said by three hooks it defines: may
work be submitted now, new work was submitted (wake the claim loop), a task it may
run was asked to cancel (stop it at once, not at the next heartbeat)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from ._client import Client, StaleReport
from ._explain import WaitReason
from ._models import CancelMode, NodeInfo, Status, TaskEvent, TaskInfo, TaskSpec
from ._schedules import Schedule, ScheduledBy


class PoolClientAPI:
    """`Client`'s methods on a pool, over `self._client`; see the module docstring."""

    _client: Client

    def _check_open(self) -> None:
        """Raise `PoolClosed` unless work may be submitted through the pool now."""
        raise NotImplementedError

    def _work_submitted(self) -> None:
        """Work was submitted (or retried) through the pool: look for it at once."""
        raise NotImplementedError

    def _cancel_requested(self, info: TaskInfo) -> None:
        """A running task was asked to cancel: stop it at once if the pool runs it."""
        raise NotImplementedError

    async def submit(self, argv: Sequence[str], **options: Any) -> int:
        """`Client.submit`, waking this pool's claim loop; `PoolClosed` if it is not
        running (a `Client` submits with no pool at all)."""
        return await self.submit_spec(TaskSpec.build(argv, **options))

    async def submit_spec(self, spec: TaskSpec) -> int:
        """`Client.submit_spec`, waking this pool's claim loop."""
        self._check_open()
        task_id = await self._client.submit_spec(spec)
        self._work_submitted()
        return task_id

    async def submit_many(self, specs: Iterable[TaskSpec]) -> list[int]:
        """`Client.submit_many` (one transaction, all or nothing), waking the claim loop."""
        self._check_open()
        task_ids = await self._client.submit_many(specs)
        self._work_submitted()
        return task_ids

    async def retry(self, task_id: int) -> int:
        """`Client.retry`, waking this pool's claim loop."""
        self._check_open()
        task_id = await self._client.retry(task_id)
        self._work_submitted()
        return task_id

    async def cancel(
        self, task_id: int, mode: CancelMode | str = CancelMode.GRACEFUL, *, force: bool = False
    ) -> TaskInfo:
        """`Client.cancel`; a task this pool runs is stopped at once, not at the next
        heartbeat."""
        info = await self._client.cancel(task_id, mode, force=force)
        if info.status is Status.RUNNING:
            self._cancel_requested(info)
        return info

    async def get(self, task_id: int) -> TaskInfo:
        """`Client.get`: the task's current state (`TaskNotFound` if there is none)."""
        return await self._client.get(task_id)

    async def list_tasks(
        self,
        *,
        statuses: Sequence[Status] | None = None,
        project: str | None = None,
        limit: int = 100,
    ) -> list[TaskInfo]:
        """`Client.list_tasks`: tasks, newest first."""
        return await self._client.list_tasks(statuses=statuses, project=project, limit=limit)

    async def events(self, task_id: int) -> list[TaskEvent]:
        """`Client.events`: the task's recorded transitions, each with its reason."""
        return await self._client.events(task_id)

    async def nodes(self, *, alive: bool | None = None) -> list[NodeInfo]:
        """`Client.nodes`: pools registered with the store, oldest first."""
        return await self._client.nodes(alive=alive)

    async def stale(self, *, older_than_s: float = 60.0) -> StaleReport:
        """`Client.stale`: expired leases and silent nodes."""
        return await self._client.stale(older_than_s=older_than_s)

    async def why(self, task_id: int) -> list[WaitReason]:
        """`Client.why`: what holds a waiting task (empty: nothing, or not waiting)."""
        return await self._client.why(task_id)

    async def why_many(self, tasks: Iterable[TaskInfo]) -> dict[int, list[WaitReason]]:
        """`Client.why_many`: `why` for several tasks from one read."""
        return await self._client.why_many(tasks)

    async def wait(self, task_id: int, *, timeout_s: float | None = None) -> TaskInfo:
        """`Client.wait`: until the task is terminal (`TimeoutError` after `timeout_s`)."""
        return await self._client.wait(task_id, timeout_s=timeout_s)

    async def output(self, task_id: int) -> str:
        """`Client.output`: everything the task has printed so far, across attempts."""
        return await self._client.output(task_id)

    def follow(self, task_id: int) -> AsyncIterator[str]:
        """`Client.follow`: the task's output as it arrives, until it is terminal."""
        return self._client.follow(task_id)

    # -- schedules (every pool on the store fires them; these only read and edit) --
    async def add_schedule(self, name: str, argv: Sequence[str], **options: Any) -> Schedule:
        """`Client.add_schedule`."""
        return await self._client.add_schedule(name, argv, **options)

    async def get_schedule(self, name: str) -> Schedule:
        """`Client.get_schedule`."""
        return await self._client.get_schedule(name)

    async def list_schedules(self) -> list[Schedule]:
        """`Client.list_schedules`."""
        return await self._client.list_schedules()

    async def pause_schedule(self, name: str) -> Schedule:
        """`Client.pause_schedule`."""
        return await self._client.pause_schedule(name)

    async def resume_schedule(self, name: str) -> Schedule:
        """`Client.resume_schedule`."""
        return await self._client.resume_schedule(name)

    async def remove_schedule(self, name: str) -> None:
        """`Client.remove_schedule`."""
        await self._client.remove_schedule(name)

    async def next_fires(self, name: str, n: int = 5) -> list[float]:
        """`Client.next_fires`."""
        return await self._client.next_fires(name, n)

    async def schedule_runs(self, name: str, *, limit: int = 100) -> list[int]:
        """`Client.schedule_runs`."""
        return await self._client.schedule_runs(name, limit=limit)

    async def scheduled_by(self, task_ids: Iterable[int]) -> dict[int, ScheduledBy]:
        """`Client.scheduled_by`: the schedule and tick of each task a schedule submitted."""
        return await self._client.scheduled_by(task_ids)

    async def latest_schedule_runs(
        self, names: Iterable[str], n: int = 5
    ) -> dict[str, list[tuple[int, Status]]]:
        """`Client.latest_schedule_runs`."""
        return await self._client.latest_schedule_runs(names, n)
