"""PostgreSQL's reads: what `PostgresStore` answers about tasks, nodes, events and output
without writing anything, each run on a pooled connection by the store (`postgres.py`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

from .._models import NodeInfo, Status, TaskEvent, TaskInfo
from .._store import Orphan, OutputChunk
from ._common import alive_filter, event_from_row, node_from_row
from ._postgres_ops import info, task_row

if TYPE_CHECKING:
    import asyncpg


async def list_nodes(
    conn: asyncpg.Connection, host: str | None, alive: bool | None
) -> list[NodeInfo]:
    sql = "SELECT * FROM taskpool_nodes WHERE ($1::text IS NULL OR host = $1)"
    rows = await conn.fetch(sql + alive_filter(alive) + " ORDER BY started_at", host)
    return [node_from_row(r) for r in rows]


async def orphans_of(conn: asyncpg.Connection, node_id: str) -> list[Orphan]:
    rows = await conn.fetch(
        "SELECT id, fence, owner_node, pid, pid_started_at FROM taskpool_tasks"
        " WHERE status = 'running' AND owner_node = $1 ORDER BY id",
        node_id,
    )
    return [Orphan(*r) for r in rows]


async def get(conn: asyncpg.Connection, task_id: int) -> TaskInfo:
    return info(await task_row(conn, task_id))


async def statuses(conn: asyncpg.Connection, task_ids: Collection[int]) -> dict[int, Status]:
    rows = await conn.fetch(
        "SELECT id, status FROM taskpool_tasks WHERE id = ANY($1::bigint[])", list(set(task_ids))
    )
    return {r[0]: Status(r[1]) for r in rows}


async def get_many(
    conn: asyncpg.Connection, task_ids: Collection[int], ended_only: bool
) -> dict[int, TaskInfo]:
    rows = await conn.fetch(
        "SELECT * FROM taskpool_tasks WHERE id = ANY($1::bigint[])"
        " AND (NOT $2 OR status NOT IN ('waiting', 'running'))",
        list(set(task_ids)),
        ended_only,
    )
    return {task.id: task for task in map(info, rows)}


async def list_tasks(
    conn: asyncpg.Connection, statuses: Sequence[Status] | None, project: str | None, limit: int
) -> list[TaskInfo]:
    rows = await conn.fetch(
        "SELECT * FROM taskpool_tasks WHERE ($1::text[] IS NULL OR status = ANY($1))"
        " AND ($2::text IS NULL OR project = $2) ORDER BY id DESC LIMIT $3",
        [str(s) for s in statuses] if statuses is not None else None,
        project,
        limit,
    )
    return [info(r) for r in rows]


async def waiting_ahead(conn: asyncpg.Connection, task_id: int, limit: int) -> list[TaskInfo]:
    me = await task_row(conn, task_id)
    # Due by the database's clock, as the claim (taskpool_claim) judges it; the literal
    # `not_before < 'Infinity'` lets the planner walk the queue index, which leaves held
    # tasks out (migration 0015).
    rows = await conn.fetch(
        "SELECT * FROM taskpool_tasks WHERE status = 'waiting' AND not_before < 'Infinity'"
        " AND not_before <= extract(epoch FROM clock_timestamp())"
        " AND (priority > $1 OR (priority = $1 AND id < $2))"
        " ORDER BY priority DESC, id LIMIT $3",
        me["priority"],
        me["id"],
        limit,
    )
    return [info(r) for r in rows]


async def events(conn: asyncpg.Connection, task_id: int) -> list[TaskEvent]:
    rows = await conn.fetch("SELECT * FROM taskpool_events WHERE task_id = $1 ORDER BY id", task_id)
    return [event_from_row(r) for r in rows]


async def read_output(
    conn: asyncpg.Connection, task_id: int, after: tuple[int, int], limit: int
) -> list[OutputChunk]:
    rows = await conn.fetch(
        "SELECT fence, seq, text FROM taskpool_output WHERE task_id = $1"
        " AND (fence, seq) > ($2, $3) ORDER BY fence, seq LIMIT $4",
        task_id,
        after[0],
        after[1],
        limit,
    )
    return [OutputChunk(r[0], r[1], r[2]) for r in rows]
