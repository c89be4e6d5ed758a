"""What is particular to the SQLite store: its claim window, migrations, writer thread.

The behaviour every backend shares is in test_store_contract.py."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Awaitable
from pathlib import Path

import anyio
import psutil
import pytest

from taskpool import Limits, NodeInfo, SQLiteStore, Status, StoreError, TaskSpec
from taskpool.stores import sqlite as sqlite_store
from taskpool.stores._common import CLAIM_WINDOW
from taskpool.stores.sqlite import migrations
from tests.helpers import eventually, fast_pool, running


def _node(node_id: str = "n1") -> NodeInfo:
    now = time.time()
    return NodeInfo(node_id, "host", os.getpid(), now, now, now, None, 4)


async def test_one_claim_looks_past_a_full_window_of_one_template(db: Path) -> None:
    """A single claim finds a runnable task behind more than a window of one template."""
    async with SQLiteStore(db) as store:
        await store.register_node(_node())
        burst = [
            await store.submit(TaskSpec.build(["true"], template="burst"))
            for _ in range(CLAIM_WINDOW + 10)
        ]
        late = await store.submit(TaskSpec.build(["true"], template="other"))
        claims = await store.claim("n1", Limits(max_parallel=2), lease_ttl_s=30)
        assert sorted(c.task.id for c in claims) == [burst[0], late]


async def test_migrations_produce_the_declared_schema(db: Path, tmp_path: Path) -> None:
    """The migrated database equals applying every shipped migration to an empty one."""
    async with SQLiteStore(db):
        pass
    reference = sqlite3.connect(tmp_path / "reference.db")
    for _, sql in migrations():
        reference.executescript(sql)
    migrated = sqlite3.connect(db)
    try:
        query = "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
        expected = set(reference.execute(query).fetchall())
        actual = set(migrated.execute(query).fetchall())
        versions = [v for (v,) in migrated.execute("SELECT version FROM schema_version")]
    finally:
        reference.close()
        migrated.close()
    schema_version_table = {r for r in actual if r[1] == "schema_version"}
    assert actual - schema_version_table == expected
    assert versions == [v for v, _ in migrations()]


async def test_reopening_does_not_migrate_twice(db: Path) -> None:
    """Opening an up-to-date database again leaves its data and version alone."""
    async with SQLiteStore(db) as store:
        task = await store.submit(TaskSpec.build(["true"]))
    async with SQLiteStore(db) as store:
        assert (await store.get(task)).status is Status.WAITING


async def test_a_write_cancelled_before_it_starts_never_runs(db: Path) -> None:
    """Cancelling a queued write withdraws it; a write already running completes."""
    gate = threading.Event()
    ran: list[str] = []

    def blocking(conn: sqlite3.Connection) -> None:
        ran.append("first")
        gate.wait(10)

    def second(conn: sqlite3.Connection) -> None:
        ran.append("second")

    async with SQLiteStore(db) as store:
        async with anyio.create_task_group() as tg:
            tg.start_soon(store._write, blocking)

            async def started() -> bool:
                return ran == ["first"]

            await eventually(started)
            with anyio.move_on_after(0.1) as scope:
                await store._write(second)  # queued behind the blocked batch
            assert scope.cancelled_caught
            gate.set()
        await store.submit(TaskSpec.build(["true"]))  # the writer goes on
    assert ran == ["first"]


async def test_a_failing_operation_does_not_fail_its_batch_neighbours(db: Path) -> None:
    """In one group commit, an operation that raises is rolled back alone."""
    gate, holding = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        holding.set()
        gate.wait(60)  # a safety net: the test opens the gate

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO nodes (id) VALUES ('half-written')")  # violates NOT NULL
        raise AssertionError("unreachable")

    async with SQLiteStore(db) as store:
        results: dict[str, object] = {}

        async def run(name: str, coro: Awaitable[object]) -> None:
            try:
                results[name] = await coro
            except Exception as exc:
                results[name] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "hold", store._write(hold))

            async def writer_busy() -> bool:
                return holding.is_set()

            await eventually(writer_busy)  # the next three queue up behind it: one batch
            tg.start_soon(run, "a", store.submit(TaskSpec.build(["echo", "a"])))
            tg.start_soon(run, "broken", store._write(broken))
            tg.start_soon(run, "b", store.submit(TaskSpec.build(["echo", "b"])))
            assert store._writer is not None
            writer = store._writer

            async def three_queued() -> bool:
                return len(writer._queue) == 3

            await eventually(three_queued)
            gate.set()
        assert isinstance(results["broken"], StoreError)
        assert "NOT NULL" in str(results["broken"])
        assert [t.spec.argv for t in await store.list_tasks()] == [("echo", "b"), ("echo", "a")]
        assert await store.list_nodes() == []


async def test_submits_are_fsynced_before_they_return(db: Path) -> None:
    """A submit's batch commits with synchronous=FULL; a claim's batch need not."""
    async with SQLiteStore(db, fsync_interval_s=3600) as store:
        assert store._writer is not None
        await store.register_node(_node())
        await store.submit(TaskSpec.build(["true"]))
        assert store._writer._full  # the commit that stored the task was fsynced
        await store.claim("n1", Limits(), lease_ttl_s=30)
        assert not store._writer._full  # within the interval: no fsync for the claim


class _WriterClock:
    """Stands in for the `time` module in taskpool.stores.sqlite: the writer's monotonic
    clock moves only when the test says so, so "within the interval" is a decision the
    test controls, not a race with the scheduler; wall-clock time stays real."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return time.time()


