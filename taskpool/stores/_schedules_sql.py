"""The schedules of the SQL stores: `ScheduleStore` over SQLite and PostgreSQL.

What a step decides is `taskpool._schedules.plan_step`'s; here is only how rows are
read, locked and written. The step runs in one write transaction on both: SQLite's
writer (the file's write lock serializes every handle and process on the file),
PostgreSQL's `FOR UPDATE SKIP LOCKED` (nodes share the due schedules out, none
waits). Either way the tick's submit, its `schedule_runs` row and the new
`next_fire_at` commit together or not at all.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from .._models import Status
from .._scheduler import STEP_LIMIT, Fired, ScheduleNotFound, ScheduleStore, resumed
from .._schedules import (
    Misfire,
    Overlap,
    Schedule,
    ScheduledBy,
    ScheduleError,
    Timing,
    fire_reason,
    new_schedule,
    plan_step,
    spec_from_json,
    spec_to_json,
)
from . import _postgres_ops as pg_ops
from . import _sqlite_ops as sqlite_ops
from ._common import Row

if TYPE_CHECKING:
    import asyncpg

    from .postgres import PostgresStore
    from .sqlite import SQLiteStore

COLUMNS = (
    "name, cron, tz, every_s, spec, overlap, misfire, misfire_bound, grace_s, paused,"
    " next_fire_at, last_fire_at, last_task_id, created_at"
)


def schedule_from_row(r: Row, spec: dict[str, Any]) -> Schedule:
    return Schedule(
        name=r["name"],
        timing=Timing(cron=r["cron"], tz=r["tz"], every_s=r["every_s"]),
        spec=spec_from_json(spec),
        overlap=Overlap(r["overlap"]),
        misfire=Misfire(r["misfire"]),
        misfire_bound=r["misfire_bound"],
        grace_s=r["grace_s"],
        paused=bool(r["paused"]),
        next_fire_at=r["next_fire_at"],
        last_fire_at=r["last_fire_at"],
        last_task_id=r["last_task_id"],
        created_at=r["created_at"],
    )


def schedule_values(s: Schedule, spec: Any) -> tuple[Any, ...]:
    """The row of `s`, in `COLUMNS` order, with its spec as the backend stores it."""
    return (
        s.name,
        s.timing.cron,
        s.timing.tz,
        s.timing.every_s,
        spec,
        s.overlap.value,
        s.misfire.value,
        s.misfire_bound,
        s.grace_s,
        s.paused,
        s.next_fire_at,
        s.last_fire_at,
        s.last_task_id,
        s.created_at,
    )


#: Ids one SQLite statement binds at most (SQLite before 3.32 allows 999 variables).
SQLITE_IDS_PER_QUERY = 500


def _taken(name: str) -> ScheduleError:
    return ScheduleError(f"a schedule named {name!r} exists")


def _missing(name: str) -> ScheduleNotFound:
    return ScheduleNotFound(f"no schedule {name!r}")


# -- SQLite ----------------------------------------------------------------


def _sqlite_schedule(r: sqlite3.Row) -> Schedule:
    return schedule_from_row(r, json.loads(r["spec"]))


def _sqlite_get(conn: sqlite3.Connection, name: str) -> Schedule:
    row = conn.execute(f"SELECT {COLUMNS} FROM schedules WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise _missing(name)
    return _sqlite_schedule(row)


def _sqlite_put(conn: sqlite3.Connection, s: Schedule) -> None:
    conn.execute(
        f"INSERT OR REPLACE INTO schedules ({COLUMNS}) VALUES ({', '.join('?' * 14)})",
        schedule_values(s, json.dumps(spec_to_json(s.spec))),
    )


def _sqlite_fire(conn: sqlite3.Connection, now: float, submit_at: float, limit: int) -> list[Fired]:
    rows = conn.execute(
        f"SELECT {COLUMNS} FROM schedules WHERE paused = 0 AND next_fire_at <= ?"
        " ORDER BY next_fire_at LIMIT ?",
        (now, limit),
    ).fetchall()
    fired: list[Fired] = []
    for row in rows:
        schedule = _sqlite_schedule(row)
        previous = None
        if schedule.last_task_id is not None:
            found = conn.execute(
                "SELECT status FROM tasks WHERE id = ?", (schedule.last_task_id,)
            ).fetchone()
            previous = Status(found[0]) if found is not None else None
        step = plan_step(schedule, previous, now)
        last_task_id = schedule.last_task_id
        for tick in step.ticks:
            cancelled = task_id = None
            if tick.action.cancel_previous and last_task_id is not None:
                sqlite_ops.request_cancel(conn, last_task_id, False, submit_at)
                cancelled = last_task_id
            if tick.action.submit:
                reason = fire_reason(schedule.name, tick.tick)
                [task_id] = sqlite_ops.insert_tasks(conn, [schedule.spec], submit_at, reason=reason)
                conn.execute(
                    "INSERT INTO schedule_runs (task_id, schedule, fire_at) VALUES (?, ?, ?)",
                    (task_id, schedule.name, tick.tick),
                )
                last_task_id = task_id
            fired.append(Fired(schedule.name, tick.tick, task_id, cancelled))
        conn.execute(
            "UPDATE schedules SET next_fire_at = ?, last_fire_at = ?, last_task_id = ?"
            " WHERE name = ?",
            (step.next_fire_at, step.last_fire_at, last_task_id, schedule.name),
        )
    return fired


class SQLiteSchedules(ScheduleStore):
    def __init__(self, store: SQLiteStore) -> None:
        self.store = store

    async def add(self, schedule: Schedule, now: float) -> Schedule:
        schedule = new_schedule(schedule, now)

        def op(conn: sqlite3.Connection) -> Schedule:
            if conn.execute("SELECT 1 FROM schedules WHERE name = ?", (schedule.name,)).fetchone():
                raise _taken(schedule.name)
            _sqlite_put(conn, schedule)
            return schedule

        return await self.store._write(op, durable=True)

    async def get(self, name: str) -> Schedule:
        return await self.store._read(lambda conn: _sqlite_get(conn, name))

    async def all(self) -> list[Schedule]:
        def op(conn: sqlite3.Connection) -> list[Schedule]:
            rows = conn.execute(f"SELECT {COLUMNS} FROM schedules ORDER BY name")
            return [_sqlite_schedule(r) for r in rows]

        return await self.store._read(op)

    async def set_paused(self, name: str, paused: bool, now: float) -> Schedule:
        def op(conn: sqlite3.Connection) -> Schedule:
            schedule = _sqlite_get(conn, name)
            changed = _paused(schedule, paused, now)
            _sqlite_put(conn, changed)
            return changed

        return await self.store._write(op, durable=True)

    async def remove(self, name: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            if conn.execute("DELETE FROM schedules WHERE name = ?", (name,)).rowcount == 0:
                raise _missing(name)

        await self.store._write(op, durable=True)

    async def runs(self, name: str, *, limit: int = 100) -> list[int]:
        def op(conn: sqlite3.Connection) -> list[int]:
            rows = conn.execute(
                "SELECT task_id FROM schedule_runs WHERE schedule = ?"
                " ORDER BY task_id DESC LIMIT ?",
                (name, limit),
            )
            return [r[0] for r in rows]

        return await self.store._read(op)

    async def scheduled_by(self, task_ids: Collection[int]) -> dict[int, ScheduledBy]:
        ids = sorted(set(task_ids))
        if not ids:
            return {}

        def op(conn: sqlite3.Connection) -> dict[int, ScheduledBy]:
            found: dict[int, ScheduledBy] = {}
            for start in range(0, len(ids), SQLITE_IDS_PER_QUERY):
                chunk = ids[start : start + SQLITE_IDS_PER_QUERY]
                rows = conn.execute(
                    "SELECT task_id, schedule, fire_at FROM schedule_runs"
                    f" WHERE task_id IN ({', '.join('?' * len(chunk))})",
                    chunk,
                )
                found.update({r[0]: ScheduledBy(r[1], r[2]) for r in rows})
            return found

        return await self.store._read(op)

    async def fire_due(self, now: float, *, limit: int = STEP_LIMIT) -> list[Fired]:
        # The cheap read first: an idle scheduler never takes the write lock.
        def due(conn: sqlite3.Connection) -> bool:
            return bool(
                conn.execute(
                    "SELECT 1 FROM schedules WHERE paused = 0 AND next_fire_at <= ? LIMIT 1",
                    (now,),
                ).fetchone()
            )

        if not await self.store._read(due):
            return []
        clock = self.store._clock
        return await self.store._write(
            lambda conn: _sqlite_fire(conn, now, clock(), limit), durable=True
        )


def _paused(schedule: Schedule, paused: bool, now: float) -> Schedule:
    if paused:
        return dataclasses.replace(schedule, paused=True)
    return resumed(schedule, now)


# -- PostgreSQL --------------------------------------------------------------


def _pg_schedule(r: Any) -> Schedule:
    return schedule_from_row(r, json.loads(r["spec"]))


async def _pg_get(conn: asyncpg.Connection, name: str, *, lock: bool = False) -> Schedule:
    row = await conn.fetchrow(
        f"SELECT {COLUMNS} FROM taskpool_schedules WHERE name = $1"
        + (" FOR UPDATE" if lock else ""),
        name,
    )
    if row is None:
        raise _missing(name)
    return _pg_schedule(row)


_PG_PUT = (
    f"INSERT INTO taskpool_schedules ({COLUMNS}) VALUES"
    " ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
)


async def _pg_fire(conn: asyncpg.Connection, now: float, limit: int) -> list[Fired]:
    rows = await conn.fetch(
        f"SELECT {COLUMNS} FROM taskpool_schedules WHERE NOT paused AND next_fire_at <= $1"
        " ORDER BY next_fire_at LIMIT $2 FOR UPDATE SKIP LOCKED",
        now,
        limit,
    )
    fired: list[Fired] = []
    for row in rows:
        schedule = _pg_schedule(row)
        previous = None
        if schedule.last_task_id is not None:
            status = await conn.fetchval(
                "SELECT status FROM taskpool_tasks WHERE id = $1", schedule.last_task_id
            )
            previous = Status(status) if status is not None else None
        step = plan_step(schedule, previous, now)
        last_task_id = schedule.last_task_id
        for tick in step.ticks:
            cancelled = task_id = None
            if tick.action.cancel_previous and last_task_id is not None:
                await pg_ops.request_cancel(conn, last_task_id, False)
                cancelled = last_task_id
            if tick.action.submit:
                reason = fire_reason(schedule.name, tick.tick)
                task_id = await pg_ops.submit(conn, schedule.spec, reason)
                await conn.execute(
                    "INSERT INTO taskpool_schedule_runs (task_id, schedule, fire_at)"
                    " VALUES ($1, $2, $3)",
                    task_id,
                    schedule.name,
                    tick.tick,
                )
                last_task_id = task_id
            fired.append(Fired(schedule.name, tick.tick, task_id, cancelled))
        await conn.execute(
            "UPDATE taskpool_schedules SET next_fire_at = $1, last_fire_at = $2,"
            " last_task_id = $3 WHERE name = $4",
            step.next_fire_at,
            step.last_fire_at,
            last_task_id,
            schedule.name,
        )
    return fired


class PostgresSchedules(ScheduleStore):
    def __init__(self, store: PostgresStore) -> None:
        self.store = store

    async def add(self, schedule: Schedule, now: float) -> Schedule:
        schedule = new_schedule(schedule, now)
        spec = json.dumps(spec_to_json(schedule.spec))

        async def op(conn: asyncpg.Connection) -> Schedule:
            done = await conn.fetchval(
                _PG_PUT + " ON CONFLICT (name) DO NOTHING RETURNING 1",
                *schedule_values(schedule, spec),
            )
            if done is None:
                raise _taken(schedule.name)
            return schedule

        return await self.store._tx(op)

    async def get(self, name: str) -> Schedule:
        return await self.store._tx(lambda conn: _pg_get(conn, name))

    async def all(self) -> list[Schedule]:
        async def op(conn: asyncpg.Connection) -> list[Schedule]:
            rows = await conn.fetch(f"SELECT {COLUMNS} FROM taskpool_schedules ORDER BY name")
            return [_pg_schedule(r) for r in rows]

        return await self.store._tx(op)

    async def set_paused(self, name: str, paused: bool, now: float) -> Schedule:
        async def op(conn: asyncpg.Connection) -> Schedule:
            changed = _paused(await _pg_get(conn, name, lock=True), paused, now)
            await conn.execute(
                "UPDATE taskpool_schedules SET paused = $1, next_fire_at = $2 WHERE name = $3",
                changed.paused,
                changed.next_fire_at,
                name,
            )
            return changed

        return await self.store._tx(op)

    async def remove(self, name: str) -> None:
        async def op(conn: asyncpg.Connection) -> None:
            if (
                await conn.fetchval(
                    "DELETE FROM taskpool_schedules WHERE name = $1 RETURNING 1", name
                )
                is None
            ):
                raise _missing(name)

        await self.store._tx(op)

    async def runs(self, name: str, *, limit: int = 100) -> list[int]:
        async def op(conn: asyncpg.Connection) -> list[int]:
            rows = await conn.fetch(
                "SELECT task_id FROM taskpool_schedule_runs WHERE schedule = $1"
                " ORDER BY task_id DESC LIMIT $2",
                name,
                limit,
            )
            return [r[0] for r in rows]

        return await self.store._tx(op)

    async def scheduled_by(self, task_ids: Collection[int]) -> dict[int, ScheduledBy]:
        ids = sorted(set(task_ids))
        if not ids:
            return {}

        async def op(conn: asyncpg.Connection) -> dict[int, ScheduledBy]:
            rows = await conn.fetch(
                "SELECT task_id, schedule, fire_at FROM taskpool_schedule_runs"
                " WHERE task_id = ANY($1::bigint[])",
                ids,
            )
            return {r["task_id"]: ScheduledBy(r["schedule"], r["fire_at"]) for r in rows}

        return await self.store._statement(op)

    async def fire_due(self, now: float, *, limit: int = STEP_LIMIT) -> list[Fired]:
        return await self.store._tx(lambda conn: _pg_fire(conn, now, limit))
