"""Retention in SQL: the SQLite and PostgreSQL stores' `prune` and `vacuum`.

What to prune is decided by `taskpool._retention.PrunePlan`; this module says it in
SQL, once for both databases (only placeholders and table names differ), and runs it
in batches of at most `BATCH_TASKS` tasks, one transaction each, so that claims and
other writes wait for one batch at most, never for the whole prune. Batches walk the
tasks by id, so every task is looked at once however many batches there are.

Each batch selects its tasks by the plan again inside its own transaction and
deletes only finished ones, so a prune racing anything (another prune included)
never removes a waiting or running task, and two prunes never count a task twice:
on PostgreSQL a batch locks the rows it takes (`SKIP LOCKED`: concurrent prunes share
the work); on SQLite transactions are serial.

SQLite files shrink only in incremental vacuum mode (set on new databases before
their first table): after a prune the free pages are returned a few thousand at a
time, then the WAL is checkpointed so that the file is truncated. A file created
before that mode is converted once by `vacuum` (a full VACUUM). PostgreSQL returns
the space to the table for reuse (autovacuum), not to the OS.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio.to_thread

from .._errors import StoreError
from .._retention import (
    BATCH_TASKS,
    FINISHED,
    PrunePlan,
    PruneReport,
    Rank,
    Retention,
    keep_boundary,
)
from ._writer import map_error

if TYPE_CHECKING:
    import asyncpg

    from .postgres import PostgresStore
    from .sqlite import SQLiteStore

T = TypeVar("T")

#: Free pages returned to the file system per incremental-vacuum transaction (4 KiB
#: each by default): 16 MiB moved at most while other writers wait.
VACUUM_STEP_PAGES = 4096

POSTGRES_SPACE = (
    "PostgreSQL reuses the space freed for new rows (autovacuum); its files do not shrink"
)
NOT_INCREMENTAL = (
    "this SQLite file was created without incremental vacuum: the space freed is reused"
    " by new tasks, but the file does not shrink; run `taskpool prune --vacuum` once to"
    " convert it (a full VACUUM: it rewrites the file and holds the write lock meanwhile)"
)


@dataclass(frozen=True)
class Dialect:
    """What differs between the two databases' SQL."""

    prefix: str  # table name prefix
    placeholder: Callable[[int], str]  # the n-th parameter, from 1
    real: str  # the type of times, for parameters whose type SQL cannot infer

    def table(self, name: str) -> str:
        return self.prefix + name


SQLITE = Dialect("", lambda n: "?", "REAL")
POSTGRES = Dialect("taskpool_", lambda n: f"${n}", "double precision")


class _Params:
    """Placeholders numbered in the order the values are added."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return self.dialect.placeholder(len(self.values))

    def time(self, value: float | None) -> str:
        return f"CAST({self(value)} AS {self.dialect.real})"


def _pruned(plan: PrunePlan, boundary: Rank | None, p: _Params) -> str:
    """The plan's condition for removing a whole task (never NULL)."""
    cases = " ".join(
        f"WHEN {p(status.value)} THEN {p.time(cutoff)}" for status, cutoff in plan.cutoffs.items()
    )
    too_old = f"coalesce(finished_at < CASE status {cases} END, FALSE)"
    if boundary is None:
        return too_old
    beyond = f"coalesce((finished_at, id) < ({p.time(boundary[0])}, {p(boundary[1])}), FALSE)"
    return f"({too_old} OR {beyond})"


def _select_batch(
    d: Dialect, plan: PrunePlan, boundary: Rank | None, after: int, *, output_only: bool, lock: bool
) -> tuple[str, list[Any]]:
    """The next batch of tasks to remove (or, `output_only`, to strip of their output)."""
    p = _Params(d)  # values in the order their placeholders appear (SQLite's are `?`)
    where = f"id > {p(after)}"
    where += f" AND status IN ({', '.join(p(s) for s in plan.statuses)})"
    pruned = _pruned(plan, boundary, p)
    if output_only:
        where += (
            f" AND NOT {pruned} AND finished_at < {p.time(plan.output_cutoff)}"
            f" AND EXISTS (SELECT 1 FROM {d.table('output')} o WHERE o.task_id = t.id)"
        )
    else:
        where += f" AND {pruned}"
    sql = f"SELECT id FROM {d.table('tasks')} t WHERE {where} ORDER BY id LIMIT {p(BATCH_TASKS)}"
    return sql + (" FOR UPDATE SKIP LOCKED" if lock else ""), p.values


