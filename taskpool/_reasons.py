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


#: How a dependency's unsuccessful end is said in its dependants' reasons, by the
#: status it ended in. The SQL stores' triggers (SQLite migration 0009, PostgreSQL
#: 0013) say the same in a CASE; the store contract tests compare them.
_DEPENDENCY_ENDED = {
    "failed": "failed",
    "timed_out": "timed out",
    "stalled": "stalled",
    "cancelled": "was cancelled",
    "lost": "was lost",
}


def dependency_reason(dependency_id: int, status: str) -> str:
    """Why a task was cancelled: a task it runs after ended in `status`, not succeeded."""
    return f"dependency {dependency_id} {_DEPENDENCY_ENDED[status]}"


def dependency_chain_reason(dependency_id: int, root_reason: str) -> str:
    """Why a task further down a chain was cancelled: the dependency it runs after was
    cancelled in the same cascade, whose first reason was `root_reason`."""
    return f"dependency {dependency_id} was cancelled: {root_reason}"


def dependency_root(reason: str | None) -> str | None:
    """The first reason of the cascade that cancelled a task for a dependency (its own
    reason, or what its chain's reason ends with); None for a task cancelled otherwise."""
    if reason is None or not reason.startswith("dependency "):
        return None
    _, chained, root = reason.partition(" was cancelled: ")
    return root if chained else reason


def waiting_for_dependency(dependency_id: int, status: str) -> str:
    """What holds a task whose dependency has not succeeded yet (`why`)."""
    return f"waiting for dependency {dependency_id} ({status})"
