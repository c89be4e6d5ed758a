"""PostgreSQL: an end that frees a key is handed off, so work blocked on that key
spreads over the nodes with free slots instead of staying on the node that ended
the last task (`taskpool._runners.frees_for_others`)."""

from __future__ import annotations

import itertools
from collections import Counter
from contextlib import AsyncExitStack

import anyio

from taskpool import Status, TaskPool, TaskSpec
from tests.helpers import SAFETY_TIMEOUT_S, eventually, fast_pool
from tests.postgres import fresh_postgres_database

NODES = 4
TASKS = 40


async def test_a_templates_queued_tasks_spread_over_idle_nodes_one_at_a_time() -> None:
    """Four idle nodes that claim only when woken (they poll every 600 s), 40 tasks of
    one non-parallel template queued up front: the template still runs one task at a
    time, every task succeeds, and the tasks are spread over the nodes (before the
    hand-off, the node that ended a task claimed the next at once and ran all 40)."""
    async with fresh_postgres_database() as dsn, AsyncExitStack() as stack:
        pools: list[TaskPool] = [
            await stack.enter_async_context(
                fast_pool(dsn, max_parallel=2, poll_interval_s=600, heartbeat_interval_s=0.2)
            )
            for _ in range(NODES)
        ]

        async def all_see_peers() -> bool:
            return all(pool._has_peers for pool in pools)

        await eventually(all_see_peers)
        ids = await pools[0].submit_many(
            [TaskSpec.build(["true"], template="deploy") for _ in range(TASKS)]
        )
        with anyio.fail_after(SAFETY_TIMEOUT_S * 2):
            ended = [await pools[0].wait(task_id) for task_id in ids]
        spans = []
        for task_id in ids:
            events = await pools[0].events(task_id)
            started = next(e.at for e in events if e.to_status is Status.RUNNING)
            spans.append((started, events[-1].at))
    assert [info.status for info in ended] == [Status.SUCCEEDED] * TASKS
    spans.sort()
    for (_, end), (next_start, _) in itertools.pairwise(spans):
        assert end <= next_start, "two runs of one template overlapped"
    per_node = Counter(info.owner_node for info in ended)
    print(f"tasks per node: {sorted(per_node.values(), reverse=True)}")
    assert len(per_node) >= NODES - 1, per_node
    assert max(per_node.values()) <= TASKS // 2, per_node
