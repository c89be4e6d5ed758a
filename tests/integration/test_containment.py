"""Containment done for real: every process a task starts dies with its task, found
exactly by the attempt's cgroup (setsid, double-forked daemons, cleared
environments), with memory and process limits and the reason recorded; and the
process-group fallback is chosen, and says so, where no cgroup can be made.

Each task writes the pids it starts to a file of the test's own; "nothing left"
is judged from those pids and from the attempt's cgroup, never by scanning the
host."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from taskpool import ResourceLimits, Status, TaskSpec
from taskpool._containment import CgroupContainment, choose
from tests.acceptance.test_restart import pool_process
from tests.helpers import eventually, fast_pool, open_store, running

#: A daemon the way daemon(3) makes one: fork, setsid, fork again; the grandchild
#: records its pid and sleeps. Also a setsid descendant that clears its environment.
ESCAPERS = r"""
import os, subprocess, sys, time
pids = sys.argv[1]
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(600)
    os._exit(0)
env_cleared = subprocess.Popen(["setsid", "env", "-i", "sleep", "600"])  # setsid execs: same pid
with open(pids, "a") as f:
    f.write(f"{env_cleared.pid}\n")
"""


def escapers(pids: Path, then: str) -> list[str]:
    """A task that starts the escapers, then runs `then` (a shell command)."""
    script = f"{sys.executable} -c '{ESCAPERS}' {pids}; {then}"
    return ["sh", "-c", script]


def recorded(pids: Path) -> list[int]:
    return [int(p) for p in pids.read_text().split()] if pids.exists() else []


def alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def cgroup_only() -> None:
    """These cases are about the cgroup mode: it must be available on the test host."""
    probe = choose("probe" + os.urandom(8).hex(), "node")
    assert isinstance(probe, CgroupContainment), probe.describe()
    probe.close()


pytestmark = pytest.mark.usefixtures("cgroup_only")


async def test_descendants_that_outlive_the_leader_are_killed_and_named(db: Path) -> None:
    """`sh -c 'setsid sleep 600 & exit 0'` succeeds, its sleep is dead the moment the
    terminal status is visible, and the reason names what was killed."""
    pids = db.parent / "pids"
    async with fast_pool(db, containment="cgroup") as pool:
        task = await pool.submit(["sh", "-c", f"setsid sleep 600 & echo $! > {pids}; exit 0"])
        info = await pool.wait(task)
        (sleeper,) = recorded(pids)
        assert not alive(sleeper)
    assert info.status is Status.SUCCEEDED
    assert info.reason == (
        "exited with code 0; 1 descendant process outlived the leader and were killed"
    )


@pytest.mark.parametrize("how", ["exit", "cancel", "timeout", "stall"])
async def test_daemons_and_cleared_environments_die_with_their_task(db: Path, how: str) -> None:
    """A double-forked setsid daemon and a setsid `env -i` descendant die with their task
    however it ends: the leader's own exit, a cancel, a timeout or a stall."""
    pids = db.parent / "pids"
    then = {"exit": "exit 3", "cancel": "sleep 600", "timeout": "sleep 600", "stall": "sleep 600"}
    options = {"timeout": {"timeout_s": 1.0}, "stall": {"stall_timeout_s": 1.0}}.get(how, {})
    async with fast_pool(db, containment="cgroup") as pool:
        task = await pool.submit(escapers(pids, then[how]), **options)

        async def started() -> bool:
            return len(recorded(pids)) == 2

        await eventually(started)
        if how == "cancel":
            await pool.cancel(task)
        info = await pool.wait(task)
        assert [pid for pid in recorded(pids) if alive(pid)] == []
        assert pool.containment is not None
        assert isinstance(pool.containment, CgroupContainment)
        assert not pool.containment.attempt_dir(f"{task}.1").exists()
    expected = {
        "exit": Status.FAILED,
        "cancel": Status.CANCELLED,
        "timeout": Status.TIMED_OUT,
        "stall": Status.STALLED,
    }
    assert info.status is expected[how], info.reason


