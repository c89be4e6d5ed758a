"""The pool's own life: graceful shutdown, crash never hang, outages ridden out."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

import anyio
import psutil
import pytest

from taskpool import PoolClosed, PoolCrashed, SQLiteStore, Status, StoreUnavailable
from taskpool._store import Renewal
from tests.helpers import (
    eventually,
    fast_pool,
    has_exited,
    no_attempt_processes,
    open_store,
    reasons,
    running,
)

RESUMABLE = (
    "if [ -e {marker} ]; then echo resumed; exit 0; fi; touch {marker}; echo first; sleep 600"
)


async def test_shutdown_lets_running_tasks_finish_within_the_drain_time(database: str) -> None:
    """Leaving the context waits up to shutdown_drain_s for running tasks to finish."""
    async with fast_pool(database, shutdown_drain_s=30) as pool:
        task = await pool.submit(["sh", "-c", "sleep 0.3; echo done"])
        await running(pool, task)
    async with open_store(database) as store:
        info = await store.get(task)
        assert info.status is Status.SUCCEEDED
        assert [c.text for c in await store.read_output(task)] == ["done\n"]


async def test_shutdown_interrupts_and_the_next_boot_resumes(database: str, tmp_path: Path) -> None:
    """Past the drain time, tasks are stopped and re-queued without using an attempt."""
    script = RESUMABLE.format(marker=tmp_path / "ran-once")
    async with fast_pool(database, shutdown_drain_s=0.2) as pool:
        first_node = pool.node_id
        task = await pool.submit(["sh", "-c", script], max_attempts=1)
        await running(pool, task)
        stubborn = await pool.submit(["sh", "-c", "trap '' TERM; sleep 600"], max_attempts=1)
        await running(pool, stubborn)
    assert await no_attempt_processes()
    async with open_store(database) as store:
        info = await store.get(task)
        assert info.status is Status.WAITING
        assert info.attempts_used == 0  # shutdown is not the task's fault
        assert (await store.events(task))[-1].reason == (
            f"interrupted: node {first_node} shut down; process group sent SIGTERM"
        )
        stubborn_events = await store.events(stubborn)
        assert stubborn_events[-1].reason == (
            f"interrupted: node {first_node} shut down; "
            "SIGTERM ignored for 0.5 s, process group sent SIGKILL"
        )
        nodes = {n.id: n for n in await store.list_nodes()}
        assert nodes[first_node].stopped_at is not None
    async with fast_pool(database) as pool:
        assert pool.node_id != first_node  # a fresh identity per start
        done = await pool.wait(task)
        assert done.status is Status.SUCCEEDED
        assert done.attempts_used == 1
        assert await pool.output(task) == "first\nresumed\n"
        await pool.cancel(stubborn, force=True)


async def test_cancellation_from_outside_still_shuts_down_cleanly(database: str) -> None:
    """When the host cancels the pool's context, tasks are still stopped and re-queued."""
    with anyio.move_on_after(1):
        async with fast_pool(database) as pool:
            task = await pool.submit(["sleep", "600"])
            await running(pool, task)
            await anyio.sleep(600)
    assert await no_attempt_processes()
    async with open_store(database) as store:
        info = await store.get(task)
        assert info.status is Status.WAITING
        assert info.attempts_used == 0


class FailingStore(SQLiteStore):
    """A real store whose chosen method starts failing on demand."""

    def __init__(self, path: Path, method: str, error: Exception) -> None:
        super().__init__(path)
        self.method = method
        self.error = error
        self.failing = False
        self.failed_calls = 0

    def _maybe_fail(self, method: str) -> None:
        if self.failing and method == self.method:
            self.failed_calls += 1
            raise self.error

    async def renew_leases(self, node_id: str, lease_ttl_s: float) -> Renewal:
        self._maybe_fail("renew_leases")
        return await super().renew_leases(node_id, lease_ttl_s)

    async def append_output(self, task_id: int, fence: int, texts: Sequence[str]) -> None:
        self._maybe_fail("append_output")
        await super().append_output(task_id, fence, texts)


