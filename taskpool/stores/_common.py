"""What both SQL backends share: one schema's columns, read and written the same way.

The decisions themselves (fences, endings, reasons, cancels) live in
`taskpool._decisions` and the blocking policy in `taskpool._rules`; here is only
how a row becomes the plain data they take, and how their results become columns.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from .._decisions import HELD_FOR_DEPENDENCIES, Ending, Start, TaskState
from .._errors import StoreError, TaskNotFound
from .._models import CancelMode, NodeInfo, Status, TaskEvent, TaskInfo, TaskSpec
from .._store import Renewal


class Row(Protocol):
    """A database row read by column name (sqlite3.Row, asyncpg.Record)."""

    def __getitem__(self, key: str, /) -> Any: ...


def no_task(task_id: int) -> TaskNotFound:
    return TaskNotFound(f"no task {task_id}")


def task_state(r: Row) -> TaskState:
    """What the decisions read of a task row."""
    return TaskState(
        id=r["id"],
        status=Status(r["status"]),
        fence=r["fence"],
        attempts_used=r["attempts_used"],
        max_attempts=r["max_attempts"],
        retry_backoff_s=r["retry_backoff_s"],
        owner_node=r["owner_node"],
        lease_expires_at=r["lease_expires_at"],
        cancel_requested=r["cancel_requested"],
        retry_jitter=r["retry_jitter"],
        retry_max_delay_s=r["retry_max_delay_s"],
        retry_on=retry_on_column(r["retry_on"]),
    )


def retry_on_column(value: str | list[str] | None) -> frozenset[str] | None:
    """A task's `retry_on` as stored: a JSON list in SQLite, an array in PostgreSQL,
    NULL for the default."""
    if value is None:
        return None
    return frozenset(json.loads(value) if isinstance(value, str) else value)


def after_column(value: str | list[int] | None) -> tuple[int, ...]:
    """A task's `after` as stored: a JSON list in SQLite, an array in PostgreSQL, NULL
    for none."""
    if value is None:
        return ()
    return tuple(json.loads(value) if isinstance(value, str) else value)


def asked_not_before(r: Row) -> float | None:
    """The start time the task's submitter asked for: while it is held for its
    dependencies (`HELD_FOR_DEPENDENCIES`), the one kept aside until they succeed."""
    not_before = r["not_before"]
    if not_before == HELD_FOR_DEPENDENCIES:
        not_before = r["after_not_before"]
    return not_before or None


def ending_columns(e: Ending) -> dict[str, Any]:
    """The task columns an `Ending` writes."""
    columns: dict[str, Any] = {
        "status": e.status.value,
        "attempts_used": e.attempts_used,
        "lease_expires_at": None,
        "exit_code": e.exit_code,
        "reason": e.reason,
        "changed_at": e.at,
    }
    if e.requeued:
        columns.update(owner_node=None, not_before=e.not_before, pid=None, pid_started_at=None)
    else:
        columns["finished_at"] = e.at
    return columns


def start_columns(s: Start) -> dict[str, Any]:
    """The task columns a `Start` writes."""
    return {
        "status": Status.RUNNING.value,
        "fence": s.fence,
        "attempts_used": s.attempts_used,
        "owner_node": s.owner_node,
        "lease_expires_at": s.lease_expires_at,
        "started_at": s.at,
        "changed_at": s.at,
        "pid": None,
        "pid_started_at": None,
        "exit_code": None,
        "reason": s.reason,
    }


#: The columns of an event row, in the order `event_values` gives them.
EVENT_COLUMNS = "task_id, at, fence, node_id, from_status, to_status, reason"


def event_values(e: TaskEvent) -> tuple[Any, ...]:
    """An event's values without its id (the database numbers it)."""
    return (
        e.task_id,
        e.at,
        e.fence,
        e.node_id,
        e.from_status.value if e.from_status is not None else None,
        e.to_status.value,
        e.reason,
    )


#: The columns of a node row, in the order `node_values` gives them.
NODE_COLUMNS = (
    "id, host, pid, pid_started_at, started_at, heartbeat_at, max_parallel, containment,"
    " project_limits, fair_share"
)


