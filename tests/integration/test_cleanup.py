"""Cleanup on every path: whatever ends an attempt, its slot frees, its status is
written with a reason, and no process of its group is left."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest

from taskpool import Status
from tests.helpers import (
    attempt_processes,
    eventually,
    fast_pool,
    no_attempt_processes,
    reasons,
    running,
)

#: Prints "ready" once both grandchildren are forked; a stall timeout counts from then.
GRANDCHILDREN = ["sh", "-c", "sleep 600 & sleep 600 & echo ready; wait"]

#: Every case runs in both containment modes: a cgroup per attempt, and process groups.
pytestmark = pytest.mark.usefixtures("both_containments")


async def test_subprocess_killed_from_outside_frees_its_template(database: str) -> None:
    """The Semaphore incident: a SIGKILLed process ends its task and its template runs again."""
    async with fast_pool(database) as pool:
        first = await pool.submit(["sleep", "600"], template="deploy")
        info = await running(pool, first)
        second = await pool.submit(["echo", "second"], template="deploy")
        assert (await pool.get(second)).status is Status.WAITING  # blocked by the template

        assert info.pid is not None
        os.kill(info.pid, signal.SIGKILL)

        done = await pool.wait(first)
        assert done.status is Status.FAILED
        assert done.exit_code == -signal.SIGKILL
        assert done.reason == "killed by SIGKILL"
        assert (await reasons(pool, first))[-1] == "killed by SIGKILL"
        after = await pool.wait(second)
        assert after.status is Status.SUCCEEDED
        assert await pool.output(second) == "second\n"
    assert await no_attempt_processes()


async def test_cancel_of_a_process_that_ignores_sigterm_escalates_to_sigkill(database: str) -> None:
    """Cancel sends SIGTERM, waits the grace period, then SIGKILLs; the slot frees."""
    async with fast_pool(database, max_parallel=1, kill_grace_s=0.5) as pool:
        stubborn = await pool.submit(
            ["sh", "-c", "trap '' TERM; echo ready; while true; do sleep 0.05; done"]
        )
        await running(pool, stubborn)
        await eventually(lambda: _has_output(pool, stubborn, "ready"))
        queued = await pool.submit(["true"])

        await pool.cancel(stubborn)
        done = await pool.wait(stubborn)
        assert done.status is Status.CANCELLED
        assert done.exit_code == -signal.SIGKILL
        assert done.reason == (
            "cancelled by request; SIGTERM ignored for 0.5 s, process group sent SIGKILL"
        )
        assert (await pool.wait(queued)).status is Status.SUCCEEDED
    assert await no_attempt_processes(stubborn)


async def test_forced_cancel_kills_at_once(database: str) -> None:
    """A forced cancel skips SIGTERM and the grace period."""
    async with fast_pool(database, kill_grace_s=60) as pool:
        task = await pool.submit(["sh", "-c", "trap '' TERM; sleep 600"])
        await running(pool, task)
        await pool.cancel(task, force=True)
        done = await pool.wait(task, timeout_s=30)  # far below the 60 s grace
        assert done.status is Status.CANCELLED
        assert done.reason == "cancelled by request; process group sent SIGKILL"
    assert await no_attempt_processes(task)


async def test_cancel_of_a_waiting_task_is_immediate(database: str) -> None:
    """A waiting task is cancelled without ever running."""
    async with fast_pool(database, max_parallel=1) as pool:
        blocker = await pool.submit(["sleep", "600"])
        await running(pool, blocker)
        waiting = await pool.submit(["echo", "never"])
        info = await pool.cancel(waiting)
        assert info.status is Status.CANCELLED
        assert info.reason == "cancelled while waiting"
        assert info.attempts_used == 0
        await pool.cancel(blocker, force=True)
        assert (await pool.wait(blocker)).status is Status.CANCELLED
        assert await pool.output(waiting) == ""


@pytest.mark.parametrize("how", ["cancel", "timeout", "stall"])
async def test_grandchildren_die_with_their_task(database: str, how: str) -> None:
    """`sh -c 'sleep 600 & sleep 600 & wait'` leaves no sleep behind, however it ends."""
    options: dict[str, float] = {}
    if how == "timeout":
        # Counts from the spawn: a margin for a loaded machine to fork the grandchildren.
        options["timeout_s"] = 2.0
    elif how == "stall":
        options["stall_timeout_s"] = 0.5
    async with fast_pool(database) as pool:
        task = await pool.submit(GRANDCHILDREN, **options)
        if how == "cancel":
            await running(pool, task)
            await eventually(lambda: _count_processes(task, 3))
            await pool.cancel(task)
        done = await pool.wait(task)
        # The grandchildren were forked before the task ended, whatever ended it.
        assert await pool.output(task) == "ready\n"
        expected = {
            "cancel": Status.CANCELLED,
            "timeout": Status.TIMED_OUT,
            "stall": Status.STALLED,
        }[how]
        assert done.status is expected
        assert done.reason is not None
        assert done.reason.endswith("process group sent SIGTERM")
    assert await no_attempt_processes(task)


async def test_background_children_of_an_exited_leader_are_killed(database: str) -> None:
    """A leader that exits leaving a daemon behind in its group does not leak it."""
    async with fast_pool(database) as pool:
        task = await pool.submit(["sh", "-c", "sleep 600 & echo started"])
        done = await pool.wait(task)
        assert done.status is Status.SUCCEEDED
        assert await pool.output(task) == "started\n"
    assert await no_attempt_processes(task)


async def test_escaped_setsid_descendant_is_killed_on_cancel(database: str) -> None:
    """A grandchild that left the process group with setsid is still killed on cancel."""
    async with fast_pool(database) as pool:
        task = await pool.submit(["sh", "-c", "setsid sleep 600 & sleep 600"])
        await running(pool, task)
        await eventually(lambda: _count_processes(task, 3))
        await pool.cancel(task)
        assert (await pool.wait(task)).status is Status.CANCELLED
    assert await no_attempt_processes(task)


async def test_timeout(database: str) -> None:
    """A task running past its timeout ends `timed_out`, with the reason recorded."""
    async with fast_pool(database) as pool:
        task = await pool.submit(["sleep", "600"], timeout_s=0.3)
        done = await pool.wait(task)
        assert done.status is Status.TIMED_OUT
        assert done.reason == "timed out after 0.3 s; process group sent SIGTERM"
        assert (await reasons(pool, task))[-1] == done.reason
    assert await no_attempt_processes(task)


async def test_stall(database: str) -> None:
    """A task silent for its stall timeout ends `stalled`."""
    async with fast_pool(database) as pool:
        task = await pool.submit(["sh", "-c", "echo hi; sleep 600"], stall_timeout_s=0.5)
        done = await pool.wait(task)
        assert done.status is Status.STALLED
        assert done.reason == "no output for 0.5 s; process group sent SIGTERM"
        assert await pool.output(task) == "hi\n"
    assert await no_attempt_processes(task)


async def test_steady_output_outlives_its_stall_timeout(database: str) -> None:
    """A task that prints steadily for longer than its stall timeout succeeds."""
    # At least 30 x 0.05 s = 1.5 s of output, more on a loaded machine, against a 1 s
    # stall timeout: 20 times the gap between two lines.
    script = "for i in $(seq 1 30); do echo tick $i; sleep 0.05; done"
    async with fast_pool(database) as pool:
        task = await pool.submit(["sh", "-c", script], stall_timeout_s=1.0)
        done = await pool.wait(task)
        assert done.status is Status.SUCCEEDED, done.reason
        assert (await pool.output(task)).splitlines()[-1] == "tick 30"


@pytest.mark.parametrize("case", ["missing program", "not executable", "missing cwd"])
async def test_spawn_failures_fail_clearly_and_the_pool_goes_on(
    database: str, tmp_path: Path, case: str
) -> None:
    """A task that cannot start fails with a clear message; the next task still runs."""
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(stat.S_IRUSR | stat.S_IWUSR)
    argv, cwd, expected = {
        "missing program": (
            ["no-such-program-xyz"],
            None,
            "could not start 'no-such-program-xyz': No such file or directory",
        ),
        "not executable": (
            [str(script)],
            None,
            f"could not start {str(script)!r}: Permission denied",
        ),
        "missing cwd": (
            ["true"],
            str(tmp_path / "gone"),
            f"could not start 'true': working directory {str(tmp_path / 'gone')!r}: "
            "No such file or directory",
        ),
    }[case]
    async with fast_pool(database, max_parallel=1) as pool:
        bad = await pool.submit(argv, cwd=cwd, max_attempts=3)
        good = await pool.submit(["echo", "next"])
        done = await pool.wait(bad)
        assert done.status is Status.FAILED
        assert done.reason == expected
        assert done.attempts_used == 1  # a spawn failure is not retried
        assert (await pool.wait(good)).status is Status.SUCCEEDED


async def test_failed_task_is_retried_with_backoff(database: str) -> None:
    """A failing task is re-queued while attempts remain, then fails for good."""
    async with fast_pool(database) as pool:
        task = await pool.submit(
            ["sh", "-c", "echo try; exit 3"], max_attempts=3, retry_backoff_s=0.05
        )
        done = await pool.wait(task)
        assert done.status is Status.FAILED
        assert done.attempts_used == 3
        assert await pool.output(task) == "try\ntry\ntry\n"
        assert await reasons(pool, task) == [
            "submitted",
            f"claimed by node {pool.node_id} (attempt 1 of 3)",
            "exited with code 3; retrying in 0.05 s (attempt 2 of 3)",
            f"claimed by node {pool.node_id} (attempt 2 of 3)",
            "exited with code 3; retrying in 0.1 s (attempt 3 of 3)",
            f"claimed by node {pool.node_id} (attempt 3 of 3)",
            "exited with code 3",
        ]


async def _has_output(pool: object, task_id: int, text: str) -> bool:
    from taskpool import TaskPool

    assert isinstance(pool, TaskPool)
    return text in await pool.output(task_id)


async def _count_processes(task_id: int, n: int) -> bool:
    return len(attempt_processes(task_id)) >= n