@pytest.mark.parametrize("method", ["renew_leases", "append_output"])
async def test_internal_error_crashes_the_pool_and_kills_every_child(db: Path, method: str) -> None:
    """The Airflow incident: an unexpected error leaves the context with it, children dead."""
    store = FailingStore(db, method, RuntimeError("injected failure"))
    with pytest.raises(PoolCrashed) as crash:
        async with fast_pool(store, heartbeat_interval_s=0.1) as pool:
            ids = [
                await pool.submit(["sh", "-c", "while true; do echo tick; sleep 0.05; done"]),
                await pool.submit(["sh", "-c", "sleep 600 & sleep 600 & wait"]),
            ]
            for task_id in ids:
                await running(pool, task_id)
            store.failing = True
            await anyio.sleep(600)  # the crash must cancel this, not wait it out
    assert isinstance(crash.value.__cause__, RuntimeError)
    assert str(crash.value.__cause__) == "injected failure"
    assert await no_attempt_processes()
    async with SQLiteStore(db) as check:
        for task_id in ids:  # released for the next boot, attempt not used up
            info = await check.get(task_id)
            assert info.status is Status.WAITING
            assert info.reason is not None
            assert info.reason.startswith("interrupted: pool crashed (RuntimeError")
        (node,) = await check.list_nodes()
        assert node.stopped_at is not None


async def test_store_outage_longer_than_tolerance_crashes(db: Path) -> None:
    """A store down for longer than the tolerance crashes the pool instead of hanging."""
    store = FailingStore(db, "renew_leases", StoreUnavailable("database is down"))
    with pytest.raises(PoolCrashed) as crash:
        async with fast_pool(store, heartbeat_interval_s=0.1, store_outage_tolerance_s=0.5) as pool:
            task = await pool.submit(["sleep", "600"])
            await running(pool, task)
            store.failing = True
            await anyio.sleep(600)
    assert isinstance(crash.value.__cause__, StoreUnavailable)
    assert store.failed_calls > 1  # it was retried before giving up
    assert await no_attempt_processes()


async def test_short_store_outage_is_ridden_out(db: Path) -> None:
    """A store outage shorter than the tolerance is retried; the task's result is written."""
    store = FailingStore(db, "append_output", StoreUnavailable("database is down"))
    async with fast_pool(store, store_outage_tolerance_s=30) as pool:
        store.failing = True
        task = await pool.submit(["sh", "-c", "echo before; sleep 0.5; echo after"])

        async def retried() -> bool:
            return store.failed_calls >= 3

        await eventually(retried)
        store.failing = False
        done = await pool.wait(task)
        assert done.status is Status.SUCCEEDED
        assert await pool.output(task) == "before\nafter\n"


async def test_submit_after_close_is_refused(db: Path) -> None:
    """A closed pool refuses new work with a clear error instead of losing it."""
    pool = fast_pool(db)
    async with pool:
        pass
    with pytest.raises(PoolClosed):
        await pool.submit(["true"])


async def test_events_name_every_transition(db: Path) -> None:
    """Each transition is recorded in order with its reason."""
    async with fast_pool(db) as pool:
        task = await pool.submit(["sh", "-c", "exit 7"])
        await pool.wait(task)
        assert await reasons(pool, task) == [
            "submitted",
            f"claimed by node {pool.node_id} (attempt 1 of 1)",
            "exited with code 7",
        ]
        events = await pool.events(task)
        assert [(e.from_status, e.to_status) for e in events] == [
            (None, Status.WAITING),
            (Status.WAITING, Status.RUNNING),
            (Status.RUNNING, Status.FAILED),
        ]


async def test_lease_expired_under_a_live_runner_is_fenced_and_reclaimed(db: Path) -> None:
    """If a node's own lease expires (its loop was blocked past the TTL), the task is
    rescued and may be claimed again by the same node: the stale runner kills its process
    and writes nothing, the new attempt runs, and the pool does not trip over the two."""
    # The reaper and the claim loop act before the next heartbeat: the two runners overlap.
    async with fast_pool(db, heartbeat_interval_s=1.0, reaper_interval_s=0.05) as pool:
        task = await pool.submit(["sh", "-c", "echo start; sleep 600"], max_attempts=2)
        first = await running(pool, task)
        old_process = psutil.Process(first.pid)
        with sqlite3.connect(db) as conn:  # the lease runs out behind the node's back
            conn.execute("UPDATE tasks SET lease_expires_at = 0 WHERE id = ?", (task,))

        async def reclaimed() -> bool:
            info = await pool.get(task)
            return info.status is Status.RUNNING and info.fence == 2 and info.pid is not None

        await eventually(reclaimed)

        async def old_process_gone() -> bool:
            return has_exited(old_process)

        await eventually(old_process_gone)
        events = await pool.events(task)
        assert [e.to_status for e in events] == [
            Status.WAITING,
            Status.RUNNING,
            Status.WAITING,  # rescued: the lease had expired
            Status.RUNNING,
        ]
        assert events[2].reason.startswith(f"owner node {pool.node_id} stopped heartbeating")
        await pool.cancel(task, force=True)
        assert (await pool.wait(task)).status is Status.CANCELLED
    assert await no_attempt_processes()
