"""Process identity and killing, shared by the runner and boot-time reconciliation.

A pid alone is not an identity: the kernel reuses pids. A process is named by
(pid, start time) as psutil reports it, and nothing is killed unless both match.
"""

from __future__ import annotations

import contextlib
import os
import signal

import psutil

#: Environment variable set in every attempt's process; it survives `setsid` and
#: reparenting, so boot-time reconciliation can find escaped descendants too.
ATTEMPT_ENV = "TASKPOOL_ATTEMPT"


def attempt_marker(task_id: int, fence: int) -> str:
    return f"{task_id}:{fence}"


def start_time(pid: int) -> float | None:
    """The start time of `pid` as psutil reports it, or None if it is gone."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


def is_same_process(pid: int, started_at: float) -> bool:
    """True if `pid` is alive and is the process that started at `started_at`."""
    now = start_time(pid)
    # create_time is derived from boot time plus clock ticks; allow for rounding.
    return now is not None and abs(now - started_at) < 0.05


#: Linux lists each thread's children in /proc: reading those files costs one read
#: per descendant, where psutil's children() reads /proc/*/stat of every process.
_PROC_CHILDREN = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def _child_pids(pid: int) -> list[int]:
    found: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(child) for child in f.read().split())
        except OSError:
            continue  # the thread or the process is gone
    return found


def descendants(pid: int) -> list[psutil.Process]:
    """Every live descendant of `pid`, including those that left its process group."""
    if not _PROC_CHILDREN:  # pragma: no cover - kernels without CONFIG_PROC_CHILDREN
        try:
            return list(psutil.Process(pid).children(recursive=True))
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return []
    procs: list[psutil.Process] = []
    stack = [pid]
    while stack:
        for child in _child_pids(stack.pop()):
            stack.append(child)
            try:
                procs.append(psutil.Process(child))  # records its start time: identity
            except psutil.NoSuchProcess:
                continue
    return procs


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send `sig` to a process group; a group that is already empty is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def kill_processes(procs: list[psutil.Process]) -> None:
    """SIGKILL each process unless it is gone (psutil checks identity before signalling)."""
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.kill()


def kill_leftovers(pid: int | None, started_at: float | None, marker: str) -> list[str]:
    """Kill what remains of an orphaned attempt; return a description of each kill.

    The recorded leader is killed with its group only if pid *and* start time
    match: a recycled pid belongs to someone else. Any other process carrying
    the attempt's marker in its environment is killed too (it escaped the group).
    """
    killed: list[str] = []
    group_killed: set[int] = set()
    # pid <= 0 would make killpg hit our own group: only ever a real recorded pid.
    if pid is not None and pid > 0 and started_at and is_same_process(pid, started_at):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            group = [psutil.Process(pid), *descendants(pid)]
            signal_group(pid, signal.SIGKILL)
            kill_processes(group)
            group_killed = {p.pid for p in group}
            killed.append(f"process group {pid}")
    for proc in find_marked(marker):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if proc.pid in group_killed or (group_killed and _pgid(proc.pid) == pid):
                continue  # already sent SIGKILL with the group, maybe not dead yet
            name = proc.name()
            proc.kill()
            killed.append(f"pid {proc.pid} ({name})")
    return killed


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def find_marked(marker: str) -> list[psutil.Process]:
    """Live processes whose environment carries `ATTEMPT_ENV=marker`."""
    found: list[psutil.Process] = []
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.environ().get(ATTEMPT_ENV) == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found
