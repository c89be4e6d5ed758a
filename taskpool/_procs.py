"""Process identity and killing, shared by the runner and boot-time reconciliation.

A pid alone is not an identity: the kernel reuses pids. A process is named by
(pid, start time) as psutil reports it, and nothing is killed unless both match.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Sequence, Set
from dataclasses import dataclass

import psutil

#: Environment variable set in every attempt's process; it survives `setsid` and
#: reparenting, so boot-time reconciliation can find escaped descendants too.
ATTEMPT_ENV = "TASKPOOL_ATTEMPT"


def attempt_marker(store_id: str, task_id: int, fence: int) -> str:
    """The identity of one attempt, unique across stores and hosts.

    Task ids and fences start at 1 in every store, so two stores on one host
    share them; the store's random id tells them apart."""
    if not store_id or ":" in store_id:
        raise ValueError(f"invalid store id {store_id!r}")
    return f"{store_id}:{task_id}:{fence}"


def parse_marker(marker: str) -> tuple[str, int, int] | None:
    """`(store id, task id, fence)` of an attempt marker, or None if it is not one."""
    parts = marker.split(":")
    if len(parts) != 3 or not parts[0]:
        return None
    try:
        return parts[0], int(parts[1]), int(parts[2])
    except ValueError:
        return None


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


def child_pids(pid: int) -> list[int]:
    """The children of `pid` (every thread's), zombies included."""
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
        for child in child_pids(stack.pop()):
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


@dataclass(frozen=True, slots=True)
class Leftover:
    """What is known of an orphaned attempt's processes."""

    pid: int | None  # the recorded leader, if its spawn was recorded
    started_at: float | None
    marker: str  # its ATTEMPT_ENV value


def kill_leftovers(leftovers: Sequence[Leftover]) -> dict[str, list[str]]:
    """Kill what remains of orphaned attempts; say, per marker, what was killed.

    A recorded leader is killed with its group only if pid *and* start time match:
    a recycled pid belongs to someone else. Any other process carrying an attempt's
    marker in its environment is killed too (it escaped the group). The process
    table is scanned once for all markers.
    """
    marked = find_marked({leftover.marker for leftover in leftovers})
    report: dict[str, list[str]] = {}
    for leftover in leftovers:
        pid, killed = leftover.pid, report.setdefault(leftover.marker, [])
        group_killed: set[int] = set()
        # pid <= 0 would make killpg hit our own group: only ever a real recorded pid.
        if pid and pid > 0 and leftover.started_at and is_same_process(pid, leftover.started_at):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                group = [psutil.Process(pid), *descendants(pid)]
                signal_group(pid, signal.SIGKILL)
                kill_processes(group)
                group_killed = {p.pid for p in group}
                killed.append(f"process group {pid}")
        for proc in marked.get(leftover.marker, []):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                if proc.pid in group_killed or (group_killed and _pgid(proc.pid) == pid):
                    continue  # already sent SIGKILL with the group, maybe not dead yet
                name = proc.name()
                proc.kill()
                killed.append(f"pid {proc.pid} ({name})")
    return report


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def find_marked(markers: Set[str]) -> dict[str, list[psutil.Process]]:
    """Live processes whose environment carries `ATTEMPT_ENV` set to one of `markers`."""
    found: dict[str, list[psutil.Process]] = {}
    if not markers:
        return found
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            marker = proc.environ().get(ATTEMPT_ENV)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
        if marker in markers:
            found.setdefault(marker, []).append(proc)
    return found