async def test_a_memory_hog_is_oom_killed_with_the_reason_and_harms_nobody(db: Path) -> None:
    """A task that allocates 1 GiB under a 100 MiB limit fails with the OOM reason; a
    task beside it and the pool are unharmed."""
    hog = [sys.executable, "-c", "b = bytearray(1 << 30); import time; time.sleep(5)"]
    async with fast_pool(db, containment="cgroup") as pool:
        neighbour = await pool.submit(["sh", "-c", "sleep 0.5; echo fine"])
        task = await pool.submit(hog, memory_max=100 * 2**20)
        info = await pool.wait(task)
        assert (await pool.wait(neighbour)).status is Status.SUCCEEDED
        after = await pool.submit(["true"])
        assert (await pool.wait(after)).status is Status.SUCCEEDED
    assert info.status is Status.FAILED
    assert info.reason is not None
    assert "killed by the OOM killer: memory limit 100 MiB reached" in info.reason


async def test_a_fork_bomb_under_a_process_limit_ends_naming_it(db: Path) -> None:
    """A fork bomb under pids_max 50 cannot take the host: it ends with a reason naming
    the limit, and leaves nothing behind (its cgroup is empty and gone)."""
    bomb = ["sh", "-c", "f() { f & f & wait; }; f"]
    async with fast_pool(db, containment="cgroup") as pool:
        task = await pool.submit(bomb, pids_max=50, timeout_s=5.0)
        info = await pool.wait(task)
        assert pool.containment is not None
        assert isinstance(pool.containment, CgroupContainment)
        assert not pool.containment.attempt_dir(f"{task}.1").exists()
    # It may collapse by itself or run into its timeout: either way the limit is named.
    assert info.status in (Status.SUCCEEDED, Status.FAILED, Status.TIMED_OUT)
    assert info.reason is not None
    assert "process limit 50 reached" in info.reason


async def test_node_wide_default_limits_apply_to_tasks_that_set_none(db: Path) -> None:
    """The pool's default limits bind a task that sets none; the task's own win."""
    hog = [sys.executable, "-c", "b = bytearray(300 << 20)"]
    async with fast_pool(
        db, containment="cgroup", default_limits=ResourceLimits(memory_max=64 * 2**20)
    ) as pool:
        capped = await pool.submit(hog)
        allowed = await pool.submit(hog, memory_max=1024 * 2**20)
        assert (await pool.wait(capped)).status is Status.FAILED
        assert (await pool.wait(allowed)).status is Status.SUCCEEDED


@pytest.mark.usefixtures("without_guard")
async def test_the_next_boot_kills_a_dead_pools_attempt_by_its_cgroup(db: Path) -> None:
    """A pool SIGKILLed while its task runs daemons: the next pool finds the attempt's
    cgroup, kills everything in it (no process-table scan) and removes it."""
    pids = db.parent / "pids"
    async with open_store(str(db)) as store:
        task = await store.submit(TaskSpec.build(escapers(pids, "sleep 600")))
    with pool_process(db, "1") as (proc, dead_node):

        async def started() -> bool:
            return len(recorded(pids)) == 2

        await eventually(started)
        proc.kill()
        proc.wait()
    assert all(alive(pid) for pid in recorded(pids))  # orphans, until the next boot
    async with fast_pool(db, containment="cgroup") as pool:
        info = await pool.get(task)
        assert [pid for pid in recorded(pids) if alive(pid)] == []
        assert isinstance(pool.containment, CgroupContainment)
        assert (pool.containment.store_dir / dead_node).parent.exists()
        assert not (pool.containment.store_dir / dead_node).exists()  # removed, emptied
    assert info.reason is not None
    assert f"killed leftover cgroup of attempt {task}.1 (" in info.reason


