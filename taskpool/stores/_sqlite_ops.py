"""SQLite's operations, each run inside the writer's transaction (or a read one).

They read rows, ask `taskpool._decisions` (or `taskpool._rules` for a claim) what
to do, and write the answer; the triggers of the first migration log every
transition. The store (`sqlite.py`) runs them; nothing here knows about threads.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Sequence
from typing import Any

from .._decisions import (
    HELD_FOR_DEPENDENCIES,
    CancelRequest,
    DependencyStart,
    Ending,
    TaskState,
    check_fence,
    plan_cancel,
    plan_dependencies,
    plan_dependency_cancel,
    plan_finish,
    plan_handback,
    plan_orphan_settlement,
    plan_rescue,
    plan_start,
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
from .._rules import (
    FairClock,
    Prefilter,
    Slot,
    claim_fair_in_windows,
    claim_in_windows,
    fair_tags,
)
from .._store import Renewal
from ._common import (
    EVENT_COLUMNS,
    ending_columns,
    event_values,
    no_task,
    renewal,
    start_columns,
    task_info,
    task_state,
)
from ._common import (
    cancel_requests as common_cancel_requests,
)
from ._sqlite_claim import candidates, project_heads


def stop_node(conn: sqlite3.Connection, node_id: str, reason: str, now: float) -> None:
    conn.execute(
        "UPDATE nodes SET stopped_at = ?, stop_reason = ? WHERE id = ? AND stopped_at IS NULL",
        (now, reason, node_id),
    )
    # In the same transaction, so a stopped node never owns a running attempt.
    rows = conn.execute(
        "SELECT * FROM tasks WHERE status = 'running' AND owner_node = ?", (node_id,)
    ).fetchall()
    for r in rows:
        end(conn, plan_handback(task_state(r), node_id, reason, now))


def record_spawn(
    conn: sqlite3.Connection, task_id: int, fence: int, pid: int, pid_started_at: float
) -> None:
    fenced(conn, task_id, fence)
    conn.execute(
        "UPDATE tasks SET pid = ?, pid_started_at = ? WHERE id = ?", (pid, pid_started_at, task_id)
    )
    conn.execute(
        "UPDATE attempts SET pid = ?, pid_started_at = ? WHERE task_id = ? AND fence = ?",
        (pid, pid_started_at, task_id, fence),
    )


def append_output(conn: sqlite3.Connection, task_id: int, fence: int, texts: Sequence[str]) -> None:
    fenced(conn, task_id, fence)
    (last,) = conn.execute(
        "SELECT COALESCE(MAX(seq), 0) FROM output WHERE task_id = ? AND fence = ?",
        (task_id, fence),
    ).fetchone()
    conn.executemany(
        "INSERT INTO output (task_id, fence, seq, text) VALUES (?, ?, ?, ?)",
        [(task_id, fence, last + i, text) for i, text in enumerate(texts, 1)],
    )


def renew_leases(conn: sqlite3.Connection, node_id: str, lease_ttl_s: float, now: float) -> Renewal:
    rows = conn.execute(
        "UPDATE tasks SET lease_expires_at = ? WHERE owner_node = ? AND status = 'running'"
        " AND lease_expires_at >= ? RETURNING id, fence, cancel_requested",
        (now + lease_ttl_s, node_id, now),
    ).fetchall()
    conn.execute("UPDATE nodes SET heartbeat_at = ? WHERE id = ?", (now, node_id))
    return renewal(rows)


def cancel_requests(conn: sqlite3.Connection, node_id: str) -> dict[int, tuple[int, CancelMode]]:
    rows = conn.execute(
        "SELECT id, fence, cancel_requested FROM tasks WHERE owner_node = ?"
        " AND status = 'running' AND cancel_requested IS NOT NULL",
        (node_id,),
    ).fetchall()
    return common_cancel_requests(rows)


def rescue_expired(
    conn: sqlite3.Connection, spared: Collection[tuple[int, int]], now: float
) -> list[TaskInfo]:
    rows = conn.execute(
        "SELECT t.*, n.heartbeat_at AS node_heartbeat_at FROM tasks t"
        " LEFT JOIN nodes n ON n.id = t.owner_node"
        " WHERE t.status = 'running' AND t.lease_expires_at < ?",
        (now,),
    ).fetchall()
    return [
        info(end(conn, plan_rescue(task_state(r), r["node_heartbeat_at"], now)))
        for r in rows
        if (r["id"], r["fence"]) not in spared
    ]


def settle_orphan(
    conn: sqlite3.Connection, task_id: int, fence: int, reason: str, now: float
) -> TaskInfo:
    found = task_row(conn, task_id)
    ending = plan_orphan_settlement(task_state(found), fence, reason, now)
    return info(found if ending is None else end(conn, ending))


def request_cancel(conn: sqlite3.Connection, task_id: int, force: bool, now: float) -> TaskInfo:
    found = task_row(conn, task_id)
    plan = plan_cancel(task_state(found), force=force, now=now)
    if isinstance(plan, Ending):
        return info(end(conn, plan))
    if isinstance(plan, CancelRequest):
        conn.execute(
            "UPDATE tasks SET cancel_requested = ? WHERE id = ?", (plan.mode.value, task_id)
        )
        log_event(conn, plan.event)
        return info(task_row(conn, task_id))
    return info(found)


# -- the pieces ----------------------------------------------------------------


def task_row(conn: sqlite3.Connection, task_id: int) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
    if row is None:
        raise no_task(task_id)
    return row  # type: ignore[no-any-return]


def fenced(conn: sqlite3.Connection, task_id: int, fence: int) -> sqlite3.Row:
    """The task row if `fence` still owns it, else `LeaseLost` (see `check_fence`)."""
    row = task_row(conn, task_id)
    check_fence(task_state(row), fence)
    return row


def log_event(conn: sqlite3.Connection, event: TaskEvent) -> None:
    """Log an event the triggers do not (one that changes neither status nor fence)."""
    conn.execute(
        f"INSERT INTO events ({EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", event_values(event)
    )


def update(conn: sqlite3.Connection, task_id: int, columns: dict[str, Any]) -> sqlite3.Row:
    """Set a task's columns; the triggers log the transition. The row as written."""
    assignments = ", ".join(f"{name} = :{name}" for name in columns)
    return conn.execute(  # type: ignore[no-any-return]
        f"UPDATE tasks SET {assignments} WHERE id = :id RETURNING *", {**columns, "id": task_id}
    ).fetchone()


