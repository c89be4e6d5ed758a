"""Retention with a real pool: finished tasks pruned in the background while the pool
claims and runs tasks, and while another process prunes the same store."""

from __future__ import annotations

import time
from pathlib import Path

import anyio

from taskpool import Client, Retention, Status, TaskPool
from tests.helpers import eventually, running


async def test_a_pool_prunes_while_it_runs_tasks(database: str, tmp_path: Path) -> None:
    """The pool's retention loop (keep the 3 most recent) and another client pruning
    at the same time leave running and waiting tasks alone while a stream of tasks
    runs to its end; the running ones then finish as usual."""
    go = tmp_path / "go"
    hold = f"while [ ! -e {go} ]; do sleep 0.02; done"
    policy = Retention(older_than_s=None, keep_last=3)
    pool = TaskPool(database, max_parallel=4, retention=policy, retention_interval_s=0.05)
    async with pool, Client(database) as other:
        held = [await pool.submit(["sh", "-c", hold]) for _ in range(2)]
        for task in held:
            await running(pool, task)
        later = await pool.submit(["true"], not_before=time.time() + 3600)
        quick = [await pool.submit(["sh", "-c", f"echo {i}"]) for i in range(30)]
        prunes_alongside = 0

        async def prune_alongside() -> None:
            nonlocal prunes_alongside
            while True:
                await other.store.prune(policy)  # any error fails the test
                prunes_alongside += 1
                await anyio.sleep(0.01)

        async def settled() -> bool:
            waiting = await pool.list_tasks(statuses=[Status.WAITING])
            finished = await pool.list_tasks(statuses=[s for s in Status if s.is_terminal])
            return [t.id for t in waiting] == [later] and len(finished) == 3

        async with anyio.create_task_group() as tg:
            tg.start_soon(prune_alongside)
            await eventually(settled)
            tg.cancel_scope.cancel()
        kept = await pool.list_tasks(statuses=[s for s in Status if s.is_terminal])
        assert prunes_alongside > 0
        assert all(t.id in quick for t in kept)
        assert all(t.status is Status.SUCCEEDED for t in kept)
        for task in held:
            info = await pool.get(task)
            assert info.status is Status.RUNNING
            assert [e.to_status for e in await pool.events(task)] == [
                Status.WAITING,
                Status.RUNNING,
            ]
        assert (await pool.get(later)).status is Status.WAITING
        go.touch()
        for task in held:
            assert (await pool.wait(task)).status is Status.SUCCEEDED
