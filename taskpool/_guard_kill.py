"""How the guard kills one attempt without ever hitting a process that is not its own.

Identity. The pool sends a `watch` while the leader is its unreaped child (so its pid
is still the leader's), with a pidfd it opened on the leader there and then and the
leader's start time in clock ticks (`start_ticks`). The guard signals a process group
only while that very leader is alive or a zombie, when its pid (which is the group's
id: the runner starts each attempt in a new session) cannot have been reused. If the
leader was reaped, the group is skipped and the log says so: a recycled pid is never
killed. An attempt's cgroup is killed whatever became of its leader (`cgroup.kill`;
where that file is missing, freeze the cgroup, SIGKILL every process in it, thaw).

Killing is decided first (`plan_kill`, a `KillPlan`, which the guard reports to the
pool) and done after (`execute`). Standard library only: the guard process imports
this module, and the pool's containment uses `kill_cgroup` too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

#: The cgroup freeze fallback gives up after this long (a process stuck in the kernel).
FREEZE_KILL_BUDGET_S = 1.0
HAS_PIDFD = hasattr(os, "pidfd_open")


def start_ticks(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (/proc/<pid>/stat field 22),
    or None if there is no such process. Exact, unlike a float of seconds: a pid that
    was reused has another value (unless reused within the same tick)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    try:
        # The command name may contain spaces and parentheses: split after the last ")".
        return int(stat[stat.rindex(b")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def pidfd_pid(fd: int) -> int | None:
    """The pid a pidfd refers to (-1 once reaped), from /proc/self/fdinfo."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("Pid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


# Plain classes, not dataclasses, on the guard's side: `dataclasses` imports `inspect`,
# which would double the guard's start time and add megabytes to each node.
class Watched:
    """An attempt the guard watches."""

    __slots__ = ("cgroup", "deadline", "key", "leader_seen_reaped", "pid", "pidfd", "ticks")

    def __init__(
        self,
        key: str,
        pid: int | None,  # None: a whole cgroup with no leader of its own (a node's)
        ticks: int | None,  # the leader's start time in ticks, read by the pool at watch time
        pidfd: int | None,  # a pidfd on the leader, opened by the pool while it was unreaped
        cgroup: str | None,
        deadline: float,
        leader_seen_reaped: bool = False,  # at receipt its pid already named another process
    ) -> None:
        self.key = key
        self.pid = pid
        self.ticks = ticks
        self.pidfd = pidfd
        self.cgroup = cgroup
        self.deadline = deadline
        self.leader_seen_reaped = leader_seen_reaped


class KillPlan:
    """What killing one attempt will do, decided before any signal is sent."""

    __slots__ = ("cgroup", "group", "pidfd", "skipped")

    def __init__(
        self,
        cgroup: str | None,
        group: int | None,  # a process group to SIGKILL (its leader is verified)
        pidfd: int | None,  # the leader's pidfd, to SIGKILL it race-free
        skipped: str | None,  # why the process group is not signalled
    ) -> None:
        self.cgroup = cgroup
        self.group = group
        self.pidfd = pidfd
        self.skipped = skipped

    def describe(self) -> list[str]:
        what = []
        if self.cgroup is not None:
            what.append(f"cgroup {self.cgroup}")
        if self.group is not None:
            what.append(f"process group {self.group}")
        if self.skipped is not None:
            what.append(self.skipped)
        return what


def leader_unreaped(w: Watched) -> bool:
    """True while the watched leader is alive or a zombie: its pid, which is its group's
    id, cannot have been reused, so signalling the group reaches that attempt only."""
    if w.leader_seen_reaped or w.pid is None:
        return False
    if w.pidfd is not None:
        try:
            signal.pidfd_send_signal(w.pidfd, 0)  # ESRCH once the leader is reaped
        except ProcessLookupError:
            return False
        except OSError:
            pass  # no pidfd_send_signal here: fall back to the start time
        else:
            return True
    return w.ticks is not None and start_ticks(w.pid) == w.ticks


def plan_kill(w: Watched) -> KillPlan:
    if w.pid is None:
        return KillPlan(w.cgroup, None, None, None)
    if leader_unreaped(w):
        return KillPlan(w.cgroup, w.pid, w.pidfd, None)
    return KillPlan(w.cgroup, None, None, f"process group {w.pid} skipped: its leader was reaped")


def _write_file(path: str, data: str) -> None:
    with open(path, "w") as f:
        f.write(data)


def _cgroup_pids(path: str) -> list[int]:
    with open(os.path.join(path, "cgroup.procs")) as f:
        return [int(line) for line in f.read().split()]


def kill_cgroup(path: str, *, use_kill_file: bool = True) -> str:
    """SIGKILL every process in a cgroup v2; say how (or why not).

    `cgroup.kill` (Linux >= 5.14) kills the whole cgroup atomically, racing forks
    included. Without it: freeze the cgroup so nothing in it can fork, SIGKILL each
    process listed in `cgroup.procs` until none is left (a fatal signal reaches a
    frozen process in cgroup v2), then thaw it."""
    if use_kill_file:
        try:
            _write_file(os.path.join(path, "cgroup.kill"), "1")
            return "cgroup.kill"
        except FileNotFoundError:
            if not os.path.isdir(path):
                return "cgroup already removed"
        except OSError as exc:
            return f"cgroup.kill failed: {exc.strerror or exc}"
    try:
        _write_file(os.path.join(path, "cgroup.freeze"), "1")
        frozen = True
    except OSError:
        frozen = False  # Linux < 5.2: kill in rounds, racing forks
    killed: set[int] = set()
    give_up = time.monotonic() + FREEZE_KILL_BUDGET_S
    try:
        while True:
            try:
                pids = _cgroup_pids(path)
            except FileNotFoundError:
                break
            if not pids or time.monotonic() > give_up:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)  # listed in the cgroup: ours at this moment
                killed.add(pid)
            time.sleep(0.001)  # let the kills land before listing again
    except OSError as exc:
        return f"freeze and kill failed: {exc.strerror or exc}"
    finally:
        if frozen:
            with contextlib.suppress(OSError):
                _write_file(os.path.join(path, "cgroup.freeze"), "0")
    how = "frozen, then" if frozen else "not frozen (no cgroup.freeze),"
    return f"{how} SIGKILL to {len(killed)} processes"


def execute(plan: KillPlan) -> list[str]:
    """Send the kills of `plan`; return what was done, for the log."""
    done = []
    if plan.cgroup is not None:
        done.append(f"cgroup {plan.cgroup}: {kill_cgroup(plan.cgroup)}")
    if plan.group is not None:
        if plan.pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(plan.pidfd, signal.SIGKILL)
        try:
            os.killpg(plan.group, signal.SIGKILL)
            done.append(f"process group {plan.group}: SIGKILL")
        except ProcessLookupError:
            done.append(f"process group {plan.group}: already empty")
        except OSError as exc:
            done.append(f"process group {plan.group}: {exc.strerror or exc}")
    if plan.skipped is not None:
        done.append(plan.skipped)
    return done
