"""`taskpool prune` and the worker's retention options, run as real processes."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from pathlib import Path

from taskpool import Limits, NodeInfo, Status, TaskSpec
from tests.acceptance.test_cli import cli, cli_json, worker
from tests.helpers import eventually, open_store
from tests.integration.test_store_contract import EXITED_0


async def _statuses(database: str) -> dict[int, Status]:
    async with open_store(database) as store:
        return {t.id: t.status for t in await store.list_tasks(limit=1000)}


async def test_prune_dry_run_then_prune_by_age_status_and_count(database: str) -> None:
    """A dry run says what a prune would remove and removes nothing; --status limits
    the prune to those statuses; --keep-last keeps the most recent; waiting tasks stay."""
    ok = [cli_json(database, "submit", "--", "true")["id"] for _ in range(3)]
    bad = [cli_json(database, "submit", "--", "false")["id"] for _ in range(2)]
    with worker(database, "--no-retention"):

        async def done() -> bool:
            statuses = await _statuses(database)
            return all(statuses[t].is_terminal for t in ok + bad)

        await eventually(done)
    async with open_store(database) as store:
        waiting = await store.submit(TaskSpec.build(["true"], not_before=time.time() + 3600))

    dry = cli_json(database, "prune", "--older-than", "0s", "--status", "failed", "--dry-run")
    assert dry["prune"]["dry_run"] is True
    assert (dry["prune"]["tasks"], dry["prune"]["events"]) == (2, 6)
    assert set(await _statuses(database)) == {*ok, *bad, waiting}
    text = cli(database, "prune", "--older-than", "0s", "--status", "failed").stdout
    assert text.startswith("removed 2 finished tasks (2 attempts, 6 events")
    assert set(await _statuses(database)) == {*ok, waiting}

    async with open_store(database) as store:
        finished = [await store.get(t) for t in ok]
    newest = max(finished, key=lambda t: (t.finished_at or 0.0, t.id)).id
    kept = cli_json(database, "prune", "--keep-last", "1")
    assert kept["prune"]["tasks"] == 2
    assert await _statuses(database) == {newest: Status.SUCCEEDED, waiting: Status.WAITING}


async def test_prune_refuses_a_policy_that_says_nothing_and_bad_ages(database: str) -> None:
    """Without a rule it says what to give; a malformed age is a usage error."""
    cli_json(database, "submit", "--", "true")
    nothing = cli(database, "prune", check=False)
    assert nothing.returncode == 1
    assert "say what to prune: --older-than AGE" in nothing.stderr
    bad = cli(database, "prune", "--older-than", "7 parsecs", check=False)
    assert bad.returncode == 2
    assert "not an age: '7 parsecs'" in bad.stderr


async def _fill(database: str, n: int) -> None:
    """`n` finished tasks with some output, written through the store as a pool would."""
    async with open_store(database) as store:
        now = time.time()
        node = f"filler-{now}"  # a new node each time: a node id is never reused
        await store.register_node(NodeInfo(node, "host", os.getpid(), now, now, now, None, n))
        await store.submit_many([TaskSpec.build(["true"]) for _ in range(n)])
        for claim in await store.claim(node, Limits(max_parallel=n), lease_ttl_s=60):
            await store.append_output(claim.task.id, claim.fence, ["x" * 2000])
            await store.finish(claim.task.id, claim.fence, EXITED_0)


def _auto_vacuum(database: str) -> int:
    with contextlib.closing(sqlite3.connect(database)) as conn:
        (mode,) = conn.execute("PRAGMA auto_vacuum").fetchone()
        return int(mode)


async def test_a_new_sqlite_file_shrinks_after_a_prune(db: Path) -> None:
    """A file created by this version is in incremental vacuum mode: pruning most of
    it makes it smaller, and the report says by how much."""
    database = str(db)
    await _fill(database, 2000)
    assert _auto_vacuum(database) == 2
    before = os.path.getsize(database)
    report = cli_json(database, "prune", "--older-than", "0s")["prune"]
    after = os.path.getsize(database)
    assert report["tasks"] == 2000
    assert report["note"] == ""
    assert after < before / 4
    assert report["bytes_freed"] == before - after


async def test_vacuum_converts_an_older_sqlite_file_once(db: Path) -> None:
    """A file created before incremental vacuum does not shrink on a prune, and the
    report says to run --vacuum; that shrinks it, and later prunes shrink it too."""
    database = str(db)
    with contextlib.closing(sqlite3.connect(database)) as conn:  # as older versions made it
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE older_version (x)")
    await _fill(database, 1000)
    assert _auto_vacuum(database) == 0
    before = os.path.getsize(database)
    report = cli_json(database, "prune", "--older-than", "0s")["prune"]
    assert report["tasks"] == 1000
    assert "taskpool prune --vacuum" in report["note"]
    assert os.path.getsize(database) >= before
    vacuumed = cli_json(database, "prune", "--vacuum")
    assert vacuumed["prune"] is None
    assert vacuumed["vacuum"]["done"] is True
    assert os.path.getsize(database) < before / 4
    assert _auto_vacuum(database) == 2
    await _fill(database, 1000)
    grown = os.path.getsize(database)
    again = cli_json(database, "prune", "--older-than", "0s")["prune"]
    assert (again["tasks"], again["note"]) == (1000, "")
    assert os.path.getsize(database) < grown / 4


async def test_a_worker_prunes_by_its_retention_options(database: str) -> None:
    """`worker --retention-days 0` prunes what it finished, in the background."""
    task = cli_json(database, "submit", "--", "true")["id"]
    with worker(database, "--retention-days", "0", "--retention-interval", "0.1"):

        async def pruned() -> bool:
            return task not in await _statuses(database)

        await eventually(pruned)