def end(conn: sqlite3.Connection, ending: Ending) -> sqlite3.Row:
    """Write the end of an attempt (or of a waiting task), and close the attempt's record."""
    updated = update(conn, ending.task_id, ending_columns(ending))
    attempt = ending.attempt
    if attempt is not None:
        conn.execute(
            "UPDATE attempts SET finished_at = ?, outcome = ?, exit_code = ?, reason = ?"
            " WHERE task_id = ? AND fence = ?",
            (
                ending.at,
                attempt.outcome.value,
                attempt.exit_code,
                attempt.reason,
                ending.task_id,
                attempt.fence,
            ),
        )
    return updated


def finish(
    conn: sqlite3.Connection, task_id: int, fence: int, outcome: Outcome, now: float
) -> sqlite3.Row:
    return end(conn, plan_finish(task_state(task_row(conn, task_id)), fence, outcome, now))


def _locks(text: str) -> frozenset[str]:
    return frozenset(json.loads(text)) if text != "[]" else frozenset()


def _slot(row: sqlite3.Row) -> Slot:
    return Slot(
        task_id=row["id"],
        project=row["project"],
        template=row["template"],
        template_parallel=bool(row["template_parallel"]),
        locks=_locks(row["locks"]),
    )


def claim(
    conn: sqlite3.Connection, node_id: str, limits: Limits, lease_ttl_s: float, now: float
) -> list[Claim]:
    node = conn.execute("SELECT stopped_at FROM nodes WHERE id = ?", (node_id,)).fetchone()
    if node is not None and node["stopped_at"] is not None:
        return []  # a stopped node runs nothing: its claim would be left for lease expiry
    rows = conn.execute(
        "SELECT id, project, template, template_parallel, locks, owner_node FROM tasks"
        " WHERE status = 'running' AND lease_expires_at >= ?",
        (now,),
    ).fetchall()
    states: dict[int, TaskState] = {}

    def fetch(prefilter: Prefilter, taken: Sequence[int], window: int) -> list[Slot]:
        found = candidates(conn, now, prefilter, taken, window)
        states.update((r["id"], task_state(r)) for r in found)
        return [_slot(r) for r in found]

    def fetch_heads(prefilter: Prefilter, taken: Sequence[int], n: int) -> list[Slot]:
        found = project_heads(conn, now, prefilter, taken, n)
        states.update((r["id"], task_state(r)) for r in found)
        return [_slot(r) for r in found]

    running = [_slot(r) for r in rows]
    node_running = sum(1 for r in rows if r["owner_node"] == node_id)
    if limits.fair_share is None:
        chosen = claim_in_windows(
            fetch,
            running,
            node_running=node_running,
            max_parallel=limits.max_parallel,
            project_limits=limits.project_limits,
        )
    else:
        clock = FairClock.of(
            {
                r["project"]: (r["start_tag"], r["finish_tag"])
                for r in conn.execute("SELECT project, start_tag, finish_tag FROM fair_tags")
            }
        )
        chosen = claim_fair_in_windows(
            fetch_heads,
            running,
            node_running=node_running,
            max_parallel=limits.max_parallel,
            project_limits=limits.project_limits,
            fair_share=limits.fair_share,
            clock=clock,
        )
        conn.executemany(
            "INSERT INTO fair_tags (project, start_tag, finish_tag) VALUES (?, ?, ?)"
            " ON CONFLICT (project) DO UPDATE SET start_tag = max(start_tag, excluded.start_tag),"
            " finish_tag = max(finish_tag, excluded.finish_tag)",
            [(p, *tags) for p, tags in fair_tags(clock, chosen, limits.fair_share).items()],
        )
    claims = []
    for slot in chosen:
        start = plan_start(states[slot.task_id], node_id, now, lease_ttl_s)
        row = update(conn, slot.task_id, start_columns(start))
        conn.execute(
            "INSERT INTO attempts (task_id, fence, node_id, claimed_at) VALUES (?, ?, ?, ?)",
            (slot.task_id, start.fence, node_id, now),
        )
        claims.append(Claim(info(row)))
    return claims