@pytest.mark.parametrize("mount", ["missing", "not-a-cgroup", "read-only"])
async def test_the_fallback_is_chosen_and_said_where_no_cgroup_can_be_made(
    db: Path, tmp_path: Path, mount: str
) -> None:
    """Pointed at a missing directory, a plain directory or a read-only cgroup2 mount,
    the pool runs in process-group mode, says so in its node info, and still runs and
    cleans up tasks."""
    target = tmp_path / "cgroup"
    mounted = False
    if mount == "not-a-cgroup":
        target.mkdir()
    elif mount == "read-only":
        target.mkdir()
        subprocess.run(["mount", "-t", "cgroup2", "-o", "ro", "none", str(target)], check=True)
        mounted = True
    try:
        async with fast_pool(db, containment="auto", cgroup_mount=target) as pool:
            assert pool.containment is not None
            assert pool.containment.mode == "process-group"
            (node,) = [n for n in await pool.store.list_nodes() if n.id == pool.node_id]
            assert node.containment is not None
            assert node.containment.startswith("process-group (no cgroup could be made")
            task = await pool.submit(["sh", "-c", "sleep 600 & sleep 600"])
            await running(pool, task)
            await pool.cancel(task, force=True)
            assert (await pool.wait(task)).status is Status.CANCELLED
    finally:
        if mounted:
            subprocess.run(["umount", str(target)], check=True)


async def test_cgroup_mode_is_said_in_the_node_info(db: Path) -> None:
    """The node registers how it contains attempts, and the CLI shows it."""
    async with fast_pool(db, containment="cgroup") as pool:
        (node,) = [n for n in await pool.store.list_nodes() if n.id == pool.node_id]
    assert node.containment is not None
    assert node.containment.startswith("cgroup v2 at ")


async def test_a_cpu_limit_throttles_the_task(db: Path) -> None:
    """A busy loop under cpu_max 0.2 is throttled by the kernel (its cgroup's cpu.stat
    counts throttled periods) while it runs."""
    burn = [sys.executable, "-c", "print('burning', flush=True)\nwhile True: pass"]
    async with fast_pool(db, containment="cgroup") as pool:
        containment = pool.containment
        assert isinstance(containment, CgroupContainment)
        task = await pool.submit(burn, cpu_max=0.2)
        info = await running(pool, task)
        if "cpu" in containment.v2_controllers:
            stat = containment.attempt_dir(f"{task}.{info.fence}") / "cpu.stat"
        else:
            v1 = containment.v1_store_dirs["cpu"]
            stat = v1 / containment.node_id / f"{task}.{info.fence}" / "cpu.stat"

        async def throttled() -> bool:
            fields = dict(line.split() for line in stat.read_text().splitlines())
            return int(fields["nr_throttled"]) > 0

        await eventually(throttled)
        await pool.cancel(task, force=True)
        assert (await pool.wait(task)).status is Status.CANCELLED


# -- the start gate of process-group boxes --------------------------------------------
def _gated_spawn(marker: Path) -> tuple[subprocess.Popen[bytes], int]:
    from taskpool._attempt_process import spawn
    from taskpool._containment import ProcessGroupBox

    read_end, gate = os.pipe()
    try:
        env = {b"PATH": os.environb.get(b"PATH", b"/usr/bin:/bin")}
        proc = spawn(
            ["touch", str(marker)], None, env, ProcessGroupBox("t", ResourceLimits()), gate=read_end
        )
    finally:
        os.close(read_end)
    return proc, gate


def test_a_gated_task_never_runs_if_its_pool_dies_before_the_guard_watches_it(
    tmp_path: Path,
) -> None:
    """Process-group mode: the task waits behind its gate until the runner has handed it
    to the guard; a pool that dies in between closes the gate unopened (the kernel
    closes its end), and the task exits 125 without ever running."""
    from taskpool._containment import JOIN_FAILED_EXIT

    marker = tmp_path / "ran"
    proc, gate = _gated_spawn(marker)
    os.close(gate)  # as the kernel does when the pool process dies
    with proc:
        assert proc.wait(timeout=60) == JOIN_FAILED_EXIT
    assert not marker.exists()

    proc, gate = _gated_spawn(marker)
    os.write(gate, b"go\n")
    os.close(gate)
    with proc:
        assert proc.wait(timeout=60) == 0
    assert marker.exists()
