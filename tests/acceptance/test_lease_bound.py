"""An attempt's processes never run past its lease: a node that cannot renew stops
them before the lease runs out, so a rescuer's copy (started only after expiry) never
overlaps them. Done for real: the database stopped, the network refused or silently
dropped, the pool paused past its lease. Each copy of the task logs its own ticks;
overlap is judged from those logs, not from timings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import psutil
import pytest

from taskpool import Status, TaskInfo, TaskSpec
from tests.acceptance.test_restart import ROOT, _submit_all, pool_process
from tests.helpers import eventually, fast_pool, open_store
from tests.netproxy import proxy_to
from tests.pg_cluster import Cluster, private_cluster
from tests.postgres import fresh_postgres_database

LEASE_TTL_S = 3.0


def ticker(log_dir: Path) -> list[str]:
    """A task that appends the time to a file of its attempt's own (by fence) forever."""
    script = 'while :; do date +%s.%N >> "$0/ticks.${TASKPOOL_ATTEMPT##*:}"; sleep 0.05; done'
    return ["sh", "-c", script, str(log_dir)]


def ticks(log_dir: Path, fence: int) -> list[float]:
    path = log_dir / f"ticks.{fence}"
    if not path.exists():
        return []
    return [float(line) for line in path.read_text().split() if line]


def group_alive(pgid: int) -> bool:
    """True if a live (non-zombie) process is in the task's process group."""
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):
            continue
    return False


async def _state(database: str, task_id: int) -> TaskInfo:
    async with open_store(database) as store:
        return await store.get(task_id)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with private_cluster() as running_cluster:
        yield running_cluster


async def test_an_outage_longer_than_the_lease_stops_the_task_in_time(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The database stops for longer than the lease: the node kills its task before the
    lease runs out, rides out the outage itself, hands the attempt back without using
    it when the database returns, and runs the task again; nothing is marked lost."""
    async with fast_pool(
        cluster.dsn, lease_ttl_s=LEASE_TTL_S, store_outage_tolerance_s=120, max_parallel=1
    ) as pool:
        task = await pool.submit(ticker(tmp_path), max_attempts=1)

        async def ticking() -> TaskInfo | None:
            info = await pool.get(task)
            return info if info.pid is not None and ticks(tmp_path, 1) else None

        first = await eventually(ticking)
        assert first.pid is not None
        stopped_at = time.time()  # no renewal can start after this: the lease ends by +TTL
        await anyio.to_thread.run_sync(cluster.stop)

        async def killed() -> bool:
            return not group_alive(first.pid or 0)

        await eventually(killed)
        assert max(ticks(tmp_path, 1)) < stopped_at + LEASE_TTL_S
        await anyio.to_thread.run_sync(cluster.start)

        async def running_again() -> TaskInfo | None:
            info = await pool.get(task)
            return info if info.fence == 2 and info.status is Status.RUNNING else None

        again = await eventually(running_again)
        assert again.attempts_used == 1  # the first attempt was refunded
        events = await pool.events(task)
        handed_back = next(e for e in events if e.fence == 1 and e.to_status is Status.WAITING)
        assert handed_back.reason.startswith(f"self-fenced: node {pool.node_id} could not renew")
        assert Status.LOST not in {e.to_status for e in events}
        await pool.cancel(task, force=True)
        assert (await pool.wait(task)).status is Status.CANCELLED


@pytest.mark.parametrize("cut", ["refused", "blackholed"])
async def test_a_partitioned_node_stops_its_copy_before_the_rescuer_starts(
    cut: str, tmp_path: Path
) -> None:
    """Node A reaches the database through a proxy that is then cut (connections refused,
    or packets silently dropped); node B rescues the task after the lease expires. A's
    copy is dead before B's starts (from both copies' own tick logs), and A exits by
    itself at its outage tolerance instead of hanging."""
    async with fresh_postgres_database() as dsn:
        with proxy_to(dsn) as proxy:
            (task,) = await _submit_all(dsn, [TaskSpec.build(ticker(tmp_path), max_attempts=2)])
            node_a = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "taskpool",
                    "--db",
                    proxy.dsn(dsn),
                    "worker",
                    "--lease-ttl",
                    str(LEASE_TTL_S),
                    "--outage-tolerance",
                    "8",
                    "--max-parallel",
                    "1",
                ],
                cwd=ROOT,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:

                async def a_ticking() -> TaskInfo | None:
                    info = await _state(dsn, task)
                    return info if info.pid is not None and ticks(tmp_path, 1) else None

                first = await eventually(a_ticking)
                proxy.refuse() if cut == "refused" else proxy.blackhole()
                async with fast_pool(dsn, lease_ttl_s=LEASE_TTL_S, max_parallel=1) as node_b:

                    async def b_ticking() -> bool:
                        info = await node_b.get(task)
                        return info.fence == 2 and len(ticks(tmp_path, 2)) >= 3

                    await eventually(b_ticking)
                    assert max(ticks(tmp_path, 1)) < min(ticks(tmp_path, 2))
                    assert not group_alive(first.pid or 0)
                    # A never notices silently, never hangs: it crashes at its tolerance.
                    await anyio.to_thread.run_sync(node_a.wait, 60)
                    assert node_a.returncode != 0
                    assert node_a.stderr is not None
                    assert "StoreUnavailable" in node_a.stderr.read()
                    info = await node_b.get(task)
                    assert info.status is Status.RUNNING
                    assert info.owner_node == node_b.node_id
                    await node_b.cancel(task, force=True)
                    assert (await node_b.wait(task)).status is Status.CANCELLED
            finally:
                if node_a.poll() is None:
                    node_a.kill()
                node_a.wait()
                if node_a.stderr is not None:
                    node_a.stderr.close()


async def test_a_paused_pool_never_marks_its_own_task_lost(database: str, tmp_path: Path) -> None:
    """A pool SIGSTOPped past its lease and woken again does not rescue its own attempt:
    it stops the copy whose lease ran out, hands it back without using an attempt, and
    runs the task again; nothing is lost."""
    (task,) = await _submit_all(database, [TaskSpec.build(ticker(tmp_path), max_attempts=1)])
    with pool_process(database, "1", "2.0") as (proc, node):

        async def ticking() -> TaskInfo | None:
            info = await _state(database, task)
            return info if info.pid is not None and ticks(tmp_path, 1) else None

        first = await eventually(ticking)
        assert first.lease_expires_at is not None
        proc.send_signal(signal.SIGSTOP)

        async def expired() -> bool:
            info = await _state(database, task)
            # Well past the lease, as the store's own clock (this host's) says.
            return info.lease_expires_at is not None and time.time() > info.lease_expires_at + 1

        await eventually(expired)
        proc.send_signal(signal.SIGCONT)

        async def running_again() -> TaskInfo | None:
            info = await _state(database, task)
            return info if info.fence == 2 and info.status is Status.RUNNING else None

        again = await eventually(running_again)
        assert again.owner_node == node
        assert again.attempts_used == 1
        assert not group_alive(first.pid or 0)
        async with open_store(database) as store:
            events = await store.events(task)
            handed_back = next(e for e in events if e.fence == 1 and e.to_status is Status.WAITING)
            # Stopped by the pool itself when it woke, or already by its guard meanwhile.
            assert handed_back.reason.startswith(
                (f"self-fenced: node {node} could not renew", "stopped at lease expiry by the")
            )
            assert Status.LOST not in {e.to_status for e in events}
            await store.request_cancel(task, force=True)

        async def cancelled() -> bool:
            return (await _state(database, task)).status is Status.CANCELLED

        await eventually(cancelled)