async def test_the_pools_writes_are_fsynced_within_the_interval(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-durable commit is made durable once fsync_interval_s has passed even if the
    writer then goes idle: it fsyncs the WAL itself."""
    clock = _WriterClock()
    monkeypatch.setattr(sqlite_store, "time", clock)
    wal = f"{db}-wal"
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        real_fsync(fd)
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))

    async with SQLiteStore(db, fsync_interval_s=0.2) as store:
        writer = store._writer
        assert writer is not None
        await store.register_node(_node())
        await store.submit(TaskSpec.build(["true"]))
        monkeypatch.setattr(os, "fsync", spy)
        await store.claim("n1", Limits(), lease_ttl_s=30)
        # No writer time has passed since the submit's fsync: the claim was not synced.
        assert not writer._full
        assert writer._unsynced
        assert synced == []

        clock.now += 0.2  # the interval is up; nothing else is queued

        async def fsynced() -> bool:
            return wal in synced and not writer._unsynced

        await eventually(fsynced)


async def test_a_database_locked_by_another_process_is_ridden_out(db: Path) -> None:
    """Another process holds SQLite's write lock while a task ends: the pool waits and
    writes the result once the lock is released."""
    async with fast_pool(db) as pool:
        go = db.parent / "go"
        script = f"while [ ! -e {go} ]; do sleep 0.01; done; echo done"
        task = await pool.submit(["sh", "-c", script])
        info = await running(pool, task)
        assert info.pid is not None
        leader = psutil.Process(info.pid)
        other = sqlite3.connect(db, isolation_level=None)
        try:
            other.execute("BEGIN EXCLUSIVE")  # nobody else may write now
            go.touch()

            async def ended() -> bool:  # the task ends meanwhile; its result must wait
                return not leader.is_running() or leader.status() == psutil.STATUS_ZOMBIE

            await eventually(ended)
            assert other.execute("SELECT status FROM tasks WHERE id = ?", (task,)).fetchone() == (
                "running",
            )
            other.execute("COMMIT")
        finally:
            other.close()
        done = await pool.wait(task)
        assert done.status is Status.SUCCEEDED
        assert await pool.output(task) == "done\n"


async def test_a_corrupt_database_file_is_a_clear_error(db: Path) -> None:
    """A file that is not a database makes the pool refuse to start, loudly, at once."""
    db.write_bytes(b"this is not an SQLite database\x00" * 100)
    with pytest.raises(StoreError, match="file is not a database"):
        async with fast_pool(db):
            pass
