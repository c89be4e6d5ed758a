"""What is particular to the SQLite store: its claim window, migrations, durability.

The behaviour every backend shares is in test_store_contract.py; the writer thread
on its own in test_sqlite_writer.py."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import psutil
import pytest

from taskpool import Limits, NodeInfo, SQLiteStore, Status, StoreError, TaskSpec
from taskpool._rules import CLAIM_WINDOW
from taskpool.stores.sqlite import migrations
from tests.helpers import eventually, fast_pool, has_exited, running


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


async def test_a_node_registered_before_fair_share_was_recorded_reads_it_off(db: Path) -> None:
    """A node row written by the version before 0012 reads as not fair-sharing."""
    old = sqlite3.connect(db, isolation_level=None)
    try:
        old.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at REAL)")
        for version, sql in migrations():
            if version < 12:
                old.executescript(sql)
                old.execute("INSERT INTO schema_version VALUES (?, 0)", (version,))
        old.execute(
            "INSERT INTO nodes (id, host, pid, pid_started_at, started_at, heartbeat_at,"
            " max_parallel) VALUES ('old', 'host', 1, 0, 0, 0, 2)"
        )
    finally:
        old.close()
    async with SQLiteStore(db) as store:
        [node] = await store.list_nodes()
    assert (node.id, node.fair_share, node.project_limits) == ("old", None, {})


async def test_reopening_does_not_migrate_twice(db: Path) -> None:
    """Opening an up-to-date database again leaves its data and version alone."""
    async with SQLiteStore(db) as store:
        task = await store.submit(TaskSpec.build(["true"]))
    async with SQLiteStore(db) as store:
        assert (await store.get(task)).status is Status.WAITING


async def test_submits_are_fsynced_before_they_return(db: Path) -> None:
    """A submit's batch commits with synchronous=FULL; a claim's batch need not."""
    async with SQLiteStore(db, fsync_interval_s=3600) as store:
        assert store._writer is not None
        await store.register_node(_node())
        await store.submit(TaskSpec.build(["true"]))
        assert store._writer.full  # the commit that stored the task was fsynced
        await store.claim("n1", Limits(), lease_ttl_s=30)
        assert not store._writer.full  # within the interval: no fsync for the claim


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
                return has_exited(leader)

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
