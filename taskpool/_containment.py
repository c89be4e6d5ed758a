"""Containment: where an attempt's processes live, how all of them die, what limits them.

Chosen once at pool start (`choose`) and reported in the node's info and log:

- **cgroup**: each attempt runs in a cgroup v2 of its own, named after its attempt
  identity (`taskpool.<store id>/<task id>.<fence>`, under the pool's own cgroup, so
  a delegated subtree such as systemd's `Delegate=yes` is enough). The child joins
  it before it executes the task, so nothing it starts can escape: `setsid`,
  double-forks and cleared environments included. Ending an attempt writes
  `cgroup.kill` (kernel >= 5.14; freeze, SIGKILL every member, thaw where it is
  missing) and waits for `cgroup.events` to say `populated 0`. Limits use the v2
  controllers where they can be enabled, else a v1 hierarchy of that controller
  (hosts with both), else an rlimit, else they are reported as not enforced.
- **process group**: the fallback where no cgroup can be made (a read-only cgroup
  mount, no delegation, not Linux): the attempt's own session and process group,
  plus the environment marker. Limits become rlimits (`RLIMIT_AS` for memory,
  which makes allocations fail instead of an OOM kill; `RLIMIT_NPROC` for
  processes, which counts every process of the user and does not bind root); CPU
  is not limited.

Everything here is synchronous and quick (a few small file writes): the runner
calls it directly; only waiting for a cgroup to empty is async. The cgroup filesystem
itself (where this process may make cgroups, the file operations on them) is
_cgroups.py's; this module is the policy over it.
"""

from __future__ import annotations

import abc
import contextlib
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

from . import _cgroups
from ._models import CONTROLLERS, ResourceLimits

#: Run by /bin/sh as `sh -c JOIN_SCRIPT name N procs_1 .. procs_N argv...`: writes "0"
#: (this process) to each cgroup.procs, then becomes the task.
JOIN_SCRIPT = (
    'n=$1; shift; while [ "$n" -gt 0 ]; do echo 0 > "$1" || exit 125; shift;'
    ' n=$((n - 1)); done; exec "$@"'
)
#: The exit code of a task whose child could not join its cgroup (it never ran).
JOIN_FAILED_EXIT = 125
#: Run by /bin/sh as `sh -c GATE_SCRIPT name argv...` with the gate pipe as its stdin:
#: waits for the pool's word that the attempt is in its guard's hands, then becomes the
#: task (stdin /dev/null). At EOF instead (the pool died first) it exits 125 and the
#: task never runs: no process-group attempt can outlive a pool unwatched.
GATE_SCRIPT = 'read -r go || exit 125; exec "$@" </dev/null'

CPU_PERIOD_US = 100_000


def mebibytes(size: int) -> str:
    return f"{size / 2**20:g} MiB"


# -- one attempt's box ----------------------------------------------------------------


class Box(abc.ABC):
    """Where one attempt's processes live."""

    name: str
    #: The box knows its members exactly (a cgroup): no descendant scans are needed.
    exact = False
    #: The task runs behind a wrapper (`wrap`), which reports a missing program only as
    #: an exit code: the runner checks the program first.
    wraps = False
    #: The task waits, behind its wrapper, for the runner to open a gate (its stdin)
    #: once the guard watches it (a box that is not watched from birth, as a cgroup
    #: under the node's watched cgroup is).
    gated = False

    @abc.abstractmethod
    def preexec(self) -> Callable[[], None] | None:
        """Run in the child between fork and exec (sets rlimits); None when there is
        nothing to do, which lets the spawn use vfork (a Python callable here forces a
        full fork of the pool process: about three times the cost of a spawn)."""

    def wrap(self, argv: list[str]) -> list[str]:
        """The command that actually runs the task (a cgroup box prefixes a join)."""
        return argv

    def members(self) -> list[int]:
        """Pids still in the box, when the box can tell; else []."""
        return []

    def kill(self) -> None:  # noqa: B027 - a process group box has nothing more to kill
        """SIGKILL everything in the box (the runner kills the process group itself)."""

    def is_empty(self) -> bool:
        return True

    def limit_report(self) -> str | None:
        """Why a limit stopped the attempt, if one did ("killed by the OOM killer...")."""
        return None

    def remove(self) -> None:  # noqa: B027 - nothing to remove for a process group
        """Release the box once it is empty."""


