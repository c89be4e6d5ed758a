"""The pool's public surface: submit validation, follow, list, wait, cross-process cancel."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskpool import InvalidTask, Status, TaskNotFound
from tests.helpers import eventually, fast_pool, no_attempt_processes, open_store, running


async def test_bad_input_is_refused_and_nothing_is_stored(database: str) -> None:
    """Invalid submissions raise InvalidTask, store nothing, and the pool goes on."""
    async with fast_pool(database) as pool:
        with pytest.raises(InvalidTask, match="argv must be a list of strings"):
            await pool.submit("echo hi")
        with pytest.raises(InvalidTask, match="contains a NUL byte"):
            await pool.submit(["echo", "a\x00b"])
        with pytest.raises(TypeError):
            await pool.submit(["true"], no_such_option=1)
        assert await pool.list_tasks() == []
        task = await pool.submit(["echo", "fine"])
        assert (await pool.wait(task)).status is Status.SUCCEEDED


async def test_follow_streams_output_until_the_task_ends(database: str, tmp_path: Path) -> None:
    """follow() yields output while the task runs and stops when it is terminal."""
    go = tmp_path / "go"
    script = f"echo one; while [ ! -e {go} ]; do sleep 0.01; done; echo two; echo three"
    async with fast_pool(database) as pool:
        task = await pool.submit(["sh", "-c", script])
        seen = []
        async for text in pool.follow(task):
            seen.append(text)
            if len(seen) == 1:  # the first line arrives while the task still runs
                assert (await pool.get(task)).status is Status.RUNNING
                go.touch()  # only now may it go on and end
        assert "".join(seen) == "one\ntwo\nthree\n"
        assert (await pool.get(task)).status is Status.SUCCEEDED


async def test_list_filters_by_status_and_project(database: str) -> None:
    """list_tasks filters by status and project, newest first."""
    async with fast_pool(database, max_parallel=1) as pool:
        a = await pool.submit(["true"], project="a")
        await pool.wait(a)
        blocker = await pool.submit(["sleep", "600"], project="b")
        await running(pool, blocker)
        c = await pool.submit(["true"], project="b")
        assert [t.id for t in await pool.list_tasks()] == [c, blocker, a]
        assert [t.id for t in await pool.list_tasks(project="b")] == [c, blocker]
        assert [t.id for t in await pool.list_tasks(statuses=[Status.WAITING])] == [c]
        await pool.cancel(blocker, force=True)
        await pool.wait(c)


async def test_wait_with_a_timeout_raises(database: str) -> None:
    """wait(timeout_s=...) raises TimeoutError and leaves the task alone."""
    async with fast_pool(database) as pool:
        task = await pool.submit(["sleep", "600"])
        with pytest.raises(TimeoutError):
            await pool.wait(task, timeout_s=0.2)
        assert (await pool.get(task)).status is Status.RUNNING
        await pool.cancel(task, force=True)


async def test_unknown_task_is_a_clear_error(database: str) -> None:
    """Asking about a task that does not exist raises TaskNotFound."""
    async with fast_pool(database) as pool:
        with pytest.raises(TaskNotFound, match="no task 42"):
            await pool.get(42)
        with pytest.raises(TaskNotFound):
            await pool.cancel(42)


async def test_cancel_requested_from_another_process_reaches_the_owner(database: str) -> None:
    """A cancel written to the store by someone else (an operator's CLI) stops the task
    at the owner's next heartbeat."""
    async with fast_pool(database, heartbeat_interval_s=0.1) as pool:
        task = await pool.submit(["sleep", "600"])
        await running(pool, task)
        async with open_store(database) as operator:
            info = await operator.request_cancel(task)
            assert info.cancel_requested == "graceful"
        done = await pool.wait(task)
        assert done.status is Status.CANCELLED
        assert done.reason == "cancelled by request; process group sent SIGTERM"
    assert await no_attempt_processes(task)


async def test_retried_task_that_is_cancelled_between_attempts_stays_cancelled(
    database: str,
) -> None:
    """A task waiting for its retry can be cancelled; it never runs again."""
    async with fast_pool(database) as pool:
        task = await pool.submit(["sh", "-c", "exit 1"], max_attempts=5, retry_backoff_s=600)

        async def waiting_for_retry() -> bool:
            info = await pool.get(task)
            return info.attempts_used == 1 and info.status is Status.WAITING

        await eventually(waiting_for_retry)
        info = await pool.cancel(task)
        assert info.status is Status.CANCELLED
        assert info.attempts_used == 1
