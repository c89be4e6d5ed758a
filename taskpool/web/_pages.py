"""The dashboard's HTML, page by page (pure: data in, markup out).

Every value from the store (commands, names, reasons, hosts) goes through `esc`;
the only markup not made here is the ANSI renderer's, which escapes in its turn.
"""

from __future__ import annotations

import shlex
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from urllib.parse import quote, urlencode

from .._client import StaleReport
from .._explain import fair_share_text
from .._models import NodeInfo, Status, TaskEvent, TaskInfo
from .._schedules import Misfire, Schedule, ScheduledBy
from ._views import Page, QueueDepth, TaskFilter, duration, utc


def esc(value: object) -> str:
    return escape(str(value), quote=True)


@dataclass(frozen=True, slots=True)
class Frame:
    """What every page shares: where the dashboard is mounted and who is looking."""

    base: str  # the mount path, "" at the root
    csrf: str
    can_act: bool
    login: bool  # signed in with the token: offer to sign out
    title: str = "taskpool"
    now: float = 0.0


NAV = (
    ("tasks", "/", "Tasks"),
    ("waiting", "/waiting", "Waiting & stuck"),
    ("queues", "/queues", "Queues"),
    ("schedules", "/schedules", "Schedules"),
    ("nodes", "/nodes", "Nodes"),
)


def layout(frame: Frame, active: str, heading: str, body: str) -> str:
    links = "".join(
        f'<a href="{esc(frame.base)}{path}"{" class=on" if key == active else ""}>{label}</a>'
        for key, path, label in NAV
    )
    if frame.can_act:
        mode = (
            '<span class="mode act" title="cancel, retry, pause and resume are enabled">'
            "operator</span>"
        )
    else:
        mode = (
            '<span class="mode ro" title="configure an auth callback or a token to act">'
            "read-only</span>"
        )
    if frame.login:
        mode += '<button class="ghost small" data-logout>Sign out</button>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf-token" content="{esc(frame.csrf)}">
<title>{esc(heading)} · {esc(frame.title)}</title>
<link rel="stylesheet" href="{esc(frame.base)}/static/dashboard.css">
<script src="{esc(frame.base)}/static/dashboard.js" defer></script>
</head><body data-base="{esc(frame.base)}" data-can-act="{int(frame.can_act)}">
<header class="top"><a class="brand" href="{esc(frame.base)}/">{esc(frame.title)}</a>
<nav>{links}</nav><div class="right">{mode}</div></header>
<main>{body}</main>
<dialog id="confirm"><form method="dialog">
<h2 data-slot="title"></h2><p data-slot="text"></p><p class="error" data-slot="error"></p>
<div class="buttons"><button value="back" class="ghost">Back</button>
<button value="go" class="danger" data-slot="go">Confirm</button></div></form></dialog>
</body></html>"""


def badge(status: Status | str) -> str:
    value = Status(status).value
    return f'<span class="badge st-{value}">{value.replace("_", " ")}</span>'


def command(task: TaskInfo, limit: int = 120) -> str:
    text = shlex.join(task.spec.argv)
    short = text if len(text) <= limit else text[: limit - 1] + "…"
    return f'<code title="{esc(text)}">{esc(short)}</code>'


def when(at: float | None, now: float) -> str:
    if at is None:
        return '<span class="muted">–</span>'
    ago = f"{duration(now - at)} ago" if now >= at else f"in {duration(at - now)}"
    return f'<time title="{utc(at)}">{ago}</time>'


def exit_code(code: int) -> str:
    """`-15 (SIGTERM)`: a negative code is the signal that ended the process."""
    if code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return str(code)


def task_link(frame: Frame, task_id: int) -> str:
    return f'<a href="{esc(frame.base)}/tasks/{task_id}">#{task_id}</a>'


def schedule_link(frame: Frame, name: str) -> str:
    """A link to the schedule's row on the schedules page."""
    return f'<a href="{esc(frame.base)}/schedules#{esc(schedule_anchor(name))}">{esc(name)}</a>'


def schedule_anchor(name: str) -> str:
    # Percent-encoded, so a name with spaces or quotes is still one fragment.
    return "schedule-" + quote(name, safe="")


def task_duration(task: TaskInfo, now: float) -> str:
    if task.started_at is None:
        return '<span class="muted">–</span>'
    return duration((task.finished_at or now) - task.started_at)


