"""The node's guard, a process outside the pool, keeps an attempt's processes within its
lease whatever happens to the pool itself: frozen (SIGSTOP) or dead (SIGKILL). Judged
from the tasks' own tick logs and the pids they record, never by scanning the host."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from taskpool import Status, TaskInfo, TaskSpec
from taskpool._containment import CgroupContainment
from tests.acceptance.test_lease_bound import LEASE_TTL_S, _state, group_alive, ticker, ticks
from tests.acceptance.test_restart import ROOT, _submit_all, pool_process
from tests.helpers import eventually, fast_pool
from tests.integration.test_containment import alive, escapers, recorded

pytestmark = pytest.mark.usefixtures("both_containments")


async def test_a_frozen_nodes_copy_is_dead_before_the_rescuer_starts_its_own(
    database: str, tmp_path: Path
) -> None:
    """Node A is SIGSTOPped past its lease while its task runs; node B rescues the task.
    A's guard kills A's copy before B's copy starts (no overlap in the tick logs); after
    SIGCONT, A reports its attempt as stopped at lease expiry by its guard."""
    (task,) = await _submit_all(database, [TaskSpec.build(ticker(tmp_path), max_attempts=2)])
    log = tmp_path / "node-a.log"
    with log.open("w") as stderr:
        node_a = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "taskpool",
                "--db",
                database,
                "worker",
                "--lease-ttl",
                str(LEASE_TTL_S),
                "--max-parallel",
                "1",
                "--kill-grace",
                "0.5",
                "--shutdown-drain",
                "0",
            ],
            cwd=ROOT,
            stderr=stderr,
        )
    try:

        async def a_ticking() -> TaskInfo | None:
            info = await _state(database, task)
            return info if info.pid is not None and ticks(tmp_path, 1) else None

        first = await eventually(a_ticking)
        node_a.send_signal(signal.SIGSTOP)
        async with fast_pool(database, lease_ttl_s=LEASE_TTL_S, max_parallel=1) as node_b:

            async def b_ticking() -> bool:
                info = await node_b.get(task)
                return info.fence == 2 and len(ticks(tmp_path, 2)) >= 3

            await eventually(b_ticking)
            assert not group_alive(first.pid or 0)  # while A is still frozen
            assert max(ticks(tmp_path, 1)) < min(ticks(tmp_path, 2))
            node_a.send_signal(signal.SIGCONT)

            def reported() -> bool:
                return "stopped at lease expiry by the node's guard" in log.read_text()

            async def said() -> bool:
                return reported()

            await eventually(said)
            info = await node_b.get(task)
            assert info.status is Status.RUNNING
            assert info.owner_node == node_b.node_id
            await node_b.cancel(task, force=True)
            assert (await node_b.wait(task)).status is Status.CANCELLED
        node_a.send_signal(signal.SIGTERM)
        assert node_a.wait(timeout=60) == 0
    finally:
        if node_a.poll() is None:
            node_a.send_signal(signal.SIGCONT)
            node_a.kill()
            node_a.wait()


async def test_a_killed_pools_processes_die_at_once_and_the_next_boot_clears_up(
    database: str, tmp_path: Path, both_containments: str
) -> None:
    """SIGKILL the pool while its task runs: its guard kills the attempt at once (long
    before the lease, 60 s, runs out): in cgroup mode every process, daemons included;
    in process-group mode the group. The next pool settles the attempt."""
    pids = tmp_path / "pids"
    if both_containments == "cgroup":
        argv = escapers(pids, "sleep 600")
    else:  # a group of two: escapers would outlive a process-group guard, as documented
        argv = ["sh", "-c", f"sleep 600 & echo $! >> {pids}; echo $$ >> {pids}; wait"]
    (task,) = await _submit_all(database, [TaskSpec.build(argv)])
    with pool_process(database, "1", "60") as (proc, dead_node):

        async def started() -> bool:
            return len(recorded(pids)) == 2

        await eventually(started)
        proc.kill()
        proc.wait()

    async def all_dead() -> bool:
        return not [pid for pid in recorded(pids) if alive(pid)]

    await eventually(all_dead)  # no new pool yet: the dead pool's guard did it
    async with fast_pool(database) as pool:
        info = await pool.get(task)
        assert info.status is Status.LOST
        if isinstance(pool.containment, CgroupContainment):
            assert not (pool.containment.store_dir / dead_node).exists()  # cleared up


async def test_a_dead_guard_is_restarted_and_still_guards(
    database: str, tmp_path: Path, both_containments: str
) -> None:
    """SIGKILL the node's guard while a task runs: at the next heartbeat the pool starts a
    new one and hands it the running attempt, so a later death of the pool is still
    covered (the new guard is alive, answering, and watches what the old one did)."""
    async with fast_pool(database, lease_ttl_s=3.0) as pool:
        task = await pool.submit(ticker(tmp_path))
        await eventually(lambda: _ticking(tmp_path))
        node_guard = pool._guard
        assert node_guard is not None
        old = node_guard.process
        assert old is not None
        os.kill(old.pid, signal.SIGKILL)

        async def replaced() -> bool:
            guard = node_guard.process
            return guard is not None and guard is not old and guard.alive

        await eventually(replaced)
        new = node_guard.process
        assert new is not None
        await new.sync()  # it answers, having taken every watch sent before
        info = await pool.get(task)
        watched = f"node:{pool.node_id}" if both_containments == "cgroup" else None
        marker = f"{pool.store.store_id}:{task}:{info.fence}"
        assert (watched or marker) in new._watching
        assert (await pool.get(task)).status is Status.RUNNING
        assert node_guard.note.startswith("process ")
        await pool.cancel(task, force=True)
        assert (await pool.wait(task)).status is Status.CANCELLED


async def _ticking(log_dir: Path) -> bool:
    return bool(ticks(log_dir, 1))
