"""The host's cgroup filesystem: where this process may make cgroups, and the small
file operations on them.

`discover` reads the cgroup layout (/proc/self/mountinfo and /proc/self/cgroup, parsed
by pure functions), makes the node's directories and probes what they offer: the v2
controllers it can enable, a v1 hierarchy for each limit v2 cannot enforce, whether
`cgroup.kill` exists. The rest are the file operations containment boxes use: write a
control file, read a counter, see whether a cgroup is empty, kill it, remove it.
Containment policy (which mode, what a box is, how limits are written) is
_containment.py's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ._guard_kill import kill_cgroup
from ._models import CONTROLLERS

#: Directory, under the pool's cgroup, that holds one store's attempt cgroups (one
#: directory per node inside it, then one cgroup per attempt).
STORE_DIR_PREFIX = "taskpool."


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


# -- cgroup files ------------------------------------------------------------------


def write(path: Path, value: str, *, missing_ok: bool = False) -> None:
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


def counter(path: Path, key: str) -> int:
    """A `key value` line of a cgroup events file, as an int (0 if absent)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def is_empty(path: Path) -> bool:
    try:
        text = (path / "cgroup.events").read_text()
    except FileNotFoundError:
        return True
    return "populated 0" in text.splitlines()


def kill(path: Path) -> None:
    """SIGKILL every process in the cgroup, racy forkers included: the guard's own
    routine (`cgroup.kill`, or freeze, kill every member, thaw where it is missing)."""
    kill_cgroup(str(path), use_kill_file=True)


def rmdir(path: Path) -> None:
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


# -- where this node makes its cgroups ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Layout:
    """Where this node makes its attempts' cgroups, and what they offer."""

    store_dir: Path  # the v2 directory of this store's nodes (this node's is inside)
    v2_controllers: frozenset[str]  # the limits the v2 hierarchy enforces
    v1_store_dirs: dict[str, Path]  # a v1 directory, per limit only a v1 hierarchy enforces
    kill_file: bool  # cgroup.kill exists (else: freeze, kill every member, thaw)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def discover(
    store_id: str,
    node_id: str,
    cgroup_mount: str | os.PathLike[str] | None,
    mountinfo: str | None,
    proc_cgroup: str | None,
) -> Layout:
    """Make this node's directories (`taskpool.<store id>/<node id>`, in the v2 hierarchy
    and in a v1 one for each limit v2 cannot enforce) and say what they offer. Raises
    OSError or LookupError where no cgroup can be made (the caller falls back)."""
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
    return Layout(store_dir, frozenset(v2), v1, kill_file)


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
                    write(directory / "cgroup.subtree_control", f"+{name}")
        except OSError:
            continue
        enabled.add(name)
    return enabled
