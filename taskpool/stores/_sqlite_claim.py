"""How SQLite's claim reads the waiting tasks it offers to `claim_in_windows`: one
window at a time, each the first waiting tasks in queue order minus those `Prefilter`
says are certainly blocked, and minus those this claim has taken already.

Every walk is over an index of the queue the claim reads: waiting tasks but those held
for their dependencies (`QUEUED`), so no number of held tasks costs a claim anything.

The common case is one short walk of the queue index (`tasks_waiting`). When blocked
tasks crowd the head of the queue (a project at its limit with a long backlog, a
running template's other tasks), that walk would read every one of them on every
claim; instead the window is read group by group: a loose index scan over
`tasks_waiting_group` lists the blocking groups (`Group`: project, template,
template_parallel) without reading their rows, `Prefilter.blocks_group` rules out
the blocked ones, and `merge_group_windows` reads the rest. The window is the same
either way; only its cost differs.

A fair claim (`claim_fair_in_windows`) reads the head of every project instead
(`project_heads`): the groups listed the same way, each group's first tasks, cut to
each project's first ones.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import fields

from .._rules import Group, Prefilter, QueueKey, merge_group_windows

#: The SQL form of each list of `Prefilter`, about the task row `{t}`: those that look
#: only at what a `Group` shares, then those that look at each task (with the tasks
#: this claim has taken already). Each is added only when its list is non-empty, so the
#: common query stays a plain index walk.
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
CANDIDATE_COLUMNS = (
    "id, project, template, template_parallel, locks, priority, status, fence,"
    " attempts_used, max_attempts, retry_backoff_s, owner_node, lease_expires_at,"
    " cancel_requested, retry_jitter, retry_max_delay_s, retry_on"
)

#: How many waiting tasks, per candidate wanted, the plain window reads at most before
#: the window is read group by group. One: the plain window reads what it would return
#: if nothing among them is blocked, the common case.
PLAIN_SCAN_PER_CANDIDATE = 1

#: Past this many blocking groups waiting, listing them costs more than walking past
#: blocked tasks is likely to: the window is read by an unbounded plain walk instead.
MAX_GROUPS = 256

#: Task row `{t}` is in the queue a claim reads: waiting, and not held for its run-after
#: dependencies (not_before = +Infinity, `HELD_FOR_DEPENDENCIES`). The WHERE of the queue
#: indexes, word for word (migration 0011): SQLite uses a partial index only for a query
#: whose WHERE has each of its terms.
QUEUED = "{t}.status = 'waiting' AND {t}.not_before < 9e999"

#: The first waiting task (in index order) of the group after task `g`'s: the next
#: template_parallel of its template, else its project's next template, else the next
#: project. Each is one seek in `tasks_waiting_group`.
_NEXT_GROUP = f"""COALESCE(
    (SELECT n.id FROM tasks n WHERE {QUEUED.format(t="n")} AND n.project = g.project
        AND n.template IS g.template AND n.template_parallel > g.template_parallel
        ORDER BY n.template_parallel, n.priority DESC, n.id LIMIT 1),
    CASE WHEN g.template IS NULL
    THEN (SELECT n.id FROM tasks n WHERE {QUEUED.format(t="n")} AND n.project = g.project
        AND n.template >= '' ORDER BY n.template, n.template_parallel, n.priority DESC, n.id
        LIMIT 1)
    ELSE (SELECT n.id FROM tasks n WHERE {QUEUED.format(t="n")} AND n.project = g.project
        AND n.template > g.template ORDER BY n.template, n.template_parallel, n.priority DESC,
        n.id LIMIT 1)
    END,
    (SELECT n.id FROM tasks n WHERE {QUEUED.format(t="n")} AND n.project > g.project
        ORDER BY n.project, n.template, n.template_parallel, n.priority DESC, n.id LIMIT 1))"""

#: Every blocking group with a waiting task, at most :max_groups + 1 of them: the loose
#: index scan, from the first group to the next, one seek each.
_LIST_GROUPS = f"""WITH RECURSIVE firsts(id, n) AS (
    SELECT (SELECT id FROM tasks t WHERE {QUEUED.format(t="t")}
        ORDER BY project, template, template_parallel, priority DESC, id LIMIT 1), 1
    UNION ALL
    SELECT {_NEXT_GROUP}, firsts.n + 1 FROM firsts JOIN tasks g ON g.id = firsts.id
    WHERE firsts.n <= :max_groups
)
SELECT g.project, g.template, g.template_parallel FROM firsts JOIN tasks g ON g.id = firsts.id"""


def candidates(
    conn: sqlite3.Connection, now: float, prefilter: Prefilter, taken: Sequence[int], window: int
) -> list[sqlite3.Row]:
    """The first `window` waiting tasks in queue order, minus those certainly blocked
    or already taken: a plain window if the first tasks of the queue fill it, else
    read group by group, else (too many groups to list) an unbounded plain walk."""
    task_filters, params = _task_filters(prefilter, taken)
    scan = PLAIN_SCAN_PER_CANDIDATE * window
    found = _plain_window(conn, now, prefilter, task_filters, params, window, scan)
    if len(found) == window:
        return found
    (queued,) = conn.execute(
        f"SELECT COUNT(*) FROM (SELECT 1 FROM tasks t WHERE {QUEUED.format(t='t')}"
        " ORDER BY priority DESC, id LIMIT :scan)",
        {"scan": scan},
    ).fetchone()
    if queued < scan:
        return found  # the plain window read the whole queue
    by_groups = _window_by_groups(conn, now, prefilter, task_filters, params, window)
    if by_groups is not None:
        return by_groups
    return _plain_window(conn, now, prefilter, task_filters, params, window, None)


def _task_filters(
    prefilter: Prefilter, taken: Sequence[int]
) -> tuple[list[str], dict[str, object]]:
    """The names of the task filters that apply, and every list's parameter (a JSON
    array) that is not empty."""
    lists = {f.name: getattr(prefilter, f.name) for f in fields(prefilter)}
    lists["taken"] = taken
    params: dict[str, object] = {
        name: json.dumps(list(values)) for name, values in lists.items() if values
    }
    return [name for name in _TASK_FILTERS if name in params], params


def _and(sql: dict[str, str], names: Sequence[str], alias: str) -> str:
    return "".join(f" AND {sql[name].format(t=alias)}" for name in names)


def _plain_window(
    conn: sqlite3.Connection,
    now: float,
    prefilter: Prefilter,
    task_filters: list[str],
    params: dict[str, object],
    window: int,
    scan: int | None,
) -> list[sqlite3.Row]:
    """The window from the first `scan` waiting tasks of the queue index (all of them if
    None), filtered."""
    group_filters = [name for name in _GROUP_FILTERS if name in params]
    where = _and(_GROUP_FILTERS, group_filters, "t") + _and(_TASK_FILTERS, task_filters, "t")
    head = "" if scan is None else " LIMIT :scan"
    rows: list[sqlite3.Row] = conn.execute(
        f"SELECT * FROM (SELECT {CANDIDATE_COLUMNS}, not_before FROM tasks q"
        f" WHERE {QUEUED.format(t='q')} ORDER BY priority DESC, id{head}) AS t"
        f" WHERE t.not_before <= :now{where} ORDER BY t.priority DESC, t.id LIMIT :window",
        {**params, "now": now, "scan": scan, "window": window},
    ).fetchall()
    return rows


def _in_group(t: str, task_filters: list[str]) -> str:
    """Task row `t` is a ready waiting task of the group :project, :template,
    :template_parallel, left by the task filters."""
    return (
        f"{QUEUED.format(t=t)} AND {t}.project = :project AND {t}.template IS :template"
        f" AND {t}.template_parallel = :template_parallel AND {t}.not_before <= :now"
        + _and(_TASK_FILTERS, task_filters, t)
    )


def _window_by_groups(
    conn: sqlite3.Connection,
    now: float,
    prefilter: Prefilter,
    task_filters: list[str],
    params: dict[str, object],
    window: int,
) -> list[sqlite3.Row] | None:
    """The window read group by group, or None if more than `MAX_GROUPS` groups wait.

    The groups are listed without reading their tasks; those the prefilter blocks
    whole are left out; each other group's first task the task filters leave ranks
    it (one seek and a short walk per group); `merge_group_windows` reads the ranked
    groups only as far as they can reach into the window."""
    listed = conn.execute(_LIST_GROUPS, {"max_groups": MAX_GROUPS}).fetchall()
    if len(listed) > MAX_GROUPS:
        return None
    groups = (Group(r["project"], r["template"], bool(r["template_parallel"])) for r in listed)
    offered = [group for group in groups if not prefilter.blocks_group(group)]
    read_head = f"SELECT id, priority FROM tasks t WHERE {_in_group('t', task_filters)}"
    heads: list[tuple[QueueKey, Group]] = []
    for group in offered:
        head = conn.execute(
            read_head + " ORDER BY t.priority DESC, t.id LIMIT 1",
            {**params, **_group_params(group, now)},
        ).fetchone()
        if head is not None:
            heads.append(((-head["priority"], head["id"]), group))
    heads.sort(key=lambda entry: entry[0])
    read_group = (
        f"SELECT {CANDIDATE_COLUMNS} FROM tasks t WHERE {_in_group('t', task_filters)}"
        " ORDER BY t.priority DESC, t.id LIMIT :n"
    )

    def fetch_group(group: Group, n: int) -> list[sqlite3.Row]:
        return conn.execute(read_group, {**params, **_group_params(group, now), "n": n}).fetchall()

    return merge_group_windows(
        [group for _, group in heads], fetch_group, lambda r: (-r["priority"], r["id"]), window
    )


def project_heads(
    conn: sqlite3.Connection, now: float, prefilter: Prefilter, taken: Sequence[int], n: int
) -> list[sqlite3.Row]:
    """Each project's first `n` ready waiting tasks in queue order, minus those certainly
    blocked or already taken; all of them in queue order.

    A project's first `n` are among the first `n` of each of its groups, so each group
    the prefilter leaves is read that far (one seek and a short walk) and each project
    cut to its first `n`. Past `MAX_GROUPS` groups, the whole queue is walked instead."""
    task_filters, params = _task_filters(prefilter, taken)
    listed = conn.execute(_LIST_GROUPS, {"max_groups": MAX_GROUPS}).fetchall()
    found: list[sqlite3.Row]
    if len(listed) > MAX_GROUPS:
        # LIMIT -1 is SQLite's "no limit": every ready task the filters leave.
        found = _plain_window(conn, now, prefilter, task_filters, params, -1, None)
    else:
        groups = (Group(r["project"], r["template"], bool(r["template_parallel"])) for r in listed)
        read_group = (
            f"SELECT {CANDIDATE_COLUMNS} FROM tasks t WHERE {_in_group('t', task_filters)}"
            " ORDER BY t.priority DESC, t.id LIMIT :n"
        )
        found = [
            row
            for group in groups
            if not prefilter.blocks_group(group)
            for row in conn.execute(read_group, {**params, **_group_params(group, now), "n": n})
        ]
    found.sort(key=lambda r: (-r["priority"], r["id"]))
    per_project: dict[str, int] = {}
    heads = []
    for row in found:
        seen = per_project.get(row["project"], 0)
        if seen < n:
            per_project[row["project"]] = seen + 1
            heads.append(row)
    return heads


def _group_params(group: Group, now: float) -> dict[str, object]:
    return {
        "project": group.project,
        "template": group.template,
        "template_parallel": int(group.template_parallel),
        "now": now,
    }
