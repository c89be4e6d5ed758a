"""PostgreSQL's operations, each run inside one transaction on a pooled connection
(the claim: one statement, outside any explicit transaction).

They read rows (locked `FOR UPDATE` where they write them, with the database's own
clock as `now`, the one clock every node shares), ask `taskpool._decisions` what to
do, and write the answer; the trigger of the first migration logs every transition.
The claim is decided and written in the database (`taskpool_claim`, migration
0006). The store (`postgres.py`) runs them; nothing here opens or closes anything.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

from .._decisions import (
    HELD_FOR_DEPENDENCIES,
    CancelRequest,
    DependencyStart,
    Ending,
    check_fence,
    plan_cancel,
    plan_dependencies,
    plan_dependency_cancel,
    plan_finish,
    plan_handback,
    plan_orphan_settlement,
    plan_rescue,
)
from .._models import (
    CancelMode,
    Claim,
    Limits,
    Outcome,
    Status,
    TaskEvent,
    TaskInfo,
    TaskSpec,
)
from .._store import Renewal
from ._common import (
    EVENT_COLUMNS,
    ending_columns,
    event_values,
    no_task,
    renewal,
    task_info,
    task_state,
)
from ._common import (
    cancel_requests as common_cancel_requests,
)

if TYPE_CHECKING:
    import asyncpg

#: Key of the advisory lock that serializes migrations (every version uses this one).
MIGRATION_LOCK = 0x7A5C_9002

#: The database's clock, in UNIX seconds: every node decides leases on it.
NOW = "SELECT extract(epoch FROM clock_timestamp())::float8"


#: The columns `submit_many` COPYs from a checked spec, in `spec_record`'s order.
SPEC_COLUMNS = (
    "argv", "cwd", "env", "project", "template", "template_parallel", "locks", "priority",
    "not_before", "timeout_s", "stall_timeout_s", "max_attempts", "retry_backoff_s",
    "pass_env", "inherit_env", "memory_max", "pids_max", "cpu_max", "retry_jitter",
    "retry_max_delay_s", "retry_on", "unique_key", "on_conflict", "after_ids",
    "after_not_before",
)  # fmt: skip


def _sorted(names: frozenset[str]) -> list[str]:
    return sorted(names) if names else []  # most specs have none: skip the sort


def spec_record(spec: TaskSpec, *, held: bool = False) -> tuple[Any, ...]:
    """A checked spec's values in `SPEC_COLUMNS` order, as COPY's binary codecs take
    them (the JSONB column as text); `held`: until its dependencies succeed. Built as
    one tuple, no per-value dispatch: it runs 100,000 times in a large `submit_many`."""
    return (
        list(spec.argv),
        spec.cwd,
        json.dumps(dict(spec.env)) if spec.env is not None else None,
        spec.project,
        spec.template,
        spec.template_parallel,
        _sorted(spec.locks),
        spec.priority,
        HELD_FOR_DEPENDENCIES if held else spec.not_before or 0.0,
        spec.timeout_s,
        spec.stall_timeout_s,
        spec.max_attempts,
        spec.retry_backoff_s,
        _sorted(spec.pass_env),
        spec.inherit_env,
        spec.memory_max,
        spec.pids_max,
        spec.cpu_max,
        spec.retry_jitter,
        spec.retry_max_delay_s,
        sorted(spec.retry_on) if spec.retry_on is not None else None,
        spec.unique_key,
        spec.on_conflict,
        list(spec.after) if spec.after else None,
        spec.not_before if held else None,
    )


#: The spec columns whose parameter a SELECT list must cast (no type to infer from).
_CASTS = {"env": "::jsonb", "after_ids": "::bigint[]"}

#: `submit`'s one INSERT: $1 the reason, $2 the id (None: drawn from the sequence),
#: then `spec_record`'s values, in `SPEC_COLUMNS` order (the JSONB column as text).
_INSERT_ONE = (
    "INSERT INTO taskpool_tasks (id, status, submitted_at, changed_at, reason,"
    f" {', '.join(SPEC_COLUMNS)})"
    " SELECT coalesce($2::bigint, nextval(pg_get_serial_sequence('taskpool_tasks', 'id'))),"
    " 'waiting', now.t, now.t, $1, "
    + ", ".join(f"${n}{_CASTS.get(column, '')}" for n, column in enumerate(SPEC_COLUMNS, start=3))
    + f" FROM ({NOW}) AS now(t)"
    " ON CONFLICT (unique_key)"
    " WHERE unique_key IS NOT NULL AND status IN ('waiting', 'running') DO NOTHING"
    " RETURNING id"
)


async def submit(
    conn: asyncpg.Connection,
    spec: TaskSpec,
    reason: str = "submitted",
    task_id: int | None = None,
    *,
    dependencies: DependencyStart | None = None,
) -> int | None:
    """Insert one checked spec as a waiting task (as `task_id` if given, drawn from
    the sequence); the trigger logs `reason`. None, and nothing stored, if a live
    task holds the spec's `unique_key` (`_unique_keys` decides what then).
    `dependencies`: how it starts out (`dependency_plans`; None: it has none)."""
    held = dependencies is not None and dependencies.held
    new_id: int | None = await conn.fetchval(
        _INSERT_ONE, reason, task_id, *spec_record(spec, held=held)
    )
    if new_id is not None and dependencies is not None:
        await link_dependencies(conn, [spec], [dependencies], [new_id])
    return new_id


async def dependency_plans(
    conn: asyncpg.Connection, specs: Sequence[TaskSpec]
) -> list[DependencyStart | None]:
    """How each spec starts out as its dependencies stand (None: it has none);
    `InvalidTask` if one names a task that does not exist. The dependencies are locked
    (FOR NO KEY UPDATE, in id order, in one statement) until the submit commits, then
    those not marked yet get `has_dependants`: an end of one of them waits for this
    commit (and its trigger then sees the new edges), or committed first and is read
    here (migration 0013). One lock mode taken in id order, never a second lock after
    a higher id: an ending dependency's trigger locks its dependants, which have higher
    ids than it, in id order too, so no cycle of waits can form."""
    wanted = sorted({task_id for spec in specs for task_id in spec.after})
    if not wanted:
        return [None] * len(specs)
    rows = await conn.fetch(
        "SELECT id, status, reason, has_dependants FROM taskpool_tasks"
        " WHERE id = ANY($1::bigint[]) ORDER BY id FOR NO KEY UPDATE",
        wanted,
    )
    unmarked = [r["id"] for r in rows if not r["has_dependants"]]
    if unmarked:
        await conn.execute(
            "UPDATE taskpool_tasks SET has_dependants = true WHERE id = ANY($1::bigint[])",
            unmarked,
        )
    found = {r["id"]: Status(r["status"]) for r in rows}
    reasons = {r["id"]: r["reason"] for r in rows}
    return [plan_dependencies(spec.after, found, reasons) if spec.after else None for spec in specs]


async def link_dependencies(
    conn: asyncpg.Connection,
    specs: Sequence[TaskSpec],
    plans: Sequence[DependencyStart | None],
    ids: Sequence[int],
) -> None:
    """The new tasks' edges (what the trigger of migration 0013 follows), and the end
    of each whose dependency had already ended without succeeding."""
    edges = [
        (task_id, after) for task_id, spec in zip(ids, specs, strict=True) for after in spec.after
    ]
    if not edges:
        return
    await conn.execute(
        "INSERT INTO taskpool_task_after (task_id, after_id)"
        " SELECT * FROM unnest($1::bigint[], $2::bigint[])",
        [task_id for task_id, _ in edges],
        [after for _, after in edges],
    )
    for task_id, plan in zip(ids, plans, strict=True):
        if plan is not None and plan.cancel_reason is not None:
            row = await task_row(conn, task_id, lock=True)
            ending = plan_dependency_cancel(task_state(row), plan.cancel_reason, row["now"])
            await end(conn, ending)


async def submit_many(conn: asyncpg.Connection, specs: Sequence[TaskSpec]) -> list[int]:
    """Insert checked specs with one binary COPY (in the caller's transaction), ids in
    the order given: drawn from the table's sequence first and paired with the specs
    in ascending order, whatever order the sequence hands them out in. The insert
    trigger logs each task's 'submitted' event, as for `submit`. Every id in a spec's
    `after` must exist (`InvalidTask`)."""
    plans = await dependency_plans(conn, specs)
    now, drawn = await conn.fetchrow(
        f"SELECT ({NOW}), array(SELECT nextval(pg_get_serial_sequence('taskpool_tasks', 'id'))"
        " FROM generate_series(1, $1))",
        len(specs),
    )
    ids: list[int] = sorted(drawn)
    await conn.copy_records_to_table(
        "taskpool_tasks",
        columns=["id", "status", "submitted_at", "changed_at", "reason", *SPEC_COLUMNS],
        records=[
            (
                task_id,
                "waiting",
                now,
                now,
                "submitted",
                *spec_record(spec, held=plan is not None and plan.held),
            )
            for task_id, spec, plan in zip(ids, specs, plans, strict=True)
        ],
    )
    if any(plan is not None for plan in plans):
        await link_dependencies(conn, specs, plans, ids)
    return ids


async def stop_node(conn: asyncpg.Connection, node_id: str, reason: str) -> None:
    now: float = await conn.fetchval(NOW)
    await conn.execute(
        "UPDATE taskpool_nodes SET stopped_at = $3, stop_reason = $2"
        " WHERE id = $1 AND stopped_at IS NULL",
        node_id,
        reason,
        now,
    )
    # In the same transaction, so a stopped node never owns a running attempt: a
    # claim holds the node's row (FOR SHARE) until it commits, so this statement
    # runs after any claim of the node and sees what it claimed.
    rows = await conn.fetch(
        "SELECT * FROM taskpool_tasks WHERE status = 'running' AND owner_node = $1 FOR UPDATE",
        node_id,
    )
    for r in rows:
        await end(conn, plan_handback(task_state(r), node_id, reason, now))


#: What `check_fence` (taskpool/_decisions.py) requires of the row, as the WHERE of the
#: one-statement fast paths below: a fence, once stale, never owns its task again
#: (fences only grow), so a fast path that matches nothing leaves the decision, and
#: the error, to the locked path (`fenced`), which is the one that judges.
_OWNED = "id = $1 AND fence = $2 AND status = 'running'"

#: `record_spawn` in one statement (no BEGIN/COMMIT round trips): the task and its
#: attempt record, only while the fence owns the task; returns a row if it did.
RECORD_SPAWN = f"""
WITH task AS (
    UPDATE taskpool_tasks SET pid = $3, pid_started_at = $4 WHERE {_OWNED} RETURNING id
)
UPDATE taskpool_attempts SET pid = $3, pid_started_at = $4
 WHERE task_id = (SELECT id FROM task) AND fence = $2 RETURNING task_id
"""


async def record_spawn_at_once(
    conn: asyncpg.Connection, task_id: int, fence: int, pid: int, pid_started_at: float
) -> bool:
    """`record_spawn` as one statement; False if the fence did not own the task."""
    return await conn.fetchrow(RECORD_SPAWN, task_id, fence, pid, pid_started_at) is not None


async def record_spawn(
    conn: asyncpg.Connection, task_id: int, fence: int, pid: int, pid_started_at: float
) -> None:
    await fenced(conn, task_id, fence)
    await conn.execute(
        "UPDATE taskpool_tasks SET pid = $2, pid_started_at = $3 WHERE id = $1",
        task_id,
        pid,
        pid_started_at,
    )
    await conn.execute(
        "UPDATE taskpool_attempts SET pid = $3, pid_started_at = $4"
        " WHERE task_id = $1 AND fence = $2",
        task_id,
        fence,
        pid,
        pid_started_at,
    )


#: `append_output` in one statement: the task's row is locked (as `fenced` does) while
#: the fence owns it, then the texts numbered after the attempt's last chunk.
APPEND_OUTPUT = f"""
WITH task AS (SELECT id FROM taskpool_tasks WHERE {_OWNED} FOR UPDATE)
INSERT INTO taskpool_output (task_id, fence, seq, text)
SELECT task.id, $2, last.seq + u.n, u.text
  FROM task,
       (SELECT COALESCE(MAX(seq), 0) AS seq FROM taskpool_output
         WHERE task_id = $1 AND fence = $2) AS last,
       unnest($3::text[]) WITH ORDINALITY AS u(text, n)
RETURNING seq
"""


async def append_output_at_once(
    conn: asyncpg.Connection, task_id: int, fence: int, texts: Sequence[str]
) -> bool:
    """`append_output` as one statement; False if it wrote nothing (a stale fence),
    and for a unique violation: an append of the same attempt committed while this
    one waited for the row read `last` before it (then the locked path numbers)."""
    import asyncpg

    if not texts:
        return False  # nothing to write: only the locked path checks the fence then
    try:
        rows = await conn.fetch(APPEND_OUTPUT, task_id, fence, list(texts))
    except asyncpg.UniqueViolationError:
        return False
    return len(rows) == len(texts)


async def append_output(
    conn: asyncpg.Connection, task_id: int, fence: int, texts: Sequence[str]
) -> None:
    await fenced(conn, task_id, fence)
    last: int = await conn.fetchval(
        "SELECT COALESCE(MAX(seq), 0) FROM taskpool_output WHERE task_id = $1 AND fence = $2",
        task_id,
        fence,
    )
    await conn.executemany(
        "INSERT INTO taskpool_output (task_id, fence, seq, text) VALUES ($1, $2, $3, $4)",
        [(task_id, fence, last + i, text) for i, text in enumerate(texts, 1)],
    )


async def renew_leases(conn: asyncpg.Connection, node_id: str, lease_ttl_s: float) -> Renewal:
    # One statement: both updates read the same `now`, and commit together.
    rows = await conn.fetch(
        f"WITH now AS ({NOW} AS t), node AS (UPDATE taskpool_nodes SET heartbeat_at = now.t"
        " FROM now WHERE id = $1)"
        " UPDATE taskpool_tasks SET lease_expires_at = now.t + $2 FROM now"
        " WHERE owner_node = $1 AND status = 'running' AND lease_expires_at >= now.t"
        " RETURNING id, fence, cancel_requested",
        node_id,
        lease_ttl_s,
    )
    return renewal(rows)


async def cancel_requests(
    conn: asyncpg.Connection, node_id: str
) -> dict[int, tuple[int, CancelMode]]:
    rows = await conn.fetch(
        "SELECT id, fence, cancel_requested FROM taskpool_tasks WHERE owner_node = $1"
        " AND status = 'running' AND cancel_requested IS NOT NULL",
        node_id,
    )
    return common_cancel_requests(rows)


async def rescue_expired(
    conn: asyncpg.Connection, spared: Collection[tuple[int, int]]
) -> list[TaskInfo]:
    now: float = await conn.fetchval(NOW)
    rows = await conn.fetch(
        "SELECT t.*, n.heartbeat_at AS node_heartbeat_at FROM taskpool_tasks t"
        " LEFT JOIN taskpool_nodes n ON n.id = t.owner_node"
        " WHERE t.status = 'running' AND t.lease_expires_at < $1"
        " FOR UPDATE OF t SKIP LOCKED",
        now,
    )
    return [
        info(await end(conn, plan_rescue(task_state(r), r["node_heartbeat_at"], now)))
        for r in rows
        if (r["id"], r["fence"]) not in spared
    ]


async def settle_orphan(
    conn: asyncpg.Connection, task_id: int, fence: int, reason: str
) -> TaskInfo:
    found = await task_row(conn, task_id, lock=True)
    ending = plan_orphan_settlement(task_state(found), fence, reason, found["now"])
    return info(found if ending is None else await end(conn, ending))


async def request_cancel(conn: asyncpg.Connection, task_id: int, force: bool) -> TaskInfo:
    found = await task_row(conn, task_id, lock=True)
    plan = plan_cancel(task_state(found), force=force, now=found["now"])
    if isinstance(plan, Ending):
        return info(await end(conn, plan))
    if isinstance(plan, CancelRequest):
        updated = await conn.fetchrow(
            "UPDATE taskpool_tasks SET cancel_requested = $2 WHERE id = $1 RETURNING *",
            task_id,
            plan.mode.value,
        )
        await log_event(conn, plan.event)
        return info(updated)
    return info(found)


# -- the pieces ----------------------------------------------------------------


async def task_row(conn: asyncpg.Connection, task_id: int, *, lock: bool = False) -> Any:
    """The task's row, with the database's clock as `now`; `lock`: FOR UPDATE."""
    sql = f"SELECT t.*, ({NOW}) AS now FROM taskpool_tasks t WHERE id = $1"
    row = await conn.fetchrow(sql + (" FOR UPDATE" if lock else ""), task_id)
    if row is None:
        raise no_task(task_id)
    return row


async def fenced(conn: asyncpg.Connection, task_id: int, fence: int) -> Any:
    """The locked task row if `fence` still owns it, else `LeaseLost` (see `check_fence`)."""
    row = await task_row(conn, task_id, lock=True)
    check_fence(task_state(row), fence)
    return row


async def log_event(conn: asyncpg.Connection, event: TaskEvent) -> None:
    """Log an event the trigger does not (one that changes neither status nor fence)."""
    await conn.execute(
        f"INSERT INTO taskpool_events ({EVENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        *event_values(event),
    )


async def end(
    conn: asyncpg.Connection,
    ending: Ending,
    *,
    unless_changed_from: Any = None,
    wake: bool = False,
) -> Any:
    """Write the end of an attempt (or of a waiting task); the trigger logs the event.

    `unless_changed_from`: the unlocked row the ending was decided on; the write then
    happens only if what that decision read of it has not changed since (status,
    fence, cancel request: the rest is fixed while an attempt runs), and returns None
    if it has. `wake`: say 'work' to the nodes in the same statement."""
    columns = ending_columns(ending)
    names = list(columns)
    assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(names, 2))
    values = [columns[name] for name in names]
    n = len(names) + 2
    where, guard = "id = $1", []
    if unless_changed_from is not None:
        where += (
            f" AND status = ${n} AND fence = ${n + 1}"
            f" AND cancel_requested IS NOT DISTINCT FROM ${n + 2}"
        )
        guard = [
            unless_changed_from["status"],
            unless_changed_from["fence"],
            unless_changed_from["cancel_requested"],
        ]
        n += 3
    woke = ", taskpool_wake_work() AS woke" if wake else ""
    attempt = ending.attempt
    if attempt is None:
        return await conn.fetchrow(
            f"WITH ended AS (UPDATE taskpool_tasks SET {assignments} WHERE {where}"
            f" RETURNING *) SELECT *{woke} FROM ended",
            ending.task_id,
            *values,
            *guard,
        )
    # The attempt's record is closed in the same statement (one round trip), only if
    # the task's row was written.
    return await conn.fetchrow(
        f"WITH ended AS (UPDATE taskpool_tasks SET {assignments} WHERE {where} RETURNING *),"
        f" attempt AS (UPDATE taskpool_attempts SET finished_at = ${n}, outcome = ${n + 1},"
        f" exit_code = ${n + 2}, reason = ${n + 3} WHERE task_id = $1 AND fence = ${n + 4}"
        " AND EXISTS (SELECT FROM ended))"
        f" SELECT *{woke} FROM ended",
        ending.task_id,
        *values,
        *guard,
        ending.at,
        attempt.outcome.value,
        attempt.exit_code,
        attempt.reason,
        attempt.fence,
    )


async def finish_at_once(
    conn: asyncpg.Connection, task_id: int, fence: int, outcome: Outcome, *, wake: bool
) -> Any:
    """`finish` without BEGIN/COMMIT: a read, then one statement that writes the end
    decided on it unless the row changed in between (then None: the locked path
    decides). A stale fence stays stale, so `LeaseLost` from the read stands."""
    row = await task_row(conn, task_id)
    ending = plan_finish(task_state(row), fence, outcome, row["now"])
    return await end(conn, ending, unless_changed_from=row, wake=wake)


async def finish(conn: asyncpg.Connection, task_id: int, fence: int, outcome: Outcome) -> Any:
    row = await task_row(conn, task_id, lock=True)
    return await end(conn, plan_finish(task_state(row), fence, outcome, row["now"]))


async def claim(
    conn: asyncpg.Connection, node_id: str, limits: Limits, lease_ttl_s: float
) -> tuple[list[Claim], bool]:
    """What `taskpool_claim` (migration 0006), or with `fair_share` `taskpool_claim_fair`
    (migration 0014), both as restated by 0015, decides and writes, in one statement that
    must run outside an explicit transaction: its locks are then released at its own
    commit, with no round trip to this process in between. Also says whether it lost a
    race to another claim and left slots free (then claiming again finds more)."""
    # A stopped node claims nothing (its claim would be left for lease expiry); the
    # node's row is held FOR SHARE so that `stop_node` waits for this claim to commit.
    # An uncorrelated condition is a one-time filter: the function does not run at all.
    if limits.fair_share is None:
        rows = await conn.fetch(
            "SELECT (c.task).*, c.contended FROM taskpool_claim($1, $2, $3::jsonb, $4) AS c"
            " WHERE COALESCE((SELECT stopped_at IS NULL FROM taskpool_nodes WHERE id = $1"
            " FOR SHARE), true)",
            node_id,
            limits.max_parallel,
            json.dumps(dict(limits.project_limits)),
            lease_ttl_s,
        )
    else:  # a function of its own (migration 0014): the plain claim's plans stay as they are
        rows = await conn.fetch(
            "SELECT (c.task).*, c.contended"
            " FROM taskpool_claim_fair($1, $2, $3::jsonb, $4::jsonb, $5) AS c"
            " WHERE COALESCE((SELECT stopped_at IS NULL FROM taskpool_nodes WHERE id = $1"
            " FOR SHARE), true)",
            node_id,
            limits.max_parallel,
            json.dumps(dict(limits.project_limits)),
            json.dumps(dict(limits.fair_share)),
            lease_ttl_s,
        )
    claims = [Claim(info(row)) for row in rows if row["id"] is not None]
    return claims, any(row["contended"] for row in rows)


def info(r: Any) -> TaskInfo:
    env = r["env"]
    return task_info(
        r,
        argv=list(r["argv"]),
        env=json.loads(env) if env is not None else None,
        pass_env=list(r["pass_env"]),
        locks=list(r["locks"]),
    )