def tasks_table(
    frame: Frame,
    tasks: Sequence[TaskInfo],
    scheduled: Mapping[int, ScheduledBy],
    *,
    reasons: dict[int, str] | None = None,
) -> str:
    """`scheduled`: the schedule of each task a schedule submitted (the others: none)."""
    if not tasks:
        return '<p class="empty">No tasks.</p>'
    rows = []
    for t in tasks:
        reason = (reasons or {}).get(t.id, t.reason or "")
        by = scheduled.get(t.id)
        schedule = schedule_link(frame, by.schedule) if by else ""
        rows.append(
            f'<tr data-task="{t.id}"><td class="num">{task_link(frame, t.id)}</td>'
            f"<td>{badge(t.status)}</td><td class=cmd>{command(t)}</td>"
            f"<td>{esc(t.spec.project)}</td><td>{esc(t.spec.template or '')}</td>"
            f'<td class="schedule">{schedule}</td>'
            f'<td class="num">{t.attempts_used}/{t.spec.max_attempts}</td>'
            f"<td>{when(t.submitted_at, frame.now)}</td>"
            f'<td class="num">{task_duration(t, frame.now)}</td>'
            f'<td class="reason">{esc(reason)}</td></tr>'
        )
    return (
        '<table class="grid tasks"><thead><tr><th class="num">ID</th><th>Status</th>'
        "<th>Command</th>"
        "<th>Project</th><th>Template</th><th>Schedule</th><th class=num>Attempts</th>"
        "<th>Submitted</th>"
        f"<th class=num>Ran</th><th>Reason</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def tasks_page(
    frame: Frame, f: TaskFilter, page: Page, scheduled: Mapping[int, ScheduledBy]
) -> str:
    options = "".join(
        f'<option value="{s.value}"{" selected" if f.status is s else ""}>'
        f"{s.value.replace('_', ' ')}</option>"
        for s in Status
    )
    filters = f"""<form class="filters" method="get" action="{esc(frame.base)}/">
<label>Status <select name="status"><option value="">any</option>{options}</select></label>
<label>Project <input name="project" value="{esc(f.project or "")}" size="12"></label>
<label>Template <input name="template" value="{esc(f.template or "")}" size="12"></label>
<label class="grow">Search <input name="q" value="{esc(f.text or "")}"
 placeholder="command, reason or id"></label>
<button>Filter</button><a class="ghost button" href="{esc(frame.base)}/">Clear</a>
<label class="auto"><input type="checkbox" data-autorefresh checked> live</label></form>"""
    pager = []
    if f.page > 1:
        pager.append(f'<a href="?{urlencode(f.query(page=f.page - 1))}">← Newer</a>')
    pager.append(f"<span>page {f.page}</span>")
    if page.has_next:
        pager.append(f'<a href="?{urlencode(f.query(page=f.page + 1))}">Older →</a>')
    note = ""
    if f.needs_scan and page.window_full:
        note = '<p class="note">Template and text filters look through the newest tasks only.</p>'
    body = (
        f"{filters}<div data-refresh>{tasks_table(frame, page.tasks, scheduled)}"
        f'<div class="pager">{"".join(pager)}</div>{note}</div>'
    )
    return layout(frame, "tasks", "Tasks", f"<h1>Tasks</h1>{body}")


@dataclass(frozen=True, slots=True)
class TaskState:
    """What the task page shows of one task: it, its events, why it waits (if it
    does) and the schedule that submitted it (if one did)."""

    task: TaskInfo
    events: Sequence[TaskEvent]
    why: str | None = None
    scheduled: ScheduledBy | None = None


