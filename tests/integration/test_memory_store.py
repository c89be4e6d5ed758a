"""`taskpool.testing.MemoryStore` runs a real pool, for users' own tests."""

from __future__ import annotations

from taskpool import Status
from taskpool.testing import MemoryStore
from tests.helpers import fast_pool, no_attempt_processes, running


async def test_a_pool_on_the_memory_store_runs_and_cancels_tasks() -> None:
    """Real processes, outcomes, output and events, with no file and no server."""
    store = MemoryStore()
    async with store, fast_pool(store, max_parallel=2) as pool:
        ok = await pool.submit(["echo", "in memory"])
        failing = await pool.submit(["sh", "-c", "exit 5"], max_attempts=2, retry_backoff_s=0)
        sleeper = await pool.submit(["sleep", "600"], template="t")
        assert (await pool.wait(ok)).status is Status.SUCCEEDED
        assert await pool.output(ok) == "in memory\n"
        done = await pool.wait(failing)
        assert (done.status, done.attempts_used) == (Status.FAILED, 2)
        await running(pool, sleeper)
        await pool.cancel(sleeper)
        assert (await pool.wait(sleeper)).status is Status.CANCELLED
        assert [e.to_status for e in await pool.events(ok)] == [
            Status.WAITING,
            Status.RUNNING,
            Status.SUCCEEDED,
        ]
    assert await no_attempt_processes()
