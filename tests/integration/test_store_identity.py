"""An SQLite store notices when its file is no longer the one it opened (DESIGN.md,
invariant 13): deleted, its journal deleted, or another database renamed over it.

The pool and the CLI side of the same guarantee are in
tests/acceptance/test_vanished_db.py."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from taskpool import SQLiteStore, StoreError, StoreUnavailable, TaskSpec
from taskpool.testing import MemoryStore


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


async def test_the_file_it_opened_passes_whatever_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store opened by a relative path still knows its file after a chdir."""
    monkeypatch.chdir(tmp_path)
    async with SQLiteStore("tasks.db") as store:
        await store.submit(TaskSpec.build(["true"]))
        monkeypatch.chdir(tmp_path.parent)
        await store.check_identity()
        await store.submit(TaskSpec.build(["true"]))
        await store.check_identity()


async def test_a_deleted_file_is_fatal_and_refuses_every_later_call(db: Path) -> None:
    """Once the check finds the file deleted, reads and writes raise the same fatal
    StoreError naming the file, and closing still works."""
    async with SQLiteStore(db) as store:
        task_id = await store.submit(TaskSpec.build(["true"]))
        db.unlink()
        with pytest.raises(StoreError) as lost:
            await store.check_identity()
        assert not isinstance(lost.value, StoreUnavailable)
        assert f"{db} was deleted" in str(lost.value)
        for call in (
            store.check_identity(),
            store.submit(TaskSpec.build(["true"])),
            store.get(task_id),
        ):
            with pytest.raises(StoreError) as refused:
                await call
            assert str(refused.value) == str(lost.value)


async def test_nothing_reaches_a_database_renamed_over_the_file(tmp_path: Path) -> None:
    """A write made after another database was renamed over the file (before the check
    noticed) lands in the store's own file, never in the replacement, not even through
    the old `-wal` left at its name; the file that was moved away keeps every commit."""
    db, kept = tmp_path / "tasks.db", tmp_path / "moved-away.db"
    async with SQLiteStore(db) as store:
        first = await store.submit(TaskSpec.build(["echo", "before"]))
        replacement = tmp_path / "other.db"
        source, target = sqlite3.connect(db), sqlite3.connect(replacement)
        source.backup(target)
        source.close()
        target.close()
        digest = _digest(replacement)
        os.link(db, kept)  # the old file under another name, to look at afterwards
        os.replace(replacement, db)
        second = await store.submit(TaskSpec.build(["echo", "after"]))  # not noticed yet
        with pytest.raises(StoreError, match="was replaced by another file"):
            await store.check_identity()
    assert _digest(db) == digest
    async with SQLiteStore(db) as check:
        assert [t.id for t in await check.list_tasks()] == [first]
    async with SQLiteStore(kept) as check:
        assert [t.id for t in await check.list_tasks()] == [second, first]


def _other_process(db: Path, sql: str) -> str:
    """Run statements on `db` from another process; what the last one returned."""
    script = (
        "import sqlite3, sys\n"
        "conn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "rows = [conn.execute(s).fetchall() for s in sys.argv[2].split(';')]\n"
        "print(rows[-1])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(db), sql],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.strip()


async def test_a_journal_made_anew_by_another_process_is_left_alone(db: Path) -> None:
    """If its `-wal` and `-shm` were deleted and another process then committed through
    new ones, the store's close neither checkpoints its stale WAL into the database nor
    unlinks the new journal by name (SQLite's own close would do both): the other
    process's commit survives and the database stays sound."""
    async with SQLiteStore(db) as store:
        await store.submit(TaskSpec.build(["true"]))
        for suffix in ("-wal", "-shm"):
            Path(f"{db}{suffix}").unlink()
        _other_process(db, "CREATE TABLE mine (x); INSERT INTO mine VALUES (42)")
        with pytest.raises(StoreError, match=r"tasks\.db-wal was"):
            await store.check_identity()
    assert _other_process(db, "PRAGMA integrity_check") == "[('ok',)]"
    assert _other_process(db, "SELECT x FROM mine") == "[(42,)]"


async def test_a_store_with_nothing_to_check_passes() -> None:
    """The default check (MemoryStore keeps it) never raises."""
    async with MemoryStore() as store:
        await store.check_identity()
