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
calls it directly; only waiting for a cgroup to empty is async.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ._guard_kill import kill_cgroup as _kill_cgroup
from ._models import CONTROLLERS, ResourceLimits

#: Directory, under the pool's cgroup, that holds one store's attempt cgroups (one
#: directory per node inside it, then one cgroup per attempt).
STORE_DIR_PREFIX = "taskpool."
#: Run by /bin/sh as `sh -c JOIN_SCRIPT name N procs_1 .. procs_N argv...`: writes "0"
#: (this process) to each cgroup.procs, then becomes the task.
JOIN_SCRIPT = (
    'n=$1; shift; while [ "$n" -gt 0 ]; do echo 0 > "$1" || exit 125; shift;'
    ' n=$((n - 1)); done; exec "$@"'
)
#: The exit code of a task whose child could not join its cgroup (it never ran).
JOIN_FAILED_EXIT = 125
CPU_PERIOD_US = 100_000


def mebibytes(size: int) -> str:
    return f"{size / 2**20:g} MiB"


# -- reading the host's cgroup layout (pure over the text of /proc files) ---------------


@dataclass(frozen=True, slots=True)
class Mount:
    path: str
    fstype: str
    options: frozenset[str]  # super options: the v1 controllers of a cgroup mount
    root: str  # the mount's root within its hierarchy
    read_only: bool


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup mounts listed in /proc/self/mountinfo."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 6 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        mount_options = set(fields[5].split(","))
        mounts.append(
            Mount(
                path=fields[4].replace("\\040", " "),
                fstype=tail[0],
                options=frozenset(tail[2].split(",")),
                root=fields[3],
                read_only="ro" in mount_options,
            )
        )
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/self/cgroup as {hierarchy: path}; the v2 hierarchy is named ""."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            found[""] = path
        for name in controllers.split(","):
            if name:
                found[name] = path
    return found


def _join(mount: Mount, cgroup_path: str) -> Path:
    """The directory of `cgroup_path` (as /proc/self/cgroup says) under `mount`."""
    root = mount.root.rstrip("/")
    relative = cgroup_path[len(root) :] if root and cgroup_path.startswith(root) else cgroup_path
    return Path(mount.path) / relative.lstrip("/")


# -- one attempt's box ----------------------------------------------------------------


