"""Reading a host's cgroup layout from /proc text: pure, so every kind of host can be
described here, not only the one the tests run on."""

from __future__ import annotations

from pathlib import Path

from taskpool._cgroups import _join, parse_mountinfo, parse_proc_cgroup

#: A pure cgroup v2 host (systemd), the pool in a delegated service cgroup.
PURE_V2_MOUNTINFO = """\
22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw
30 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
"""
PURE_V2_PROC_CGROUP = "0::/system.slice/automation.service/main\n"

#: This machine's kind: v1 controllers, and a v2 hierarchy without them.
HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct ro,relatime - cgroup cgroup rw,cpu,cpuacct
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_PROC_CGROUP = """\
8:pids:/
4:memory:/process_api/f502
1:cpu,cpuacct:/
0::/
"""

#: A container: its cgroup namespace root is a host cgroup, mounted read-only.
CONTAINER_MOUNTINFO = """\
700 690 0:30 /docker/abc /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw
"""


def test_a_pure_v2_host_is_read_with_the_pools_delegated_cgroup() -> None:
    """The cgroup2 mount is found in mountinfo (not assumed at /sys/fs/cgroup), and the
    pool's own cgroup is under it."""
    (mount,) = parse_mountinfo(PURE_V2_MOUNTINFO)
    own = parse_proc_cgroup(PURE_V2_PROC_CGROUP)
    assert mount.fstype == "cgroup2"
    assert not mount.read_only
    assert _join(mount, own[""]) == Path("/sys/fs/cgroup/system.slice/automation.service/main")


def test_a_hybrid_host_gives_v2_for_kill_and_v1_controllers_for_limits() -> None:
    """Each v1 hierarchy is known by its controllers, read-only ones are marked, and the
    pool's path in each is its own (memory here is not the root)."""
    mounts = {m.path: m for m in parse_mountinfo(HYBRID_MOUNTINFO)}
    own = parse_proc_cgroup(HYBRID_PROC_CGROUP)
    assert set(mounts) == {
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup/cpu,cpuacct",
        "/sys/fs/cgroup/unified",
    }
    assert mounts["/sys/fs/cgroup/cpu,cpuacct"].options >= {"cpu", "cpuacct"}
    assert mounts["/sys/fs/cgroup/cpu,cpuacct"].read_only
    assert own["memory"] == "/process_api/f502"
    assert own["cpu"] == own["cpuacct"] == "/"
    assert _join(mounts["/sys/fs/cgroup/memory"], own["memory"]) == Path(
        "/sys/fs/cgroup/memory/process_api/f502"
    )


def test_a_containers_namespaced_mount_is_read_relative_to_its_root() -> None:
    """Where the mount's root is a host cgroup, the path /proc/self/cgroup gives is made
    relative to it; a read-only mount is marked (the fallback will be chosen)."""
    (mount,) = parse_mountinfo(CONTAINER_MOUNTINFO)
    assert mount.read_only
    assert _join(mount, "/docker/abc/worker") == Path("/sys/fs/cgroup/worker")
