"""The reasons a store records, as operators read them in events and `show`.

Pure texts, each written once: PostgreSQL's claim function formats `claim_reason`'s
text in SQL too (the differential claim test compares them).
"""

from __future__ import annotations

import time


def iso(ts: float | None) -> str:
    if ts is None:
        return "never"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def claim_reason(node_id: str, attempt: int, max_attempts: int) -> str:
    """Why a task runs: the node and the attempt number (PostgreSQL's claim function
    formats the same text in SQL; the differential claim test compares them)."""
    return f"claimed by node {node_id} (attempt {attempt} of {max_attempts})"


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


def replaced_reason(new_task_id: int, unique_key: str) -> str:
    return (
        f"replaced by task {new_task_id} (unique key {unique_key!r}, on_conflict replace_waiting)"
    )
