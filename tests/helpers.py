"""Shared test helpers: waiting on states, finding processes left behind."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import psutil

from taskpool import Status, Store, TaskInfo, TaskPool
from taskpool._procs import ATTEMPT_ENV
from tests.subreaper import descendant_pids

T = TypeVar("T")

#: A safety net, never the assertion: tests wait for events and states.
SAFETY_TIMEOUT_S = 60.0


async def eventually(
    check: Callable[[], Awaitable[T | None]], *, timeout_s: float = SAFETY_TIMEOUT_S
) -> T:
    """Poll `check` until it returns something truthy, and return that."""
    with anyio.fail_after(timeout_s):
        while True:
            value = await check()
            if value:
                return value
            await anyio.sleep(0.01)


def has_exited(proc: psutil.Process) -> bool:
    """The process is gone or a zombie waiting for its reaper. A process that exits
    between psutil's two looks (is it running, what is its state) has exited too: on a
    busy machine that window is real."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def running(pool: TaskPool, task_id: int) -> TaskInfo:
    """Wait until the task's process has been spawned and recorded."""

    async def check() -> TaskInfo | None:
        info = await pool.get(task_id)
        assert not info.is_terminal, f"task {task_id} ended early: {info.status} {info.reason}"
        return info if info.status is Status.RUNNING and info.pid is not None else None

    return await eventually(check)


def marker_task_id(marker: str) -> str | None:
    """The task id in an attempt marker, `<store_id>:<task_id>:<fence>` or the older
    `<task_id>:<fence>`: the second-to-last field either way; None if malformed."""
    fields = marker.split(":")
    return fields[-2] if len(fields) >= 2 else None


def attempt_processes(task_id: int | None = None) -> list[psutil.Process]:
    """Live (non-zombie) attempt processes of this test run, of one task or any.

    Only descendants of this process count (it is a subreaper, see tests/subreaper.py):
    an attempt of a production pool or of another copy of the suite on this host
    carries the same marker and is none of our business."""
    found = []
    for pid in descendant_pids(os.getpid()):
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            marker = proc.environ().get(ATTEMPT_ENV)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
        if marker is None:
            continue
        if task_id is None or marker_task_id(marker) == str(task_id):
            found.append(proc)
    return found


async def no_attempt_processes(task_id: int | None = None) -> bool:
    """True once no process of the task (or of any task) is left; killed ones may take a
    moment to die, so this polls (the timeout is a safety net)."""

    async def check() -> bool:
        return not attempt_processes(task_id)

    await eventually(check, timeout_s=30)
    return True


#: Read by `fast_pool` and by the pools tests start in processes of their own; the
#: `both_containments` fixture runs a test once per containment mode.
CONTAINMENT_ENV = "TASKPOOL_TEST_CONTAINMENT"


def containment_mode() -> str:
    return os.environ.get(CONTAINMENT_ENV, "auto")


def fast_pool(db: Path | str | Store, **overrides: Any) -> TaskPool:
    """A pool with short intervals so tests finish quickly."""
    options: dict[str, Any] = {
        "max_parallel": 4,
        "poll_interval_s": 0.05,
        "kill_grace_s": 0.5,
        "shutdown_drain_s": 0.0,
        "lease_ttl_s": 5.0,
        "reaper_interval_s": 0.2,
        "containment": containment_mode(),
    }
    options.update(overrides)
    return TaskPool(db, **options)


async def reasons(pool: TaskPool, task_id: int) -> list[str]:
    return [event.reason for event in await pool.events(task_id)]


def open_store(database: str) -> Store:
    """A store handle onto a test database named as TaskPool accepts it (path or URL)."""
    if database.startswith("postgresql://"):
        from taskpool import PostgresStore

        return PostgresStore(database, max_size=2)
    from taskpool import SQLiteStore

    return SQLiteStore(database)


def killed_leftover_matches(
    reason: str, *, mode: str, task_id: int, fence: int, leader: int, processes: int
) -> bool:
    """Whether `reason`'s "killed leftover ..." part names the attempt's leftovers as the
    containment `mode` finds them: its cgroup (every process, exactly), or the recorded
    leader's process group."""
    if mode == "cgroup":
        start = f"killed leftover cgroup of attempt {task_id}.{fence} ({processes} process"
        found = reason[reason.find("killed leftover") :].split(";")[0]
        return found.startswith(start) and str(leader) in found
    return f"killed leftover process group {leader};" in reason + ";"
