"""Blocking rules against a real store and real processes: limits count only live
attempts, blocked tasks never hold up unrelated ones, order is priority then FIFO."""

from __future__ import annotations

from taskpool import Status, TaskPool
from tests.helpers import eventually, fast_pool, running


async def _statuses(pool: TaskPool, ids: list[int]) -> list[Status]:
    return [(await pool.get(i)).status for i in ids]


async def _settle(pool: TaskPool, ids: list[int], expected: list[Status]) -> None:
    """Wait until the tasks reach the expected statuses (checked again after claims settle)."""

    async def check() -> bool:
        return await _statuses(pool, ids) == expected

    await eventually(check)


async def _start_order(pool: TaskPool, ids: list[int]) -> list[int]:
    started = []
    for task_id in ids:
        events = await pool.events(task_id)
        first_run = next(e for e in events if e.to_status is Status.RUNNING)
        started.append((first_run.id, task_id))
    return [task_id for _, task_id in sorted(started)]


async def test_node_max_parallel(database: str) -> None:
    """No more than max_parallel tasks run at once on a node."""
    async with fast_pool(database, max_parallel=2) as pool:
        ids = [await pool.submit(["sleep", "600"]) for _ in range(3)]
        await _settle(pool, ids, [Status.RUNNING, Status.RUNNING, Status.WAITING])
        await pool.cancel(ids[0], force=True)
        await _settle(pool, ids, [Status.CANCELLED, Status.RUNNING, Status.RUNNING])
        for task_id in ids[1:]:
            await pool.cancel(task_id, force=True)


async def test_project_limit_does_not_block_other_projects(database: str) -> None:
    """A project at its limit waits while a later task of another project starts."""
    async with fast_pool(database, max_parallel=4, project_limits={"infra": 1}) as pool:
        a = await pool.submit(["sleep", "600"], project="infra")
        await running(pool, a)
        b = await pool.submit(["sleep", "600"], project="infra")
        c = await pool.submit(["sleep", "600"], project="web")
        await running(pool, c)
        assert (await pool.get(b)).status is Status.WAITING
        await pool.cancel(a, force=True)
        await running(pool, b)
        for task_id in (b, c):
            await pool.cancel(task_id, force=True)


async def test_non_parallel_template_without_head_of_line_blocking(database: str) -> None:
    """Tasks of a busy template wait; a later task of another template starts meanwhile."""
    async with fast_pool(database, max_parallel=4) as pool:
        first = await pool.submit(["sleep", "600"], template="deploy")
        await running(pool, first)
        second = await pool.submit(["sleep", "600"], template="deploy")
        other = await pool.submit(["sleep", "600"], template="backup")
        await running(pool, other)
        assert (await pool.get(second)).status is Status.WAITING
        await pool.cancel(first, force=True)
        await running(pool, second)
        for task_id in (second, other):
            await pool.cancel(task_id, force=True)


async def test_parallel_template_runs_side_by_side(database: str) -> None:
    """Tasks of a template that allows parallel runs run together."""
    async with fast_pool(database, max_parallel=4) as pool:
        ids = [
            await pool.submit(["sleep", "600"], template="lint", template_parallel=True)
            for _ in range(3)
        ]
        for task_id in ids:
            await running(pool, task_id)
            await pool.cancel(task_id, force=True)


async def test_resource_lock_blocks_every_task_naming_it(database: str) -> None:
    """A lock held by a running task blocks every other task that names it, and only those."""
    async with fast_pool(database, max_parallel=4) as pool:
        holder = await pool.submit(["sleep", "600"], locks=["prod-db"])
        await running(pool, holder)
        blocked_a = await pool.submit(["sleep", "600"], locks=["prod-db"], project="a")
        blocked_b = await pool.submit(["sleep", "600"], locks=["prod-db", "cache"], project="b")
        free = await pool.submit(["sleep", "600"], locks=["cache-2"])
        await running(pool, free)
        assert await _statuses(pool, [blocked_a, blocked_b]) == [Status.WAITING] * 2
        await pool.cancel(holder, force=True)
        await running(pool, blocked_a)  # FIFO: the earlier of the two takes the lock
        assert (await pool.get(blocked_b)).status is Status.WAITING
        await pool.cancel(blocked_a, force=True)
        await running(pool, blocked_b)
        for task_id in (blocked_b, free):
            await pool.cancel(task_id, force=True)


async def test_priority_then_submit_order_within_a_blocking_group(database: str) -> None:
    """Within one template, higher priority starts first, then submit order."""
    async with fast_pool(database, max_parallel=1) as pool:
        gate = await pool.submit(["sleep", "600"], template="t")
        await running(pool, gate)
        low_1 = await pool.submit(["true"], template="t", priority=0)
        low_2 = await pool.submit(["true"], template="t", priority=0)
        high = await pool.submit(["true"], template="t", priority=5)
        await pool.cancel(gate, force=True)
        for task_id in (low_1, low_2, high):
            assert (await pool.wait(task_id)).status is Status.SUCCEEDED
        assert await _start_order(pool, [low_1, low_2, high]) == [high, low_1, low_2]


async def test_many_blocked_tasks_do_not_hide_a_runnable_one(database: str) -> None:
    """More blocked tasks than one claim window looks at still cannot hide a runnable task."""
    async with fast_pool(database, max_parallel=2) as pool:
        gate = await pool.submit(["sleep", "600"], template="busy")
        await running(pool, gate)
        blocked = [await pool.submit(["true"], template="busy") for _ in range(200)]
        late = await pool.submit(["echo", "late"], template="other")
        assert (await pool.wait(late)).status is Status.SUCCEEDED
        assert (await pool.get(blocked[0])).status is Status.WAITING
        await pool.cancel(gate, force=True)
        for task_id in blocked:
            await pool.cancel(task_id)
