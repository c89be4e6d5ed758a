"""How the CLI renders what it prints: JSON-ready data (with `--json`) and the text
lines of tasks, events and limits, every name, path and argv in them escaped by
`field` (a task's words never drive the operator's terminal; JSON escapes them
itself). Pure: the commands do the printing."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import shlex
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .._models import ResourceLimits, TaskInfo, TaskSpec
from .._schedules import ScheduledBy
from .._terminal import escape_field


def plain(value: Any, *, show_env: bool = False) -> Any:
    """JSON-ready data; a task's env values are masked unless `show_env`."""
    if isinstance(value, TaskSpec) and not show_env:
        value = dataclasses.replace(value, env=value.masked_env())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: plain(getattr(value, f.name), show_env=show_env)
            for f in dataclasses.fields(value)
            if f.repr
        }
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {k: plain(v, show_env=show_env) for k, v in value.items()}
    if isinstance(value, list | tuple | frozenset | set):
        items = [plain(v, show_env=show_env) for v in value]
        return sorted(items) if isinstance(value, frozenset | set) else items
    return value


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    """Print `data` as JSON with `--json`, else `text`."""
    print(json.dumps(plain(data, show_env=args.show_env), indent=2) if args.json else text)


def when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def field(value: str | Sequence[str]) -> str:
    """A name or path, or an argv as a shell would quote it, safe to print on one line."""
    text = value if isinstance(value, str) else shlex.join(value)
    return escape_field(text)


def env_line(spec: TaskSpec, *, show: bool) -> str:
    env = (spec.env if show else spec.masked_env()) or {}
    shown = " ".join(field(f"{k}={v}") for k, v in sorted(env.items())) or "-"
    passed = " ".join(field(name) for name in sorted(spec.pass_env)) or "-"
    base = "the worker's" if spec.inherit_env else "empty"
    return f"  env: {shown}  pass-env: {passed}  (from {base} environment)"


def task_line(t: TaskInfo, scheduled: ScheduledBy | None = None) -> str:
    """One task on one line; its schedule's name in the column after its project."""
    command = field(t.spec.argv)
    if len(command) > 50:
        command = command[:47] + "..."
    project = field(t.spec.project)
    schedule = field(scheduled.schedule) if scheduled is not None else "-"
    return (
        f"{t.id:>6}  {t.status.value:<10} {project:<12} {schedule:<12} {command}"
        f"  ({field(t.reason or '-')})"
    )


def schedule_data(scheduled: ScheduledBy | None) -> dict[str, Any] | None:
    """A task's `schedule` in JSON: the schedule's name and the tick it fired."""
    if scheduled is None:
        return None
    return {"name": scheduled.schedule, "tick": scheduled.tick}


def limits_text(limits: ResourceLimits) -> str:
    parts = []
    if limits.memory_max is not None:
        parts.append(f"memory {limits.memory_max / 2**20:g} MiB")
    if limits.pids_max is not None:
        parts.append(f"{limits.pids_max} processes")
    if limits.cpu_max is not None:
        parts.append(f"{limits.cpu_max:g} CPUs")
    return ", ".join(parts) or "none (the worker's defaults apply)"