class Box(abc.ABC):
    """Where one attempt's processes live."""

    name: str
    #: The box knows its members exactly (a cgroup): no descendant scans are needed.
    exact = False
    #: The task runs behind a wrapper (`wrap`), which reports a missing program only as
    #: an exit code: the runner checks the program first.
    wraps = False

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
    def __init__(self, name: str, limits: ResourceLimits) -> None:
        self.name = name
        self._rlimits = _rlimits(limits, memory=True, pids=True)

    def preexec(self) -> Callable[[], None] | None:
        return _rlimit_preexec(self._rlimits)


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
                _write(self.path / "memory.max", str(lim.memory_max))
                _write(self.path / "memory.swap.max", "0", missing_ok=True)
            elif "memory" in self._v1:
                _write(self._v1["memory"] / "memory.limit_in_bytes", str(lim.memory_max))
                _write(
                    self._v1["memory"] / "memory.memsw.limit_in_bytes",
                    str(lim.memory_max),
                    missing_ok=True,
                )
        if lim.pids_max is not None:
            target = self.path if "pids" in v2 else self._v1.get("pids")
            if target is not None:
                _write(target / "pids.max", str(lim.pids_max))
        if lim.cpu_max is not None:
            quota = max(1000, round(lim.cpu_max * CPU_PERIOD_US))
            if "cpu" in v2:
                _write(self.path / "cpu.max", f"{quota} {CPU_PERIOD_US}")
            elif "cpu" in self._v1:
                _write(self._v1["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(self._v1["cpu"] / "cpu.cfs_quota_us", str(quota))

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
        kill_cgroup(self.path)

    def is_empty(self) -> bool:
        return cgroup_is_empty(self.path)

    def limit_report(self) -> str | None:
        lim, reports = self.limits, []
        memory_dir = self.path if "memory" in self._v2_controllers else self._v1.get("memory")
        if lim.memory_max is not None and memory_dir is not None:
            if "memory" in self._v2_controllers:
                kills = _counter(memory_dir / "memory.events", "oom_kill")
            else:
                kills = _counter(memory_dir / "memory.oom_control", "oom_kill")
            if kills:
                reports.append(
                    f"killed by the OOM killer: memory limit {mebibytes(lim.memory_max)} reached"
                    f" ({kills} process{'es' if kills > 1 else ''} killed)"
                )
        pids_dir = self.path if "pids" in self._v2_controllers else self._v1.get("pids")
        if lim.pids_max is not None and pids_dir is not None:
            refused = _counter(pids_dir / "pids.events", "max")
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
                _rmdir(directory)


def _write(path: Path, value: str, *, missing_ok: bool = False) -> None:
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        if missing_ok:
            return
        raise
    try:
        os.write(fd, value.encode())
    except OSError:
        if not missing_ok:
            raise
    finally:
        os.close(fd)


def _counter(path: Path, key: str) -> int:
    """A `key value` line of a cgroup events file, as an int (0 if absent)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_is_empty(path: Path) -> bool:
    try:
        text = (path / "cgroup.events").read_text()
    except FileNotFoundError:
        return True
    return "populated 0" in text.splitlines()


def kill_cgroup(path: Path) -> None:
    """SIGKILL every process in the cgroup, racy forkers included: the guard's own
    routine (`cgroup.kill`, or freeze, kill every member, thaw where it is missing)."""
    _kill_cgroup(str(path), use_kill_file=True)


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(str(path)) from exc
        if exc.errno != errno.EBUSY:
            raise
        # Still populated for a moment after the last member died: try again shortly.
        for _ in range(50):
            time.sleep(0.002)
            try:
                path.rmdir()
                return
            except OSError as again:
                if again.errno != errno.EBUSY:
                    raise
        raise


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
        kill_cgroup(path)
        for _ in range(500):  # at most about a second for the kernel to finish the kills
            if cgroup_is_empty(path):
                break
            time.sleep(0.002)
        extra = [d / node_id / name for d in self.v1_store_dirs.values()]
        for directory in [path, *extra]:
            with contextlib.suppress(OSError):
                _rmdir(directory)
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


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


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
        return _cgroup_containment(store_id, node_id, cgroup_mount, mountinfo, proc_cgroup)
    except (OSError, LookupError) as exc:
        if mode == "cgroup":
            raise RuntimeError(f"cgroup containment is not possible here: {exc}") from exc
        return ProcessGroupContainment(f"no cgroup could be made: {exc}")


def _cgroup_containment(
    store_id: str,
    node_id: str,
    cgroup_mount: str | os.PathLike[str] | None,
    mountinfo: str | None,
    proc_cgroup: str | None,
) -> CgroupContainment:
    mounts = parse_mountinfo(mountinfo if mountinfo is not None else _read("/proc/self/mountinfo"))
    own = parse_proc_cgroup(proc_cgroup if proc_cgroup is not None else _read("/proc/self/cgroup"))
    if cgroup_mount is not None:
        v2_mount = Mount(os.fspath(cgroup_mount), "cgroup2", frozenset(), "/", False)
    else:
        v2_mount = next((m for m in mounts if m.fstype == "cgroup2"), None)  # type: ignore[assignment]
        if v2_mount is None:
            raise LookupError("no cgroup2 hierarchy is mounted")
    if "" not in own:
        raise LookupError("this process is in no cgroup v2")
    own_dir = _join(v2_mount, own[""])
    store_dir = own_dir / f"{STORE_DIR_PREFIX}{store_id}"
    if not (own_dir / "cgroup.procs").exists():
        raise LookupError(f"{own_dir} is not a cgroup2 directory")
    store_dir.mkdir(exist_ok=True)
    probe = store_dir / f"probe.{os.getpid()}"
    probe.mkdir()  # raises where we may not: read-only mount, no delegation
    try:
        if not (probe / "cgroup.procs").exists():  # the kernel makes it in every cgroup
            raise LookupError(f"{v2_mount.path} is not a cgroup2 hierarchy")
        kill_file = (probe / "cgroup.kill").exists()
    finally:
        probe.rmdir()
    node_dir = store_dir / node_id
    node_dir.mkdir(exist_ok=True)
    v2 = _enable_v2_controllers(own_dir, store_dir, node_dir)
    v1: dict[str, Path] = {}
    for name in CONTROLLERS:
        if name in v2:
            continue
        mount = next(
            (m for m in mounts if m.fstype == "cgroup" and name in m.options and not m.read_only),
            None,
        )
        if mount is None or name not in own:
            continue
        directory = _join(mount, own[name]) / f"{STORE_DIR_PREFIX}{store_id}"
        with contextlib.suppress(OSError):
            directory.mkdir(exist_ok=True)
            (directory / node_id).mkdir(exist_ok=True)
            v1[name] = directory
    return CgroupContainment(store_dir, node_id, frozenset(v2), v1, kill_file)


def _enable_v2_controllers(own_dir: Path, store_dir: Path, node_dir: Path) -> set[str]:
    """Enable memory, pids and cpu for the attempts' cgroups where the host allows it.

    Needs each controller in the parent's `cgroup.subtree_control`: granted in a
    delegated subtree whose processes live in a leaf, refused (EBUSY) in a cgroup that
    holds processes itself, other than the root."""
    try:
        available = set((own_dir / "cgroup.controllers").read_text().split())
    except OSError:
        return set()
    enabled: set[str] = set()
    for name in CONTROLLERS:
        if name not in available:
            continue
        try:
            for directory in (own_dir, store_dir, node_dir):
                current = set((directory / "cgroup.subtree_control").read_text().split())
                if name not in current:
                    _write(directory / "cgroup.subtree_control", f"+{name}")
        except OSError:
            continue
        enabled.add(name)
    return enabled
