"""Several nodes on one store: exclusivity with real processes, wake-ups across nodes,
and a sibling pool that dies being settled by the survivors."""

from __future__ import annotations

import itertools
import signal
from pathlib import Path

import psutil
import pytest

from taskpool import PostgresStore, Status, TaskSpec
from tests.acceptance.test_restart import pool_process
from tests.helpers import (
    eventually,
    fast_pool,
    has_exited,
    killed_leftover_matches,
    no_attempt_processes,
    open_store,
)
from tests.postgres import fresh_postgres_database

#: Every case runs in both containment modes: a cgroup per attempt, and process groups.
pytestmark = pytest.mark.usefixtures("both_containments", "without_guard")


async def test_two_nodes_never_overlap_on_a_template(database: str) -> None:
    """Two pools on one store run a non-parallel template's tasks strictly one at a time."""
    script = "echo start; sleep 0.1; echo end"
    async with fast_pool(database) as one, fast_pool(database) as two:
        ids = [await one.submit(["sh", "-c", script], template="deploy") for _ in range(6)]
        ids += [await two.submit(["sh", "-c", script], template="other") for _ in range(2)]
        for task_id in ids:
            assert (await one.wait(task_id)).status is Status.SUCCEEDED
        spans: list[tuple[float, float]] = []
        for task_id in ids[:6]:
            events = await one.events(task_id)
            claimed = next(e for e in events if e.to_status is Status.RUNNING)
            spans.append((claimed.at, events[-1].at))
    spans.sort()
    for (_, end), (next_start, _) in itertools.pairwise(spans):
        assert end <= next_start, "two runs of one template overlapped"


async def test_a_submit_elsewhere_wakes_a_postgres_node_at_once() -> None:
    """Work submitted by another process reaches a PostgreSQL node through LISTEN/NOTIFY,
    not its polling: the node polls only every 600 s here."""
    async with fresh_postgres_database() as dsn, fast_pool(dsn, poll_interval_s=600) as worker:
        async with PostgresStore(dsn, max_size=1) as operator:
            task = await operator.submit(TaskSpec.build(["echo", "hello"]))
        done = await worker.wait(task, timeout_s=60)  # a safety net far below 600 s
        assert done.status is Status.SUCCEEDED
        assert done.owner_node == worker.node_id
        assert await worker.output(task) == "hello\n"


async def test_a_sibling_pool_that_dies_is_settled_by_the_survivor(
    database: str, tmp_path: Path
) -> None:
    """A pool process on this host is SIGKILLed; the pool still running beside it kills
    its leftover process and re-runs its task, without waiting for the lease."""
    marker = tmp_path / "ran-once"
    script = f"if [ -e {marker} ]; then echo again; exit 0; fi; touch {marker}; sleep 600"
    async with open_store(database) as store:
        task = await store.submit(TaskSpec.build(["sh", "-c", script], max_attempts=2))
    with pool_process(database, "1", "600") as (proc, dead_node):
        async with open_store(database) as store:

            async def running_pid() -> int | None:
                info = await store.get(task)
                return info.pid if info.status is Status.RUNNING else None

            pid = await eventually(running_pid)
        leftover = psutil.Process(pid)
        async with fast_pool(database, reaper_interval_s=0.1, lease_ttl_s=600) as survivor:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            done = await survivor.wait(task)
            assert done.status is Status.SUCCEEDED
            assert await survivor.output(task) == "again\n"
            settled = next(
                e for e in await survivor.events(task) if e.from_status is Status.RUNNING
            )
            assert settled.reason.startswith(
                f"owner node {dead_node} (pid {proc.pid}) died; found by node "
                f"{survivor.node_id}; killed leftover "
            )
            assert settled.reason.endswith("; re-queued (attempt 2 of 2)")
            assert survivor.containment is not None
            assert killed_leftover_matches(
                settled.reason,
                mode=survivor.containment.mode,
                task_id=task,
                fence=1,
                leader=pid,
                processes=2,
            )
    assert has_exited(leftover)
    assert await no_attempt_processes()
