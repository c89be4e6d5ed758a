"""SQLite's operations, each run inside the writer's transaction (or a read one).

They read rows, ask `taskpool._decisions` (or `taskpool._rules` for a claim) what
to do, and write the answer; the triggers of the first migration log every
transition. The store (`sqlite.py`) runs them; nothing here knows about threads.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Sequence
from dataclasses import fields
from typing import Any

from .._decisions import (
    CancelRequest,
    Ending,
    TaskState,
    check_fence,
    plan_cancel,
    plan_finish,
    plan_handback,
    plan_orphan_settlement,
    plan_rescue,
    plan_start,
)
from .._models import Claim, Limits, Outcome, TaskEvent, TaskInfo, TaskSpec
from .._rules import Prefilter, Slot, claim_in_windows, merge_group_windows
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


#: The SQL form of each list of `Prefilter`, about the task row `{t}`: those that
#: look only at what a `Group` shares (so they block groups whole), then those that
#: look at each task (with the tasks this claim has taken already). Each is added
#: only when its list is non-empty, so the common query stays a plain index walk.
_GROUP_FILTERS = {
    "full_projects": "{t}.project NOT IN (SELECT value FROM json_each(:full_projects))",
    "templates_exclusive": "({t}.template IS NULL OR {t}.template NOT IN "
    "(SELECT value FROM json_each(:templates_exclusive)))",
    "templates_any": "({t}.template IS NULL OR {t}.template_parallel "
    "OR {t}.template NOT IN (SELECT value FROM json_each(:templates_any)))",
}
_TASK_FILTERS = {
    "locks_held": "NOT EXISTS (SELECT 1 FROM task_locks l WHERE l.task_id = {t}.id "
    "AND l.lock_name IN (SELECT value FROM json_each(:locks_held)))",
    "taken": "{t}.id NOT IN (SELECT value FROM json_each(:taken))",
}

#: The columns a claim reads of a waiting task: its routing, its place in the queue
#: and its state.
_CANDIDATE_COLUMNS = (
    "id, project, template, template_parallel, locks, priority, status, fence,"
    " attempts_used, max_attempts, retry_backoff_s, owner_node, lease_expires_at,"
    " cancel_requested"
)

#: How many waiting tasks, per candidate wanted, the plain window reads at most
#: before it gives way to reading group by group.
PLAIN_SCAN_PER_CANDIDATE = 4

#: The first waiting task (in index order) of the group after task `g`'s: the next
#: template_parallel of its template, else its project's next template, else the next
#: project. Each is one seek in `tasks_waiting_group`: the loose index scan that
#: lists the groups without reading their rows.
_NEXT_GROUP = """COALESCE(
    (SELECT n.id FROM tasks n WHERE n.status = 'waiting' AND n.project = g.project
        AND n.template IS g.template AND n.template_parallel > g.template_parallel
        ORDER BY n.template_parallel, n.priority DESC, n.id LIMIT 1),
    CASE WHEN g.template IS NULL
    THEN (SELECT n.id FROM tasks n WHERE n.status = 'waiting' AND n.project = g.project
        AND n.template >= '' ORDER BY n.template, n.template_parallel, n.priority DESC, n.id
        LIMIT 1)
    ELSE (SELECT n.id FROM tasks n WHERE n.status = 'waiting' AND n.project = g.project
        AND n.template > g.template ORDER BY n.template, n.template_parallel, n.priority DESC,
        n.id LIMIT 1)
    END,
    (SELECT n.id FROM tasks n WHERE n.status = 'waiting' AND n.project > g.project
        ORDER BY n.project, n.template, n.template_parallel, n.priority DESC, n.id LIMIT 1))"""


def _in_group(t: str, group: str, task_filters: list[str]) -> str:
    """Task row `t` is a waiting task of the group whose columns are `{group}project`,
    `{group}template`, `{group}template_parallel`, ready, and left by the task filters."""
    return (
        f"{t}.status = 'waiting' AND {t}.project = {group}project"
        f" AND {t}.template IS {group}template"
        f" AND {t}.template_parallel = {group}template_parallel AND {t}.not_before <= :now"
        + _and(_TASK_FILTERS, task_filters, t)
    )


def _filters(
    prefilter: Prefilter, taken: Sequence[int]
) -> tuple[list[str], list[str], dict[str, object]]:
    """The group filters and the task filters that apply (their names), and their
    parameters: each list as a JSON array."""
    lists = {f.name: getattr(prefilter, f.name) for f in fields(prefilter)}
    lists["taken"] = taken
    params: dict[str, object] = {
        name: json.dumps(list(values)) for name, values in lists.items() if values
    }
    return (
        [n for n in _GROUP_FILTERS if n in params],
        [n for n in _TASK_FILTERS if n in params],
        params,
    )


def _and(sql: dict[str, str], names: list[str], alias: str) -> str:
    return "".join(f" AND {sql[name].format(t=alias)}" for name in names)


def _candidates(
    conn: sqlite3.Connection, now: float, prefilter: Prefilter, taken: Sequence[int], window: int
) -> list[sqlite3.Row]:
    """The first `window` waiting tasks in queue order, minus those certainly blocked or
    already taken.

    First a plain window: the first few waiting tasks of the queue index, filtered.
    Only if that is short although more tasks wait behind it (blocked tasks crowd the
    head of the queue) is the window read group by group (`_window_by_groups`), which
    never reads the tasks of a group blocked whole, however many wait."""
    group_filters, task_filters, params = _filters(prefilter, taken)
    scan = PLAIN_SCAN_PER_CANDIDATE * window
    where = _and(_GROUP_FILTERS, group_filters, "t") + _and(_TASK_FILTERS, task_filters, "t")
    found: list[sqlite3.Row] = conn.execute(
        f"SELECT * FROM (SELECT {_CANDIDATE_COLUMNS}, not_before FROM tasks"
        " WHERE status = 'waiting' ORDER BY priority DESC, id LIMIT :scan) AS t"
        f" WHERE t.not_before <= :now{where} ORDER BY t.priority DESC, t.id LIMIT :window",
        {**params, "now": now, "scan": scan, "window": window},
    ).fetchall()
    if len(found) == window:
        return found
    (queued,) = conn.execute(
        "SELECT COUNT(*) FROM (SELECT 1 FROM tasks WHERE status = 'waiting'"
        " ORDER BY priority DESC, id LIMIT :scan)",
        {"scan": scan},
    ).fetchone()
    if queued < scan:
        return found  # the plain window read the whole queue
    return _window_by_groups(conn, now, group_filters, task_filters, params, window)


def _window_by_groups(
    conn: sqlite3.Connection,
    now: float,
    group_filters: list[str],
    task_filters: list[str],
    params: dict[str, object],
    window: int,
) -> list[sqlite3.Row]:
    """`_candidates`' window, read group by group: the groups the group filters leave,
    ranked by their first task the task filters leave (one statement: a loose index
    scan lists the groups), then `merge_group_windows` over them."""
    groups = _and(_GROUP_FILTERS, group_filters, "g")
    ranked = conn.execute(
        "WITH RECURSIVE firsts(id) AS ("
        " SELECT (SELECT id FROM tasks WHERE status = 'waiting'"
        "  ORDER BY project, template, template_parallel, priority DESC, id LIMIT 1)"
        f" UNION ALL SELECT {_NEXT_GROUP} FROM firsts JOIN tasks g ON g.id = firsts.id"
        "), offered AS ("
        " SELECT g.project, g.template, g.template_parallel,"
        f"  (SELECT h.id FROM tasks h WHERE {_in_group('h', 'g.', task_filters)}"
        "   ORDER BY h.priority DESC, h.id LIMIT 1) AS head"
        f" FROM firsts JOIN tasks g ON g.id = firsts.id WHERE 1{groups}"
        ")"
        " SELECT o.project, o.template, o.template_parallel FROM offered o"
        " JOIN tasks t ON t.id = o.head ORDER BY t.priority DESC, t.id LIMIT :window",
        {**params, "now": now, "window": window},
    ).fetchall()
    read_group = (
        f"SELECT {_CANDIDATE_COLUMNS} FROM tasks t"
        f" WHERE {_in_group('t', ':', task_filters)}"
        " ORDER BY t.priority DESC, t.id LIMIT :n"
    )

    def fetch_group(group: sqlite3.Row, n: int) -> list[sqlite3.Row]:
        return conn.execute(
            read_group,
            {
                **params,
                "now": now,
                "n": n,
                "project": group["project"],
                "template": group["template"],
                "template_parallel": group["template_parallel"],
            },
        ).fetchall()

    return merge_group_windows(ranked, fetch_group, lambda r: (-r["priority"], r["id"]), window)


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
        found = _candidates(conn, now, prefilter, taken, window)
        states.update((r["id"], task_state(r)) for r in found)
        return [_slot(r) for r in found]

    chosen = claim_in_windows(
        fetch,
        [_slot(r) for r in rows],
        node_running=sum(1 for r in rows if r["owner_node"] == node_id),
        max_parallel=limits.max_parallel,
        project_limits=limits.project_limits,
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


#: Tasks per INSERT statement in `insert_tasks`: at 20 parameters a row, well under
#: SQLite's default limit of 32,766 bound parameters per statement.
_INSERT_ROWS = 500


def insert_tasks(conn: sqlite3.Connection, specs: Sequence[TaskSpec], now: float) -> list[int]:
    """Insert checked specs as waiting tasks, and their locks; their ids in order. Runs
    in the caller's transaction: all of them are stored or none."""
    ids: list[int] = []
    for start in range(0, len(specs), _INSERT_ROWS):
        chunk = specs[start : start + _INSERT_ROWS]
        values = ", ".join(
            ["('waiting', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'submitted', ?, ?, ?, ?)"]
            * len(chunk)
        )
        params = [
            value
            for spec in chunk
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
                spec.not_before or 0.0,
                spec.timeout_s,
                spec.stall_timeout_s,
                spec.max_attempts,
                spec.retry_backoff_s,
                now,
                spec.memory_max,
                spec.pids_max,
                spec.cpu_max,
            )
        ]
        rows = conn.execute(
            "INSERT INTO tasks (status, argv, cwd, env, pass_env, inherit_env, project,"
            " template, template_parallel, locks, priority, submitted_at, not_before,"
            " timeout_s, stall_timeout_s, max_attempts, retry_backoff_s, reason, changed_at,"
            f" memory_max, pids_max, cpu_max) VALUES {values} RETURNING id",
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
    return ids
