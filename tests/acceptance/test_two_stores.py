"""Two unrelated stores on one host, with colliding task ids on purpose: a pool of one
that is killed and restarted (or settled by a live sibling) never touches the other's
processes."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import psutil
import pytest

from taskpool import Status, TaskSpec
from tests.acceptance.test_restart import _pid_of, _submit_all, pool_process
from tests.helpers import eventually, fast_pool, has_exited, open_store
from tests.postgres import fresh_postgres_database


@pytest.fixture(params=["sqlite", "postgres"])
async def two_databases(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[str, str]]:
    """Two empty, unrelated databases of one backend."""
    if request.param == "sqlite":
        yield str(tmp_path / "a" / "tasks.db"), str(tmp_path / "b" / "tasks.db")
    else:
        async with fresh_postgres_database() as a, fresh_postgres_database() as b:
            yield a, b


@pytest.mark.usefixtures("without_guard")
@pytest.mark.parametrize("settled_by", ["next boot", "live sibling"])
async def test_a_restarting_pool_never_kills_another_stores_task(
    two_databases: tuple[str, str], tmp_path: Path, settled_by: str
) -> None:
    """Store A's pool is SIGKILLed while its task 1 (fence 1) runs; store B's task 1
    (fence 1) runs too. Settling A's orphan (at A's next boot, or by a live sibling's
    reaper) kills A's leftover and leaves B's task to run to success."""
    db_a, db_b = two_databases
    release = tmp_path / "release"
    (a_task,) = await _submit_all(db_a, [TaskSpec.build(["sleep", "600"])])
    (b_task,) = await _submit_all(
        db_b,
        [TaskSpec.build(["sh", "-c", f"while [ ! -e {release} ]; do sleep 0.05; done"])],
    )
    assert a_task == b_task == 1  # the collision the identity must survive

    # Long leases: starting the pool process below blocks this event loop for a while.
    async with fast_pool(db_b, max_parallel=1, lease_ttl_s=60) as pool_b:
        b_pid = await _pid_of(db_b, b_task)
        b_leader = psutil.Process(b_pid)
        with pool_process(db_a, "1") as (proc, dead_node):
            a_leftover = psutil.Process(await _pid_of(db_a, a_task))
            if settled_by == "live sibling":
                sibling = fast_pool(db_a, max_parallel=1, lease_ttl_s=60)
                await sibling.__aenter__()
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        if settled_by == "next boot":
            sibling = fast_pool(db_a, max_parallel=1, lease_ttl_s=60)
            await sibling.__aenter__()
        try:

            async def a_settled() -> bool:
                return (await sibling.get(a_task)).status is Status.LOST

            await eventually(a_settled)
            events = await sibling.events(a_task)
            settled = events[-1]
            assert settled.node_id == dead_node
            assert "killed leftover" in settled.reason
        finally:
            await sibling.__aexit__(None, None, None)
        assert has_exited(a_leftover)
        # B's task was never touched: it is still the same running process ...
        assert b_leader.is_running()
        assert b_leader.status() != psutil.STATUS_ZOMBIE
        assert (await pool_b.get(b_task)).status is Status.RUNNING
        release.touch()
        # ... and it runs to success.
        info = await pool_b.wait(b_task)
    assert info.status is Status.SUCCEEDED, info.reason


async def test_each_store_has_its_own_lasting_identity(two_databases: tuple[str, str]) -> None:
    """A store's id is created with its schema, is the same on every open, and differs
    between two stores."""
    ids = []
    for database in (*two_databases, two_databases[0]):
        async with open_store(database) as store:
            ids.append(store.store_id)
    assert len(ids[0]) == 32
    assert ids[0] == ids[2] != ids[1]


async def test_a_postgres_database_replaced_under_a_pool_crashes_it(tmp_path: Path) -> None:
    """Another database answering at the pool's address (simulated by changing the
    store id, as a restore of another store would) is a fatal store error: the pool
    crashes and kills its task instead of writing into a stranger's state."""
    import asyncpg

    from taskpool import PoolCrashed, StoreError
    from tests.helpers import running

    async with fresh_postgres_database() as dsn:
        with pytest.raises(PoolCrashed) as crash:
            async with fast_pool(dsn, lease_ttl_s=1.5) as pool:
                task = await pool.submit(["sleep", "600"])
                leader = psutil.Process((await running(pool, task)).pid or 0)
                conn = await asyncpg.connect(dsn)
                try:
                    await conn.execute("UPDATE taskpool_store_identity SET store_id = 'other'")
                finally:
                    await conn.close()
                await anyio.sleep(600)  # the crash must cut this short
        assert isinstance(crash.value.__cause__, StoreError)
        assert "no longer the one opened" in str(crash.value.__cause__)
        assert has_exited(leader)


async def test_a_client_frozen_inside_a_transaction_cannot_block_a_rescue() -> None:
    """A node frozen while it holds a task row locked (to the server: a session idle in
    a transaction) is cut off after the store's command timeout, so the rescue that
    SKIP LOCKED had to pass over gets the task."""
    import asyncpg

    from taskpool import Limits, PostgresStore, TaskSpec

    async with fresh_postgres_database() as dsn:
        frozen = PostgresStore(dsn, command_timeout_s=1.0)
        rescuer = PostgresStore(dsn)
        async with frozen, rescuer:
            task = await frozen.submit(TaskSpec.build(["true"], max_attempts=2))
            await frozen.claim("gone", Limits(), lease_ttl_s=0.01)
            assert frozen._pool is not None
            conn = await frozen._pool.acquire()
            transaction = conn.transaction()
            await transaction.start()
            await conn.execute("SELECT 1 FROM taskpool_tasks WHERE id = $1 FOR UPDATE", task)
            # ... and then nothing, as a frozen process would send nothing.

            async def rescued() -> bool:
                return [t.id for t in await rescuer.rescue_expired()] == [task]

            await eventually(rescued)
            # The server cut it off: releasing it fails one way or another, depending on
            # whether asyncpg has processed the termination yet.
            with contextlib.suppress(asyncpg.InterfaceError, asyncpg.InternalClientError):
                await frozen._pool.release(conn)