def node_values(n: NodeInfo) -> tuple[Any, ...]:
    return (
        n.id,
        n.host,
        n.pid,
        n.pid_started_at,
        n.started_at,
        n.heartbeat_at,
        n.max_parallel,
        n.containment,
        json.dumps(dict(sorted(n.project_limits.items()))),  # JSON text on both backends
        None if n.fair_share is None else json.dumps(dict(sorted(n.fair_share.items()))),
    )


def alive_filter(alive: bool | None) -> str:
    """The condition `list_nodes(alive=...)` adds (none for None)."""
    if alive is None:
        return ""
    return " AND stopped_at IS NULL" if alive else " AND stopped_at IS NOT NULL"


def renewal(rows: list[Row]) -> Renewal:
    """A renewal from the renewed rows (id, fence, cancel_requested)."""
    return Renewal(
        held={r["id"]: r["fence"] for r in rows},
        cancel_requests={r["id"]: r["cancel_requested"] for r in rows if r["cancel_requested"]},
    )


def cancel_requests(rows: list[Row]) -> dict[int, tuple[int, CancelMode]]:
    """A node's cancel requests from its running tasks' rows (id, fence, cancel_requested)."""
    return {r["id"]: (r["fence"], CancelMode(r["cancel_requested"])) for r in rows}


def check_schema_version(applied: set[int], known: list[int]) -> None:
    """Refuse a database migrated by a newer taskpool: its columns and meanings are
    ones this code does not know, so it fails now rather than at a later query."""
    newest_known = max(known, default=0)
    newest = max(applied, default=0)
    if newest > newest_known:
        raise StoreError(
            f"schema version {newest} is newer than this taskpool supports ({newest_known});"
            " upgrade taskpool to use this database"
        )


def task_info(
    r: Row,
    *,
    argv: list[str],
    env: dict[str, str] | None,
    pass_env: list[str],
    locks: list[str],
) -> TaskInfo:
    """A TaskInfo from a task row whose structured columns the backend decoded."""
    spec = TaskSpec(
        argv=tuple(argv),
        cwd=r["cwd"],
        env=env,
        pass_env=frozenset(pass_env),
        inherit_env=bool(r["inherit_env"]),
        project=r["project"],
        template=r["template"],
        template_parallel=bool(r["template_parallel"]),
        locks=frozenset(locks),
        priority=r["priority"],
        not_before=asked_not_before(r),
        timeout_s=r["timeout_s"],
        stall_timeout_s=r["stall_timeout_s"],
        max_attempts=r["max_attempts"],
        retry_backoff_s=r["retry_backoff_s"],
        memory_max=r["memory_max"],
        pids_max=r["pids_max"],
        cpu_max=r["cpu_max"],
        retry_jitter=r["retry_jitter"],
        retry_max_delay_s=r["retry_max_delay_s"],
        retry_on=retry_on_column(r["retry_on"]),
        unique_key=r["unique_key"],
        on_conflict=r["on_conflict"],
        after=after_column(r["after_ids"]),
    )
    return TaskInfo(
        id=r["id"],
        spec=spec,
        status=Status(r["status"]),
        submitted_at=r["submitted_at"],
        attempts_used=r["attempts_used"],
        fence=r["fence"],
        owner_node=r["owner_node"],
        lease_expires_at=r["lease_expires_at"],
        pid=r["pid"],
        started_at=r["started_at"],
        finished_at=r["finished_at"],
        exit_code=r["exit_code"],
        reason=r["reason"],
        cancel_requested=CancelMode(r["cancel_requested"]) if r["cancel_requested"] else None,
    )


def event_from_row(r: Row) -> TaskEvent:
    return TaskEvent(
        id=r["id"],
        task_id=r["task_id"],
        at=r["at"],
        fence=r["fence"],
        node_id=r["node_id"],
        from_status=Status(r["from_status"]) if r["from_status"] else None,
        to_status=Status(r["to_status"]),
        reason=r["reason"],
    )


def node_from_row(r: Row) -> NodeInfo:
    return NodeInfo(
        id=r["id"],
        host=r["host"],
        pid=r["pid"],
        pid_started_at=r["pid_started_at"],
        started_at=r["started_at"],
        heartbeat_at=r["heartbeat_at"],
        stopped_at=r["stopped_at"],
        max_parallel=r["max_parallel"],
        containment=r["containment"],
        project_limits=json.loads(r["project_limits"]),
        fair_share=None if r["fair_share"] is None else json.loads(r["fair_share"]),
    )
