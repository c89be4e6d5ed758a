"""A store whose file is no longer the one it opened is a fatal store error, never a
silent split brain (DESIGN.md, invariant 13).

A real worker runs a real task; the test pulls the SQLite file away under it (or
renames another database over it) and checks that the worker crashes with a message
naming the file, kills the task's processes, does not hang, and writes nothing into
a file that took the old one's place.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from taskpool import SQLiteStore, Status, TaskSpec
from tests.acceptance.test_cli import cli, cli_json
from tests.acceptance.worker_process import Worker, recorded, sleeper
from tests.helpers import eventually


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy_database(db: Path, to: Path) -> None:
    """A consistent copy of a live database (SQLite's backup), closed: no -wal beside it."""
    source, target = sqlite3.connect(db), sqlite3.connect(to)
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()


@pytest.mark.parametrize("vanish", ["db", "db-wal-shm", "directory", "renamed-over"])
async def test_a_worker_whose_sqlite_file_vanishes_crashes_and_kills_its_task(
    tmp_path: Path, vanish: str
) -> None:
    """rm of the database (alone, with its -wal and -shm, or its whole directory), or
    another database renamed over it: the worker exits 1 naming the file, the running
    task's processes are dead, and a replacement file is left exactly as it was."""
    folder = tmp_path / "data"
    folder.mkdir()
    db = folder / "tasks.db"
    pidfile = tmp_path / "pids"  # outside the folder, which may be removed
    async with SQLiteStore(db) as store:
        task_id = await store.submit(TaskSpec.build(sleeper(pidfile)))
    # Lease 1.5 s: a heartbeat (and so a check of the file) every 0.5 s.
    with Worker(db, "--lease-ttl", "1.5", stderr=tmp_path / "worker.err") as worker:
        task = await recorded(pidfile)
        try:

            async def spawn_recorded() -> bool:
                async with SQLiteStore(db) as store:
                    info = await store.get(task_id)
                assert info.status is Status.RUNNING, info
                return info.pid == task.pgid

            await eventually(spawn_recorded)
            if vanish == "db":
                db.unlink()
            elif vanish == "db-wal-shm":
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{db}{suffix}").unlink()
            elif vanish == "directory":
                shutil.rmtree(folder)
            else:
                replacement = folder / "other.db"
                _copy_database(db, replacement)
                digest = _digest(replacement)
                os.replace(replacement, db)
            code = await worker.exit_code()
        finally:
            task.kill()
        err = worker.stderr
    assert code == 1, err
    assert "PoolCrashed" in err, err
    assert "caused by StoreError" in err, err
    assert "StoreUnavailable" not in err, err  # fatal at once, not an outage ridden out
    how = "was replaced by another file" if vanish == "renamed-over" else "was deleted"
    assert f"{db} {how}" in err, err
    assert await task.gone()
    if vanish == "renamed-over":
        # Nothing of the worker's reached the file that took its place: not its bytes,
        # and not through the old `-wal` left at its name (it would be applied on open).
        assert _digest(db) == digest
        async with SQLiteStore(db) as store:
            info = await store.get(task_id)
            (node,) = await store.list_nodes()
        assert (info.status, info.fence) == (Status.RUNNING, 1), info
        assert node.stopped_at is None, node
    else:
        # A later submit on the path starts a database of its own, with no trace of
        # the one that was deleted (no stale journal applied to it).
        folder.mkdir(exist_ok=True)
        new_id = cli_json(str(db), "submit", "--", "true")["id"]
        assert new_id == 1
        assert [t["id"] for t in cli_json(str(db), "ls")] == [new_id]
        assert "no nodes" in cli(str(db), "nodes").stdout