def task_summary(frame: Frame, state: TaskState) -> str:
    task, why, spec = state.task, state.why, state.task.spec
    fields: list[tuple[str, str]] = [
        ("Status", badge(task.status)),
        ("Reason", esc(task.reason or "")),
        ("Command", f"<code>{esc(shlex.join(spec.argv))}</code>"),
        ("Project", esc(spec.project)),
        ("Template", esc(spec.template or "–") + (" (parallel)" if spec.template_parallel else "")),
        ("Locks", esc(", ".join(sorted(spec.locks)) or "–")),
        ("Attempts", f"{task.attempts_used} of {spec.max_attempts}"),
        ("Retry", esc(spec.retry_text())),
        ("Priority", esc(spec.priority)),
        ("Submitted", f"{utc(task.submitted_at)} ({when(task.submitted_at, frame.now)})"),
    ]
    if state.scheduled is not None:
        link = schedule_link(frame, state.scheduled.schedule)
        fields.insert(3, ("Schedule", f"{link} (tick {utc(state.scheduled.tick)})"))
    if task.started_at is not None:
        fields.append(("Started", f"{utc(task.started_at)} · ran {task_duration(task, frame.now)}"))
    if task.finished_at is not None:
        fields.append(("Finished", utc(task.finished_at)))
    if task.exit_code is not None:
        fields.append(("Exit code", exit_code(task.exit_code)))
    if task.owner_node is not None:
        fields.append(("Node", f"<code>{esc(task.owner_node)}</code> · pid {esc(task.pid)}"))
    if spec.cwd:
        fields.append(("Directory", f"<code>{esc(spec.cwd)}</code>"))
    limits = [
        f"timeout {duration(spec.timeout_s)}" if spec.timeout_s else "",
        f"stall after {duration(spec.stall_timeout_s)}" if spec.stall_timeout_s else "",
    ]
    if any(limits):
        fields.append(("Limits", esc(", ".join(x for x in limits if x))))
    if spec.unique_key is not None:
        fields.append(
            ("Unique key", f"<code>{esc(spec.unique_key)}</code> ({esc(spec.on_conflict)})")
        )
    if spec.after:
        fields.append(("After", esc(", ".join(map(str, spec.after)))))
    if task.cancel_requested is not None:
        fields.append(("Cancel", f"requested ({esc(task.cancel_requested.value)})"))
    rows = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in fields)
    waiting = f'<div class="why"><b>Why waiting:</b> {esc(why)}</div>' if why else ""
    return f'{waiting}<dl class="summary">{rows}</dl>'


