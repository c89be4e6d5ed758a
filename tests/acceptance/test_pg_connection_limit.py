"""A node's PostgreSQL connections do not grow with its slots: many nodes of many
slots fit a server's default connection limit, all running at once."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import asyncpg

from taskpool import Status, TaskPool, TaskSpec
from taskpool.stores import NODE_CONNECTIONS
from tests.helpers import SAFETY_TIMEOUT_S, eventually
from tests.pg_cluster import private_cluster

NODES = 16
SLOTS = 16
#: The pooled connections, the lease connection and the LISTEN connection.
PER_NODE = NODE_CONNECTIONS + 2


async def test_sixteen_nodes_of_sixteen_slots_run_at_once_on_a_server_of_100_connections(
    tmp_path: Path,
) -> None:
    """16 pools of 16 slots on one database of a server limited to PostgreSQL's default
    100 connections fill every slot at once (256 tasks running together, each waiting
    for a file the test makes only then): no node runs short of connections, at most
    5 per node are open, and every task succeeds."""
    go = tmp_path / "go"
    # Each task says it runs, then waits for the test's go.
    script = f'touch "{tmp_path}/running.$1"; while [ ! -e "{go}" ]; do sleep 1; done'
    settings = {"max_connections": "100", "fsync": "off", "synchronous_commit": "off"}
    with private_cluster(settings) as cluster:
        admin = await asyncpg.connect(cluster.dsn)
        try:
            await admin.execute("CREATE DATABASE nodes")
            dsn = cluster.dsn.rpartition("/")[0] + "/nodes"
            peak = 0

            async def connections() -> int:
                nonlocal peak
                count: int = await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = 'nodes'"
                )
                peak = max(peak, count)
                return count

            async with AsyncExitStack() as stack:
                pools = [
                    await stack.enter_async_context(
                        TaskPool(dsn, max_parallel=SLOTS, poll_interval_s=0.5)
                    )
                    for _ in range(NODES)
                ]
                ids = await pools[0].submit_many(
                    [
                        TaskSpec.build(["sh", "-c", script, "task", str(n)])
                        for n in range(NODES * SLOTS)
                    ]
                )

                async def all_running() -> bool:
                    await connections()
                    return len(list(tmp_path.glob("running.*"))) == NODES * SLOTS

                await eventually(all_running, timeout_s=SAFETY_TIMEOUT_S * 4)
                for _ in range(20):  # connections while every slot of every node is busy
                    await connections()
                    await anyio.sleep(0.05)
                go.touch()
                with anyio.fail_after(SAFETY_TIMEOUT_S * 2):
                    ended = [await pools[n % NODES].wait(t) for n, t in enumerate(ids)]
                owners = {info.owner_node for info in ended}
        finally:
            await admin.close()
    assert [info.status for info in ended] == [Status.SUCCEEDED] * len(ids)
    assert owners == {pool.node_id for pool in pools}  # every node ran its share
    assert peak <= NODES * PER_NODE