def _boundary_sql(d: Dialect, plan: PrunePlan) -> tuple[str, list[Any]]:
    """The keep_last most recently finished tasks of the plan's statuses, newest first."""
    p = _Params(d)
    statuses = ", ".join(p(s) for s in plan.statuses)
    return (
        f"SELECT finished_at, id FROM {d.table('tasks')} WHERE status IN ({statuses})"
        f" AND finished_at IS NOT NULL ORDER BY finished_at DESC, id DESC"
        f" LIMIT {p(plan.keep_last)}",
        p.values,
    )


#: What a batch removes, in this order (children before their task), and what it
#: counts of each: (table, counted as).
_CHILDREN = (
    ("events", "events"),
    ("attempts", "attempts"),
    ("output", "chunks"),
    ("task_locks", ""),
)


def _finished_values() -> list[str]:
    return sorted(s.value for s in FINISHED)


# -- SQLite --------------------------------------------------------------------


def _sqlite_batch(
    conn: sqlite3.Connection,
    *,
    plan: PrunePlan,
    boundary: Rank | None,
    after: int,
    output_only: bool,
    dry_run: bool,
) -> tuple[dict[str, int], int | None]:
    """One batch in the caller's transaction: its counts and the last id it took."""
    sql, values = _select_batch(SQLITE, plan, boundary, after, output_only=output_only, lock=False)
    ids = [r[0] for r in conn.execute(sql, values)]
    if not ids:
        return {}, None
    chosen = "task_id IN (SELECT value FROM json_each(?))"
    ids_json = json.dumps(ids)
    counts = {"tasks": 0 if output_only else len(ids)}
    children = (("output", "chunks"),) if output_only else _CHILDREN
    for table, counted in children:
        if dry_run:
            if counted:
                (n,) = conn.execute(
                    f"SELECT count(*) FROM {table} WHERE {chosen}", (ids_json,)
                ).fetchone()
                counts[counted] = n
        else:
            n = conn.execute(f"DELETE FROM {table} WHERE {chosen}", (ids_json,)).rowcount
            if counted:
                counts[counted] = n
    if not output_only and not dry_run:
        finished = json.dumps(_finished_values())
        conn.execute(
            "DELETE FROM tasks WHERE id IN (SELECT value FROM json_each(?))"
            " AND status IN (SELECT value FROM json_each(?))",
            (ids_json, finished),
        )
    if output_only:
        counts["output_tasks"] = len(ids)
    return counts, ids[-1]