def _rlimits(limits: ResourceLimits, *, memory: bool, pids: bool) -> list[tuple[int, int]]:
    found = []
    if memory and limits.memory_max is not None:
        found.append((resource.RLIMIT_AS, limits.memory_max))
    if pids and limits.pids_max is not None:
        found.append((resource.RLIMIT_NPROC, limits.pids_max))
    return found


def _rlimit_preexec(rlimits: list[tuple[int, int]]) -> Callable[[], None] | None:
    if not rlimits:
        return None

    def preexec() -> None:
        for which, value in rlimits:
            resource.setrlimit(which, (value, value))

    return preexec


class ProcessGroupBox(Box):
    wraps = True
    gated = True

    def __init__(self, name: str, limits: ResourceLimits) -> None:
        self.name = name
        self._rlimits = _rlimits(limits, memory=True, pids=True)

    def preexec(self) -> Callable[[], None] | None:
        return _rlimit_preexec(self._rlimits)

    def wrap(self, argv: list[str]) -> list[str]:
        return ["/bin/sh", "-c", GATE_SCRIPT, "taskpool-gate", *argv]


class CgroupBox(Box):
    """An attempt's cgroup v2 (kill, membership, events) plus the v1 cgroups, if any, that
    carry limits the v2 hierarchy has no controller for."""

    exact = True
    wraps = True

    def __init__(
        self,
        name: str,
        path: Path,
        limits: ResourceLimits,
        v2_controllers: frozenset[str],
        v1_dirs: dict[str, Path],
    ) -> None:
        self.name = name
        self.path = path
        self.limits = limits
        self._extra = list(v1_dirs.values())
        self._v1 = v1_dirs
        self._v2_controllers = v2_controllers
        self._rlimits = _rlimits(
            limits,
            memory="memory" not in v2_controllers and "memory" not in v1_dirs,
            pids="pids" not in v2_controllers and "pids" not in v1_dirs,
        )

    def create(self) -> None:
        self.path.mkdir()
        try:
            for directory in self._extra:
                directory.mkdir(exist_ok=True)
            self._write_limits()
        except BaseException:
            self.remove()
            raise

    def _write_limits(self) -> None:
        lim, v2 = self.limits, self._v2_controllers
        if lim.memory_max is not None:
            if "memory" in v2:
                _cgroups.write(self.path / "memory.max", str(lim.memory_max))
                _cgroups.write(self.path / "memory.swap.max", "0", missing_ok=True)
            elif "memory" in self._v1:
                _cgroups.write(self._v1["memory"] / "memory.limit_in_bytes", str(lim.memory_max))
                _cgroups.write(
                    self._v1["memory"] / "memory.memsw.limit_in_bytes",
                    str(lim.memory_max),
                    missing_ok=True,
                )
        if lim.pids_max is not None:
            target = self.path if "pids" in v2 else self._v1.get("pids")
            if target is not None:
                _cgroups.write(target / "pids.max", str(lim.pids_max))
        if lim.cpu_max is not None:
            quota = max(1000, round(lim.cpu_max * CPU_PERIOD_US))
            if "cpu" in v2:
                _cgroups.write(self.path / "cpu.max", f"{quota} {CPU_PERIOD_US}")
            elif "cpu" in self._v1:
                _cgroups.write(self._v1["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                _cgroups.write(self._v1["cpu"] / "cpu.cfs_quota_us", str(quota))

    def preexec(self) -> Callable[[], None] | None:
        return _rlimit_preexec(self._rlimits)

    def wrap(self, argv: list[str]) -> list[str]:
        """The child joins its cgroups (v2, and v1 ones for limits) before it executes
        the task, so nothing the task starts can be outside them. A tiny shell does it,
        not a Python `preexec_fn`: that keeps the spawn a vfork, and the join is one
        write per hierarchy. If a join fails, the task never runs: exit code 125."""
        procs = [str(d / "cgroup.procs") for d in [self.path, *self._extra]]
        return ["/bin/sh", "-c", JOIN_SCRIPT, "taskpool-join", str(len(procs)), *procs, *argv]

    def members(self) -> list[int]:
        try:
            text = (self.path / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(pid) for pid in text.split()]

    def kill(self) -> None:
        # Its v1 cgroups hold the same processes: the child joins v2 first, so this
        # reaches every one of them.
        _cgroups.kill(self.path)

    def is_empty(self) -> bool:
        return _cgroups.is_empty(self.path)

    def limit_report(self) -> str | None:
        lim, reports = self.limits, []
        memory_dir = self.path if "memory" in self._v2_controllers else self._v1.get("memory")
        if lim.memory_max is not None and memory_dir is not None:
            if "memory" in self._v2_controllers:
                kills = _cgroups.counter(memory_dir / "memory.events", "oom_kill")
            else:
                kills = _cgroups.counter(memory_dir / "memory.oom_control", "oom_kill")
            if kills:
                reports.append(
                    f"killed by the OOM killer: memory limit {mebibytes(lim.memory_max)} reached"
                    f" ({kills} process{'es' if kills > 1 else ''} killed)"
                )
        pids_dir = self.path if "pids" in self._v2_controllers else self._v1.get("pids")
        if lim.pids_max is not None and pids_dir is not None:
            refused = _cgroups.counter(pids_dir / "pids.events", "max")
            if refused:
                reports.append(
                    f"process limit {lim.pids_max} reached ({refused} fork"
                    f"{'s' if refused > 1 else ''} refused)"
                )
        return "; ".join(reports) or None

    def remove(self) -> None:
        for directory in [self.path, *self._extra]:
            # Still busy (a process stuck in uninterruptible sleep): the next boot's
            # reconciliation removes it.
            with contextlib.suppress(OSError):
                _cgroups.rmdir(directory)


# -- the node's choice ----------------------------------------------------------------


class Containment(abc.ABC):
    """How this node contains attempts. One instance per pool."""

    mode: str

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for the node's info and log: the mode and how each limit is enforced."""

    #: The cgroup holding every attempt of this node, if there is one: the guard kills it
    #: whole when the pool dies or stops renewing its leases.
    node_cgroup: Path | None = None

    @abc.abstractmethod
    def box(self, name: str, limits: ResourceLimits) -> Box:
        """A new, empty box for the attempt named `name` (`<task id>.<fence>`)."""

    def reclaim(self, node_id: str, name: str) -> list[int] | None:
        """Kill and remove what is left of dead node `node_id`'s attempt `name`; the pids
        killed, or None when this containment cannot find it exactly (the caller falls
        back to pid, start time and marker)."""
        del node_id, name
        return None

    def forget_node(self, node_id: str) -> None:  # noqa: B027 - nothing kept per node
        """Remove what is left (empty) of a dead node once its attempts are settled."""

    def close(self) -> None:  # noqa: B027 - nothing to release for a process group
        """Release what the node made for itself (its empty directories)."""


class ProcessGroupContainment(Containment):
    mode = "process-group"

    def __init__(self, why: str) -> None:
        self.why = why

    def describe(self) -> str:
        return (
            f"process-group ({self.why}); limits: memory as RLIMIT_AS, processes as"
            " RLIMIT_NPROC (per user, not for root), cpu not enforced"
        )

    def box(self, name: str, limits: ResourceLimits) -> Box:
        return ProcessGroupBox(name, limits)


class CgroupContainment(Containment):
    mode = "cgroup"

    def __init__(
        self,
        store_dir: Path,
        node_id: str,
        v2_controllers: frozenset[str],
        v1_store_dirs: dict[str, Path],
        kill_file: bool,
    ) -> None:
        self.store_dir = store_dir
        self.node_id = node_id
        self.node_cgroup = store_dir / node_id
        self.v2_controllers = v2_controllers
        self.v1_store_dirs = v1_store_dirs
        self.kill_file = kill_file

    def attempt_dir(self, name: str) -> Path:
        assert self.node_cgroup is not None
        return self.node_cgroup / name

    def describe(self) -> str:
        how = []
        for name in CONTROLLERS:
            if name in self.v2_controllers:
                how.append(f"{name} v2")
            elif name in self.v1_store_dirs:
                how.append(f"{name} v1")
            elif name == "memory":
                how.append("memory as RLIMIT_AS")
            elif name == "pids":
                how.append("pids as RLIMIT_NPROC")
            else:
                how.append(f"{name} not enforced")
        kill = "cgroup.kill" if self.kill_file else "freeze and kill"
        return f"cgroup v2 at {self.store_dir} ({kill}); limits: {', '.join(how)}"

    def box(self, name: str, limits: ResourceLimits) -> Box:
        wanted = set(limits.wanted())
        v1 = {c: d / self.node_id / name for c, d in self.v1_store_dirs.items() if c in wanted}
        box = CgroupBox(name, self.attempt_dir(name), limits, self.v2_controllers & wanted, v1)
        box.create()
        return box

    def reclaim(self, node_id: str, name: str) -> list[int] | None:
        path = self.store_dir / node_id / name
        if not path.is_dir():
            return None
        pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        _cgroups.kill(path)
        for _ in range(500):  # at most about a second for the kernel to finish the kills
            if _cgroups.is_empty(path):
                break
            time.sleep(0.002)
        extra = [d / node_id / name for d in self.v1_store_dirs.values()]
        for directory in [path, *extra]:
            with contextlib.suppress(OSError):
                _cgroups.rmdir(directory)
        return pids

    def forget_node(self, node_id: str) -> None:
        for directory in [self.store_dir, *self.v1_store_dirs.values()]:
            with contextlib.suppress(OSError):
                (directory / node_id).rmdir()  # only if empty

    def close(self) -> None:
        self.forget_node(self.node_id)
        for directory in [self.store_dir, *self.v1_store_dirs.values()]:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if empty: a sibling pool may still use it


def choose(
    store_id: str,
    node_id: str,
    *,
    mode: str = "auto",
    cgroup_mount: str | os.PathLike[str] | None = None,
    mountinfo: str | None = None,
    proc_cgroup: str | None = None,
) -> Containment:
    """Pick this node's containment: a cgroup per attempt where one can be made, else
    process groups. `mode` forces one ("cgroup" raises if impossible);
    `cgroup_mount` overrides the cgroup2 mount found in /proc/self/mountinfo (tests
    point it at a read-only or missing directory to see the fallback chosen)."""
    if mode not in ("auto", "cgroup", "process-group"):
        raise ValueError(f"containment must be auto, cgroup or process-group, not {mode!r}")
    if mode == "process-group":
        return ProcessGroupContainment("chosen by configuration")
    try:
        layout = _cgroups.discover(store_id, node_id, cgroup_mount, mountinfo, proc_cgroup)
    except (OSError, LookupError) as exc:
        if mode == "cgroup":
            raise RuntimeError(f"cgroup containment is not possible here: {exc}") from exc
        return ProcessGroupContainment(f"no cgroup could be made: {exc}")
    return CgroupContainment(
        layout.store_dir, node_id, layout.v2_controllers, layout.v1_store_dirs, layout.kill_file
    )
