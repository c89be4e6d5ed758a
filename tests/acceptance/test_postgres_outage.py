"""PostgreSQL going away under a running pool: a short outage is ridden out and the
results are written when it returns; a long one crashes the pool loudly, children
killed, instead of hanging (the Airflow incident)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import psutil
import pytest

from taskpool import PoolCrashed, Status, StoreUnavailable
from tests.helpers import eventually, fast_pool, has_exited, no_attempt_processes, running
from tests.pg_cluster import Cluster, private_cluster


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with private_cluster() as running_cluster:
        yield running_cluster


async def test_a_short_outage_is_ridden_out(cluster: Cluster, tmp_path: Path) -> None:
    """The server stops for a moment while a task runs; the task finishes meanwhile and
    its output and status are written once the server is back."""
    go = tmp_path / "go"
    script = f"echo before; while [ ! -e {go} ]; do sleep 0.01; done; echo after"
    async with fast_pool(cluster.dsn, store_outage_tolerance_s=60, lease_ttl_s=60) as pool:
        task = await pool.submit(["sh", "-c", script])
        info = await running(pool, task)
        assert info.pid is not None
        leader = psutil.Process(info.pid)

        async def has_output() -> bool:
            return "before" in await pool.output(task)

        await eventually(has_output)
        await anyio.to_thread.run_sync(cluster.stop)
        go.touch()  # the task ends while the database is down

        async def ended() -> bool:
            return has_exited(leader)

        await eventually(ended)
        await anyio.to_thread.run_sync(cluster.start)
        done = await pool.wait(task)
        assert done.status is Status.SUCCEEDED
        assert await pool.output(task) == "before\nafter\n"
        again = await pool.submit(["echo", "still working"])
        assert (await pool.wait(again)).status is Status.SUCCEEDED
    assert await no_attempt_processes()


async def test_an_outage_past_the_tolerance_crashes_the_pool(cluster: Cluster) -> None:
    """With the server gone for longer than the tolerance, the pool kills its children
    and leaves its context with PoolCrashed caused by StoreUnavailable."""
    with pytest.raises(PoolCrashed) as crash:
        async with fast_pool(
            cluster.dsn, store_outage_tolerance_s=1.0, heartbeat_interval_s=0.2
        ) as pool:
            task = await pool.submit(["sh", "-c", "sleep 600 & sleep 600"])
            await running(pool, task)
            await anyio.to_thread.run_sync(cluster.stop)
            await anyio.sleep(600)  # the crash must cut this short
    assert isinstance(crash.value.__cause__, StoreUnavailable)
    assert await no_attempt_processes()