def _add(report: PruneReport, counts: dict[str, int]) -> PruneReport:
    return report.plus(
        counts.get("tasks", 0),
        counts.get("attempts", 0),
        counts.get("events", 0),
        counts.get("chunks", 0),
        counts.get("output_tasks", 0),
    )


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _sqlite_connection(path: str) -> sqlite3.Connection:
    """A connection of its own, in autocommit, for what cannot run in the writer's
    transactions (vacuum, checkpoint)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def _shrink(path: str) -> bool:
    """Return free pages to the file system and truncate the file (blocking); False if
    the file is not in incremental vacuum mode."""
    conn = _sqlite_connection(path)
    try:
        (mode,) = conn.execute("PRAGMA auto_vacuum").fetchone()
        if mode != 2:
            return False
        (free,) = conn.execute("PRAGMA freelist_count").fetchone()
        # Bounded: pages other writers free meanwhile wait for the next prune.
        for _ in range(free // VACUUM_STEP_PAGES + 1):
            # executescript steps the pragma to its end (execute would free one page),
            # each in a transaction of its own: other writers wait for one step at most.
            conn.executescript(f"PRAGMA incremental_vacuum({VACUUM_STEP_PAGES});")
        # The file is truncated when the WAL is checkpointed whole; TRUNCATE also
        # empties the WAL that the prune filled. Busy (a long reader): the next
        # automatic checkpoint truncates it instead.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        return True
    finally:
        conn.close()


async def _in_thread(fn: Callable[[str], T], path: str) -> T:
    """Run `fn` on a connection of its own in a thread, SQLite's errors as taskpool's."""
    try:
        return await anyio.to_thread.run_sync(fn, path)
    except sqlite3.Error as exc:
        raise map_error(exc) from exc


def _full_vacuum(path: str) -> None:
    conn = _sqlite_connection(path)
    try:
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # applied by the VACUUM itself
        conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        conn.close()


async def prune_sqlite(
    store: SQLiteStore, policy: Retention, now: float | None, dry_run: bool
) -> PruneReport:
    plan = policy.plan(store._clock() if now is None else now)
    path = str(store.path)
    size_before = await anyio.to_thread.run_sync(_file_size, path)
    boundary = None
    if plan.keep_last is not None:
        sql, values = _boundary_sql(SQLITE, plan)
        ranks = await store._read(lambda conn: [tuple(r) for r in conn.execute(sql, values)])
        boundary = keep_boundary(ranks, plan.keep_last)
    report = PruneReport(dry_run=dry_run)
    passes = [False] + ([True] if plan.output_cutoff is not None else [])
    for output_only in passes:
        after = 0
        while True:
            op = functools.partial(
                _sqlite_batch,
                plan=plan,
                boundary=boundary,
                after=after,
                output_only=output_only,
                dry_run=dry_run,
            )
            counts, last = await (store._read(op) if dry_run else store._write(op))
            if last is None:
                break
            report, after = _add(report, counts), last
    if dry_run or not (report.tasks or report.output_tasks):
        return report
    incremental = await _in_thread(_shrink, path)
    freed = max(0, size_before - await anyio.to_thread.run_sync(_file_size, path))
    return dataclasses.replace(
        report, bytes_freed=freed, note="" if incremental else NOT_INCREMENTAL
    )


async def vacuum_sqlite(store: SQLiteStore) -> int:
    path = str(store.path)
    before = await anyio.to_thread.run_sync(_file_size, path)
    await _in_thread(_full_vacuum, path)
    return max(0, before - await anyio.to_thread.run_sync(_file_size, path))


# -- PostgreSQL ----------------------------------------------------------------


async def _postgres_batch(
    conn: asyncpg.Connection,
    *,
    plan: PrunePlan,
    boundary: Rank | None,
    after: int,
    output_only: bool,
    dry_run: bool,
) -> tuple[dict[str, int], int | None]:
    sql, values = _select_batch(
        POSTGRES, plan, boundary, after, output_only=output_only, lock=not dry_run
    )
    ids = [r[0] for r in await conn.fetch(sql, *values)]
    if not ids:
        return {}, None
    counts = {"tasks": 0 if output_only else len(ids)}
    children = (("output", "chunks"),) if output_only else _CHILDREN
    for table, counted in children:
        if table == "task_locks":
            continue  # PostgreSQL keeps a task's locks in its row
        name = POSTGRES.table(table)
        if dry_run:
            n = await conn.fetchval(f"SELECT count(*) FROM {name} WHERE task_id = ANY($1)", ids)
        else:
            n = await conn.fetchval(
                f"WITH gone AS (DELETE FROM {name} WHERE task_id = ANY($1) RETURNING 1)"
                " SELECT count(*) FROM gone",
                ids,
            )
        counts[counted] = n
    if not output_only and not dry_run:
        await conn.execute(
            "DELETE FROM taskpool_tasks WHERE id = ANY($1) AND status = ANY($2)",
            ids,
            _finished_values(),
        )
    if output_only:
        counts["output_tasks"] = len(ids)
    return counts, ids[-1]


async def prune_postgres(
    store: PostgresStore, policy: Retention, now: float | None, dry_run: bool
) -> PruneReport:
    async def read_now(conn: asyncpg.Connection) -> float:
        return float(await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())"))

    plan = policy.plan(await store._tx(read_now) if now is None else now)
    boundary = None
    if plan.keep_last is not None:
        sql, values = _boundary_sql(POSTGRES, plan)

        async def read_ranks(conn: asyncpg.Connection) -> list[Rank]:
            return [(r[0], r[1]) for r in await conn.fetch(sql, *values)]

        boundary = keep_boundary(await store._tx(read_ranks), plan.keep_last)
    report = PruneReport(dry_run=dry_run)
    passes = [False] + ([True] if plan.output_cutoff is not None else [])
    for output_only in passes:
        after = 0
        while True:
            op = functools.partial(
                _postgres_batch,
                plan=plan,
                boundary=boundary,
                after=after,
                output_only=output_only,
                dry_run=dry_run,
            )
            counts, last = await store._tx(op)
            if last is None:
                break
            report, after = _add(report, counts), last
    if not dry_run and (report.tasks or report.output_tasks):
        report = dataclasses.replace(report, note=POSTGRES_SPACE)
    return report


async def vacuum_postgres(store: PostgresStore) -> None:
    """A plain VACUUM of taskpool's tables: the space freed reusable at once, without
    waiting for autovacuum, and no exclusive lock (VACUUM FULL would take one)."""
    import asyncpg

    from ._postgres_driver import map_error

    pool = store._pool
    if pool is None:
        raise StoreError("the store is closed")
    try:
        async with pool.acquire(timeout=store.connect_timeout_s) as conn:
            for table in ("tasks", "attempts", "events", "output"):
                # VACUUM cannot run in a transaction: not through `_tx`. Unbounded by
                # the store's command timeout: a big table takes what it takes.
                await conn.execute(f"VACUUM (ANALYZE) {POSTGRES.table(table)}", timeout=None)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise map_error(exc) from exc
