"""Submits with a deduplication key (`TaskSpec.unique_key`), in the submit's own
transaction, on both SQL stores.

While a task with the key is waiting or running, a submit returns that task's id
and stores nothing (`on_conflict="reject"`), or cancels a waiting one, naming the
new task, and is stored (`"replace_waiting"`; a running one still rejects): the
pure choice is `keyed_conflict`. The database has the last word: a partial unique
index on the key over waiting and running tasks (migrations 0007 / 0011). SQLite
writes one transaction at a time, so what the submit reads holds until it
commits; on PostgreSQL the insert skips on that index (`ON CONFLICT DO NOTHING`)
when another node's submit got there first, and the submit reads again.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .._decisions import keyed_conflict, plan_replace
from .._errors import StoreError
from .._models import SubmitResult, TaskSpec
from . import _postgres_ops as pg_ops
from . import _sqlite_ops as sqlite_ops
from ._common import task_state

if TYPE_CHECKING:
    import asyncpg

#: How many times a PostgreSQL submit reads the key's holder again after losing a
#: race for it: each loss means another submit committed a task with the key, so
#: this many in a row means something is wrong, not busy.
MAX_KEY_RACES = 100

_LIVE = "status IN ('waiting', 'running')"


def sqlite_submit(
    conn: sqlite3.Connection, specs: Sequence[TaskSpec], now: float, reason: str = "submitted"
) -> list[int]:
    """Checked specs stored in order in the caller's write transaction (keyed ones
    one by one, the others in multi-row inserts)."""
    if not any(spec.unique_key is not None for spec in specs):
        return [SubmitResult(i) for i in sqlite_ops.insert_tasks(conn, specs, now, reason=reason)]
    return [_sqlite_one(conn, spec, now, reason) for spec in specs]


def _sqlite_one(conn: sqlite3.Connection, spec: TaskSpec, now: float, reason: str) -> SubmitResult:
    key = spec.unique_key
    if key is None:
        return SubmitResult(sqlite_ops.insert_tasks(conn, [spec], now, reason=reason)[0])
    live = conn.execute(f"SELECT * FROM tasks WHERE unique_key = ? AND {_LIVE}", (key,)).fetchone()
    existing, replaced = keyed_conflict(task_state(live) if live else None, spec.on_conflict)
    if existing is not None:
        return SubmitResult(existing, created=False)
    if replaced is not None:
        # The id the insert below gets (AUTOINCREMENT: one past the largest ever
        # used), known now so that the replaced task's reason can name it.
        new_id = conn.execute(
            "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'tasks'), 0),"
            " coalesce((SELECT max(id) FROM tasks), 0)) + 1"
        ).fetchone()[0]
        sqlite_ops.end(conn, plan_replace(task_state(live), new_id, key, now))
    [task_id] = sqlite_ops.insert_tasks(conn, [spec], now, reason=reason)
    assert replaced is None or task_id == new_id, "the id drawn is the id inserted"
    return SubmitResult(task_id, replaced=replaced)


async def postgres_submit(
    conn: asyncpg.Connection, spec: TaskSpec, reason: str = "submitted"
) -> SubmitResult:
    """One checked spec stored in the caller's transaction."""
    [dependencies] = await pg_ops.dependency_plans(conn, [spec])
    key = spec.unique_key
    if key is None:
        task_id = await pg_ops.submit(conn, spec, reason, dependencies=dependencies)
        assert task_id is not None, "a task without a key never conflicts"
        return SubmitResult(task_id)
    for _ in range(MAX_KEY_RACES):
        # FOR UPDATE: a holder being replaced or ended by another transaction is
        # read once that commits, and skipped if it is no longer live.
        live = await conn.fetchrow(
            f"SELECT t.*, ({pg_ops.NOW}) AS now FROM taskpool_tasks t"
            f" WHERE unique_key = $1 AND {_LIVE} FOR UPDATE",
            key,
        )
        existing, replaced = keyed_conflict(task_state(live) if live else None, spec.on_conflict)
        if existing is not None:
            return SubmitResult(existing, created=False)
        try:
            async with conn.transaction():  # a savepoint: a lost race undoes the replace
                new_id = None
                if replaced is not None:
                    new_id = await conn.fetchval(
                        "SELECT nextval(pg_get_serial_sequence('taskpool_tasks', 'id'))"
                    )
                    await pg_ops.end(conn, plan_replace(task_state(live), new_id, key, live["now"]))
                task_id = await pg_ops.submit(
                    conn, spec, reason, task_id=new_id, dependencies=dependencies
                )
                if task_id is None:
                    raise _LostRace
                return SubmitResult(task_id, replaced=replaced)
        except _LostRace:
            continue  # another submit stored a task with the key first: read it
    raise StoreError(f"unique_key {key!r}: lost {MAX_KEY_RACES} races for it in a row")


async def postgres_submit_many(conn: asyncpg.Connection, specs: Sequence[TaskSpec]) -> list[int]:
    """Checked specs stored in order in the caller's transaction: without keys in
    one statement, with keys one by one."""
    if not any(spec.unique_key is not None for spec in specs):
        return [SubmitResult(i) for i in await pg_ops.submit_many(conn, specs)]
    return [await postgres_submit(conn, spec) for spec in specs]


class _LostRace(Exception):
    """The insert found the key taken by a task committed since it was read."""