def timeline(events: Sequence[TaskEvent]) -> str:
    rows = "".join(
        f"<tr><td><time>{utc(e.at)}</time></td>"
        f"<td>{badge(e.from_status) if e.from_status else ''}</td><td>→ {badge(e.to_status)}</td>"
        f'<td class="num">{esc(e.fence if e.fence is not None else "")}</td>'
        f"<td><code>{esc((e.node_id or '')[:8])}</code></td>"
        f"<td class=reason>{esc(e.reason)}</td></tr>"
        for e in events
    )
    return (
        '<table class="grid events"><thead><tr><th>At (UTC)</th><th>From</th><th>To</th>'
        "<th class=num>Attempt</th><th>Node</th><th>Reason</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def task_details(frame: Frame, state: TaskState) -> str:
    """The parts of the task page that change as it runs (sent again when it ends)."""
    return f"{task_summary(frame, state)}<h2>Events</h2>{timeline(state.events)}"


def actions(frame: Frame, task: TaskInfo) -> str:
    if not frame.can_act:
        return '<div class="actions"><span class="muted">read-only</span></div>'
    return f'<div class="actions" data-task="{task.id}">{action_buttons(frame, task)}</div>'


def action_buttons(frame: Frame, task: TaskInfo) -> str:
    if not frame.can_act:
        return ""
    label = esc(shlex.join(task.spec.argv)[:200])
    buttons = []
    if not task.is_terminal:
        buttons.append(
            f'<button class="warn" data-action="cancel" data-force="0" data-label="{label}">'
            "Cancel</button>"
        )
        buttons.append(
            f'<button class="danger" data-action="cancel" data-force="1" data-label="{label}">'
            "Force cancel</button>"
        )
    else:
        buttons.append(f'<button data-action="retry" data-label="{label}">Retry</button>')
    return "".join(buttons)


def task_page(frame: Frame, state: TaskState) -> str:
    task = state.task
    live = "" if task.is_terminal else '<span class="live" data-live>● live</span>'
    heading = f"<h1>Task {task.id} {badge(task.status)}</h1>"
    body = f"""<div class="title">{heading}{actions(frame, task)}</div>
<div id="details">{task_details(frame, state)}</div>
<h2>Output {live}</h2>
<pre class="log" id="log" data-stream="{esc(frame.base)}/tasks/{task.id}/log"></pre>"""
    return layout(frame, "tasks", f"Task {task.id}", body)


def nodes_page(frame: Frame, nodes: Sequence[NodeInfo], running: Sequence[TaskInfo]) -> str:
    busy: dict[str, int] = {}
    for t in running:
        if t.owner_node:
            busy[t.owner_node] = busy.get(t.owner_node, 0) + 1
    rows = []
    for n in sorted(nodes, key=lambda n: (n.stopped_at is not None, -n.heartbeat_at)):
        age = frame.now - n.heartbeat_at
        if n.stopped_at is not None:
            state = '<span class="badge st-stopped">stopped</span>'
        elif age > 60:
            state = '<span class="badge st-lost">silent</span>'
        else:
            state = '<span class="badge st-running">live</span>'
        rows.append(
            f'<tr><td><code title="{esc(n.id)}">{esc(n.id[:8])}</code></td><td>{state}</td>'
            f"<td>{esc(n.host)}</td><td class=num>{n.pid}</td>"
            f'<td class="num{" bad" if age > 60 and n.stopped_at is None else ""}">'
            f"{duration(age)} ago</td><td>{esc(n.containment or 'unknown')}</td>"
            f"<td class=num>{busy.get(n.id, 0)}/{n.max_parallel}</td>"
            f"<td>{esc(fair_share_text(n.fair_share))}</td>"
            f"<td>{when(n.started_at, frame.now)}</td></tr>"
        )
    table = (
        '<table class="grid"><thead><tr><th>Node</th><th>State</th><th>Host</th>'
        "<th class=num>PID</th>"
        "<th class=num>Heartbeat</th><th>Containment</th><th class=num>Running</th>"
        f"<th>Fair share</th><th>Started</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        if rows
        else '<p class="empty">No node has registered with this store.</p>'
    )
    return layout(frame, "nodes", "Nodes", f"<h1>Nodes</h1><div data-refresh>{table}</div>")


def waiting_page(
    frame: Frame,
    stale: StaleReport,
    waiting: Sequence[TaskInfo],
    reasons: dict[int, str],
    scheduled: Mapping[int, ScheduledBy],
) -> str:
    silent = "".join(
        f"<tr><td><code>{esc(n.id[:8])}</code></td><td>{esc(n.host)}</td>"
        f"<td class='num bad'>{duration(stale.at - n.heartbeat_at)} ago</td></tr>"
        for n in stale.silent_nodes
    )
    silent_table = (
        '<table class="grid"><thead><tr><th>Node</th><th>Host</th><th class=num>Last heartbeat'
        f"</th></tr></thead><tbody>{silent}</tbody></table>"
        if silent
        else '<p class="empty ok">Every live node is heartbeating.</p>'
    )
    expired = (
        tasks_table(frame, stale.expired_leases, scheduled)
        if stale.expired_leases
        else '<p class="empty ok">No running task has an expired lease.</p>'
    )
    oldest_first = sorted(waiting, key=lambda t: t.submitted_at)
    body = f"""<h1>Waiting &amp; stuck</h1><div data-refresh>
<h2>Expired leases <span class="count">{len(stale.expired_leases)}</span></h2>{expired}
<h2>Silent nodes <span class="count">{len(stale.silent_nodes)}</span></h2>{silent_table}
<h2>Waiting, oldest first <span class="count">{len(waiting)}</span></h2>
{tasks_table(frame, oldest_first, scheduled, reasons=reasons)}</div>"""
    return layout(frame, "waiting", "Waiting & stuck", body)


def queues_page(frame: Frame, depths: Sequence[QueueDepth], window_full: bool) -> str:
    deepest = max((d.waiting + d.running for d in depths), default=1) or 1
    rows = []
    for d in depths:
        listed = f"{esc(frame.base)}/?{urlencode({'project': d.project})}"
        waiting = f"{esc(frame.base)}/?{urlencode({'project': d.project, 'status': 'waiting'})}"
        oldest = duration(d.oldest_waiting_s) if d.oldest_waiting_s is not None else "–"
        run_w, wait_w = 100 * d.running / deepest, 100 * d.waiting / deepest
        rows.append(
            f'<tr><td><a href="{listed}">{esc(d.project)}</a></td>'
            f'<td class=num><a href="{waiting}">{d.waiting}</a></td>'
            f"<td class=num>{d.running}</td><td class=num>{oldest}</td>"
            f'<td class="bar"><span class="b-run" style="width:{run_w:.1f}%"></span>'
            f'<span class="b-wait" style="width:{wait_w:.1f}%"></span></td></tr>'
        )
    table = (
        '<table class="grid queues"><thead><tr><th>Project</th><th class=num>Waiting</th>'
        "<th class=num>Running</th><th class=num>Oldest wait</th>"
        '<th><span class="key b-run"></span>running <span class="key b-wait"></span>waiting'
        f"</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        if rows
        else '<p class="empty ok">Nothing is waiting or running.</p>'
    )
    note = ""
    if window_full:
        note = '<p class="note">Counts stop at the newest tasks looked through.</p>'
    body = f"<h1>Queues</h1><div data-refresh>{table}{note}</div>"
    return layout(frame, "queues", "Queues", body)


#: Runs and fire times a schedule's row shows.
SCHEDULE_RUNS_SHOWN = 5
SCHEDULE_FIRES_SHOWN = 3


def schedule_row(frame: Frame, s: Schedule, runs: Sequence[tuple[int, Status]]) -> str:
    if s.timing.cron is not None:
        timing = f"<code>{esc(s.timing.cron)}</code><br><span class=muted>{esc(s.timing.tz)}</span>"
    else:
        timing = f"every {esc(duration(s.timing.every_s or 0))}"
    state = (
        '<span class="badge st-stopped">paused</span>'
        if s.paused
        else '<span class="badge st-running">active</span>'
    )
    misfire = s.misfire.value + (f" ≤{s.misfire_bound}" if s.misfire is Misfire.RUN_ALL else "")
    policies = (
        f"overlap <b>{esc(s.overlap.value)}</b><br>misfire <b>{esc(misfire)}</b>"
        f'<br><span class="muted">grace {esc(duration(s.grace_s))}</span>'
    )
    if s.paused:
        fires = '<span class="muted">– (paused)</span>'
    else:
        fires = "<br>".join(f"<time>{utc(t)}</time>" for t in s.next_fires(SCHEDULE_FIRES_SHOWN))
    last = (
        f"<time>{utc(s.last_fire_at)}</time>"
        if s.last_fire_at is not None
        else '<span class="muted">never</span>'
    )
    text = shlex.join(s.spec.argv)
    short = text if len(text) <= 80 else text[:79] + "…"
    task = (
        f'<code title="{esc(text)}">{esc(short)}</code><br>'
        f'<span class="muted">project</span> {esc(s.spec.project)}'
    )
    shown = "".join(
        f"<li>{task_link(frame, task_id)} {badge(status)}</li>" for task_id, status in runs
    )
    ran = f'<ul class="runs">{shown}</ul>' if shown else '<span class="muted">none yet</span>'
    if not frame.can_act:
        act = ""
    elif s.paused:
        act = f'<button data-action="resume" data-label="{esc(s.name)}">Resume</button>'
    else:
        act = f'<button class="warn" data-action="pause" data-label="{esc(s.name)}">Pause</button>'
    return (
        f'<tr id="{esc(schedule_anchor(s.name))}" data-schedule="{esc(s.name)}"'
        f' data-paused="{int(s.paused)}"><td class="name"><b>{esc(s.name)}</b><br>{state}</td>'
        f"<td>{timing}</td><td>{policies}</td><td>{fires}</td><td>{last}</td>"
        f'<td class="cmd">{task}</td><td>{ran}</td>'
        + (f'<td class="row-actions">{act}</td>' if frame.can_act else "")
        + "</tr>"
    )


def schedules_page(
    frame: Frame,
    schedules: Sequence[Schedule],
    runs: Mapping[str, Sequence[tuple[int, Status]]],
    unavailable: str | None = None,
) -> str:
    """Every schedule: when it fires, its policies, what it submits, its newest runs."""
    rows = "".join(schedule_row(frame, s, runs.get(s.name, [])) for s in schedules)
    if unavailable is not None:
        table = f'<p class="empty">{esc(unavailable)}</p>'
    elif not rows:
        table = (
            '<p class="empty">No schedules. Add one with <code>client.add_schedule</code> or'
            " <code>taskpool schedule add</code>.</p>"
        )
    else:
        table = (
            '<table class="grid schedules"><thead><tr><th>Name</th><th>When</th>'
            f"<th>Policies</th><th>Next {SCHEDULE_FIRES_SHOWN} fires (UTC)</th>"
            "<th>Last fire (UTC)</th><th>Task</th><th>Latest runs</th>"
            + ("<th></th>" if frame.can_act else "")
            + f"</tr></thead><tbody>{rows}</tbody></table>"
        )
    body = f"<h1>Schedules</h1><div data-refresh>{table}</div>"
    return layout(frame, "schedules", "Schedules", body)


def login_page(frame: Frame, next_path: str, failed: bool) -> str:
    error = '<p class="error">Wrong token.</p>' if failed else ""
    body = f"""<form class="login" method="post" action="{esc(frame.base)}/login">
<h1>Sign in</h1><p>This dashboard asks for its access token.</p>{error}
<input type="hidden" name="next" value="{esc(next_path)}">
<label>Token <input type="password" name="token" autofocus autocomplete="current-password"></label>
<button>Sign in</button></form>"""
    return layout(frame, "", "Sign in", body)


def error_page(frame: Frame, status: int, message: str) -> str:
    body = f'<div class="failure"><h1>{status}</h1><p>{esc(message)}</p></div>'
    return layout(frame, "", str(status), body)