def info(r: sqlite3.Row) -> TaskInfo:
    env = r["env"]
    return task_info(
        r,
        argv=json.loads(r["argv"]),
        env=json.loads(env) if env is not None else None,
        pass_env=json.loads(r["pass_env"]),
        locks=sorted(_locks(r["locks"])),
    )


#: Tasks per INSERT statement in `insert_tasks`: at 28 parameters a row, well under
#: SQLite's default limit of 32,766 bound parameters per statement.
_INSERT_ROWS = 500


def insert_tasks(
    conn: sqlite3.Connection, specs: Sequence[TaskSpec], now: float, *, reason: str = "submitted"
) -> list[int]:
    """Insert checked specs as waiting tasks, and their locks; their ids in order. Runs
    in the caller's transaction: all of them are stored or none. `reason` is each
    one's first event's. Every id in a spec's `after` must exist (`InvalidTask`)."""
    plans = dependency_plans(conn, specs)
    ids: list[int] = []
    for start in range(0, len(specs), _INSERT_ROWS):
        chunk = specs[start : start + _INSERT_ROWS]
        held = [plan is not None and plan.held for plan in plans[start : start + _INSERT_ROWS]]
        values = ", ".join(["('waiting'" + ", ?" * 28 + ")"] * len(chunk))
        params = [
            value
            for spec, hold in zip(chunk, held, strict=True)
            for value in (
                json.dumps(list(spec.argv)),
                spec.cwd,
                json.dumps(dict(spec.env)) if spec.env is not None else None,
                json.dumps(sorted(spec.pass_env)),
                int(spec.inherit_env),
                spec.project,
                spec.template,
                int(spec.template_parallel),
                json.dumps(sorted(spec.locks)),
                spec.priority,
                now,
                HELD_FOR_DEPENDENCIES if hold else spec.not_before or 0.0,
                spec.timeout_s,
                spec.stall_timeout_s,
                spec.max_attempts,
                spec.retry_backoff_s,
                reason,
                now,
                spec.memory_max,
                spec.pids_max,
                spec.cpu_max,
                spec.retry_jitter,
                spec.retry_max_delay_s,
                json.dumps(sorted(spec.retry_on)) if spec.retry_on is not None else None,
                spec.unique_key,
                spec.on_conflict,
                json.dumps(spec.after) if spec.after else None,
                spec.not_before if hold else None,
            )
        ]
        rows = conn.execute(
            "INSERT INTO tasks (status, argv, cwd, env, pass_env, inherit_env, project,"
            " template, template_parallel, locks, priority, submitted_at, not_before,"
            " timeout_s, stall_timeout_s, max_attempts, retry_backoff_s, reason, changed_at,"
            " memory_max, pids_max, cpu_max, retry_jitter, retry_max_delay_s, retry_on,"
            " unique_key, on_conflict, after_ids, after_not_before)"
            f" VALUES {values} RETURNING id",
            params,
        ).fetchall()
        # RETURNING's order is unspecified, but AUTOINCREMENT gives one statement's rows
        # ascending ids in the order of its VALUES: sorted, they match the specs.
        chunk_ids = sorted(row[0] for row in rows)
        conn.executemany(
            "INSERT INTO task_locks (task_id, lock_name) VALUES (?, ?)",
            [
                (task_id, name)
                for task_id, spec in zip(chunk_ids, chunk, strict=True)
                for name in spec.locks
            ],
        )
        ids += chunk_ids
    if any(plan is not None for plan in plans):
        _link_dependencies(conn, specs, plans, ids, now)
    return ids


