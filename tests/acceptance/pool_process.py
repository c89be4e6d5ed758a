"""A pool in a process of its own, for tests that kill or stop the pool's process.

Usage: python -m tests.acceptance.pool_process DB [MAX_PARALLEL] [LEASE_TTL_S] [OUTAGE_S]
DB is an SQLite path or a postgresql:// URL.
Prints "ready <node id>" once the pool runs, then serves until killed.
"""

from __future__ import annotations

import os
import sys

import anyio

from taskpool import TaskPool


async def serve(db: str, max_parallel: int, lease_ttl_s: float, outage_s: float) -> None:
    async with TaskPool(
        db,
        max_parallel=max_parallel,
        lease_ttl_s=lease_ttl_s,
        store_outage_tolerance_s=outage_s,
        containment=os.environ.get("TASKPOOL_TEST_CONTAINMENT", "auto"),
        guard=os.environ.get("TASKPOOL_TEST_GUARD", "on") != "off",
        poll_interval_s=0.05,
        reaper_interval_s=0.2,
        kill_grace_s=0.5,
    ) as pool:
        print("ready", pool.node_id, flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    args = sys.argv[1:]
    anyio.run(
        serve,
        args[0],
        int(args[1]) if len(args) > 1 else 1,
        float(args[2]) if len(args) > 2 else 30.0,
        float(args[3]) if len(args) > 3 else 30.0,
    )
