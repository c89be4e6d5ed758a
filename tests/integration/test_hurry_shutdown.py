"""TaskPool.hurry_shutdown: a shutdown without drain or grace, never without the
shutdown (DESIGN.md, invariant 13). The CLI's second signal is tested as a real
process in tests/acceptance/test_signals.py."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import psutil
import pytest

from taskpool import SQLiteStore, Status
from tests.helpers import SAFETY_TIMEOUT_S, eventually, fast_pool, has_exited, running

#: Ignores SIGTERM, so only SIGKILL ends it: a grace period would be waited out in full.
STUBBORN = ["sh", "-c", "trap '' TERM; while :; do sleep 1; done"]


async def _group_gone(leader: psutil.Process) -> bool:
    """Wait until the task's leader (taken while alive) and its whole group are gone."""

    async def check() -> bool:
        try:
            os.killpg(leader.pid, 0)
        except ProcessLookupError:
            return has_exited(leader)
        return False

    await eventually(check, timeout_s=10)
    return True


@pytest.mark.parametrize("phase", ["drain", "grace"])
async def test_hurrying_a_shutdown_in_progress_kills_at_once_and_hands_back(
    db: Path, phase: str
) -> None:
    """Called while leaving the context waits out a 600 s drain (or a 600 s grace after
    an ignored SIGTERM), it SIGKILLs the groups at once and the tasks go back to waiting
    with their attempt refunded."""
    drain_s = 600 if phase == "drain" else 0
    # A graceful stop under way keeps its reason when hurried; a draining task gets one.
    expected = (
        "shut down (hurried); process group sent SIGKILL"
        if phase == "drain"
        else "shut down; process group sent SIGKILL"
    )
    pool = fast_pool(db, max_parallel=2, shutdown_drain_s=drain_s, kill_grace_s=600)
    with anyio.fail_after(SAFETY_TIMEOUT_S):  # a safety net: waiting out 600 s fails
        async with anyio.create_task_group() as tg, pool:
            ids = [await pool.submit(STUBBORN) for _ in range(2)]
            leaders = [psutil.Process((await running(pool, i)).pid) for i in ids]

            async def hurry_once_blocked() -> None:
                # Runs only once leaving the context is blocked in its drain or grace.
                await anyio.wait_all_tasks_blocked()
                pool.hurry_shutdown()

            tg.start_soon(hurry_once_blocked)
    for leader in leaders:
        assert await _group_gone(leader)
    async with SQLiteStore(db) as store:
        for task_id in ids:
            info = await store.get(task_id)
            assert (info.status, info.attempts_used) == (Status.WAITING, 0), info
            assert info.reason is not None
            assert info.reason.endswith(expected), info.reason


async def test_hurrying_a_running_pool_only_makes_its_shutdown_quick(db: Path) -> None:
    """Called before leaving the context, it stops nothing yet; leaving then skips the
    600 s drain and the 600 s grace, and hands the task back."""
    pool = fast_pool(db, shutdown_drain_s=600, kill_grace_s=600)
    with anyio.fail_after(SAFETY_TIMEOUT_S):
        async with pool:
            task_id = await pool.submit(STUBBORN)
            leader = psutil.Process((await running(pool, task_id)).pid)
            pool.hurry_shutdown()
            await anyio.wait_all_tasks_blocked()
            info = await pool.get(task_id)
            assert info.status is Status.RUNNING
            assert leader.is_running()
    assert await _group_gone(leader)
    async with SQLiteStore(db) as store:
        info = await store.get(task_id)
    assert (info.status, info.attempts_used) == (Status.WAITING, 0), info
    assert info.reason is not None
    assert info.reason.endswith("shut down; process group sent SIGKILL"), info.reason
