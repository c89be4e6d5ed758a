"""What every SQL backend computes the same way: pure helpers over plain values.

The backends differ in dialect and driver only; the columns an ended attempt
writes, the reasons recorded and the claim loop's window live here once.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from .._errors import StoreError
from .._models import (
    CancelMode,
    Limits,
    NodeInfo,
    Status,
    TaskEvent,
    TaskInfo,
    TaskSpec,
    Transition,
)
from .._rules import Occupancy


class Row(Protocol):
    """A database row read by column name (sqlite3.Row, asyncpg.Record)."""

    def __getitem__(self, key: str, /) -> Any: ...


#: At most how many waiting tasks one claim query looks at. Blocked ones are filtered
#: in SQL, so the first candidate of a window is always runnable and a few per free
#: slot suffice (the claim loop looks again when a window came back full).
CLAIM_WINDOW = 64


def claim_window(free_slots: int) -> int:
    return min(CLAIM_WINDOW, 2 * free_slots + 2)


def blocked_lists(occ: Occupancy, limits: Limits) -> dict[str, list[str]]:
    """What the running attempts block, as lists the candidate query filters on."""
    return {
        "full_projects": sorted(
            p for p, n in occ.per_project.items() if n >= limits.project_limits.get(p, n + 1)
        ),
        "templates_exclusive": sorted(occ.templates_exclusive),
        "templates_any": sorted(occ.templates_any),
        "locks_held": sorted(occ.locks_held),
    }


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


def iso(ts: float | None) -> str:
    if ts is None:
        return "never"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def rescue_reason(owner: str | None, heartbeat_at: float | None, lease_expires_at: float) -> str:
    said = (
        f"owner node {owner} stopped heartbeating at {iso(heartbeat_at)}"
        if heartbeat_at is not None
        else f"owner node {owner} is unknown"
    )
    return f"{said} (lease expired at {iso(lease_expires_at)})"


def handback_reason(node_id: str, stop_reason: str) -> str:
    return (
        f"handed back without using an attempt: node {node_id} stopped ({stop_reason})"
        " while it held the task"
    )


def ended_columns(
    row: Row, transition: Transition, now: float, exit_code: int | None
) -> dict[str, Any]:
    """The task columns to write when an attempt (or a waiting task) ends."""
    attempts_used = row["attempts_used"]
    if row["status"] == Status.RUNNING and not transition.consumes_attempt:
        attempts_used -= 1  # shutdown refunds the attempt
    columns: dict[str, Any] = {
        "status": str(transition.status),
        "attempts_used": attempts_used,
        "lease_expires_at": None,
        "exit_code": exit_code,
        "reason": transition.reason,
        "changed_at": now,
    }
    if transition.status is Status.WAITING:
        columns.update(
            owner_node=None, not_before=transition.not_before or 0.0, pid=None, pid_started_at=None
        )
    else:
        columns["finished_at"] = now
    return columns


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
        not_before=r["not_before"] or None,
        timeout_s=r["timeout_s"],
        stall_timeout_s=r["stall_timeout_s"],
        max_attempts=r["max_attempts"],
        retry_backoff_s=r["retry_backoff_s"],
        memory_max=r["memory_max"],
        pids_max=r["pids_max"],
        cpu_max=r["cpu_max"],
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
    )