def dependency_plans(
    conn: sqlite3.Connection, specs: Sequence[TaskSpec]
) -> list[DependencyStart | None]:
    """How each spec starts out as its dependencies stand (None: it has none);
    `InvalidTask` if one names a task that does not exist. One read for the batch."""
    wanted = sorted({task_id for spec in specs for task_id in spec.after})
    if not wanted:
        return [None] * len(specs)
    rows = conn.execute(
        "SELECT id, status, reason FROM tasks WHERE id IN (SELECT value FROM json_each(?))",
        (json.dumps(wanted),),
    ).fetchall()
    found = {r[0]: Status(r[1]) for r in rows}
    reasons = {r[0]: r[2] for r in rows}
    return [plan_dependencies(spec.after, found, reasons) if spec.after else None for spec in specs]


def _link_dependencies(
    conn: sqlite3.Connection,
    specs: Sequence[TaskSpec],
    plans: Sequence[DependencyStart | None],
    ids: Sequence[int],
    now: float,
) -> None:
    """The new tasks' edges (what the triggers of migration 0009 follow), and the end
    of each whose dependency had already ended without succeeding."""
    conn.executemany(
        "INSERT INTO task_after (task_id, after_id) VALUES (?, ?)",
        [
            (task_id, after)
            for task_id, spec in zip(ids, specs, strict=True)
            for after in spec.after
        ],
    )
    for task_id, plan in zip(ids, plans, strict=True):
        if plan is not None and plan.cancel_reason is not None:
            row = task_row(conn, task_id)
            end(conn, plan_dependency_cancel(task_state(row), plan.cancel_reason, now))
