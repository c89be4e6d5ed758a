"""Fair sharing with real pools and real processes, on SQLite and PostgreSQL: a project
submitted behind another's deep backlog is started among it, one pool or several racing
on one database, and every task still runs exactly once within every node's limit.

Start order is read from the store's events (a task's first `running` event; event ids
grow in the order the claims wrote them), never from timing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack

import anyio
import pytest

from taskpool import Client, Status, TaskEvent, TaskSpec
from taskpool._rules import FairClock, Slot, fair_tags, plan_claims
from tests.helpers import fast_pool

TERMINAL = {s for s in Status if s not in (Status.WAITING, Status.RUNNING)}


async def _submit(client: Client, counts: Sequence[tuple[str, int]]) -> dict[int, str]:
    """Each (project, n) in turn: n quick tasks of that project. Task id -> project."""
    projects: dict[int, str] = {}
    for project, n in counts:
        ids = await client.submit_many([TaskSpec.build(["true"], project=project)] * n)
        projects.update(dict.fromkeys(ids, project))
    return projects


async def _all_succeeded(client: Client, ids: Sequence[int]) -> None:
    with anyio.fail_after(300):  # a safety net: the pools run every task
        while True:
            tasks = [await client.get(i) for i in ids]
            if all(t.status is Status.SUCCEEDED for t in tasks):
                return
            assert not any(t.status in TERMINAL - {Status.SUCCEEDED} for t in tasks)
            await anyio.sleep(0.1)


async def _log(client: Client, ids: Sequence[int]) -> list[TaskEvent]:
    """Every event of the tasks, in the order they were written."""
    events = [e for i in ids for e in await client.events(i)]
    return sorted(events, key=lambda e: e.id)


def _start_order(log: Sequence[TaskEvent], projects: Mapping[int, str]) -> list[str]:
    """The project of each task started, in start order."""
    return [projects[e.task_id] for e in log if e.to_status is Status.RUNNING]


def _check_exclusive(log: Sequence[TaskEvent], max_parallel: int) -> None:
    """Each task started once, and no node ran more than `max_parallel` at any point
    of the log (a start is counted against the ends written before it: with
    PostgreSQL, an end written earlier but committed later was running for the claim,
    so this count is never above the one the claim saw)."""
    starts = Counter(e.task_id for e in log if e.to_status is Status.RUNNING)
    assert set(starts.values()) == {1}, "a task started twice"
    running: dict[str, set[int]] = {}
    for e in log:
        if e.to_status is Status.RUNNING:
            assert e.node_id is not None
            mine = running.setdefault(e.node_id, set())
            mine.add(e.task_id)
            assert len(mine) <= max_parallel, f"node {e.node_id} ran {sorted(mine)} at once"
        elif e.from_status is Status.RUNNING:
            for tasks in running.values():
                tasks.discard(e.task_id)


def _one_slot_order(counts: Sequence[tuple[str, int]], weights: Mapping[str, float]) -> list[str]:
    """What the rules give one slot at a time, each task ending before the next claim:
    `plan_claims` with nothing running, the clock moved on by each claim."""
    queue = [Slot(i, p) for i, p in enumerate(p for p, n in counts for _ in range(n))]
    tags: dict[str, tuple[float, float]] = {}
    order = []
    while queue:
        clock = FairClock.of(tags)
        (slot,) = plan_claims(
            queue,
            [],
            node_running=0,
            max_parallel=1,
            project_limits={},
            fair_share=weights,
            clock=clock,
        )
        tags.update(fair_tags(clock, [slot], weights))
        queue.remove(slot)
        order.append(slot.project)
    return order


@pytest.mark.timeout(600)
@pytest.mark.parametrize("weights", [{}, {"A": 3.0}], ids=["equal", "A3-B1"])
async def test_one_slot_goes_round_robin_by_weight(
    database: str, weights: dict[str, float]
) -> None:
    """A pool of one slot, 24 tasks of A then 8 of B queued before it starts: each claim
    finds nothing running, and the clock hands the slot out A, B, A, B... (equal
    weights) or A, B, A, A, A, B... (A weighs 3): exactly the rules' order."""
    counts = [("A", 24), ("B", 8)]
    async with Client(database) as client:
        projects = await _submit(client, counts)
        async with fast_pool(database, max_parallel=1, fair_share=weights or True):
            await _all_succeeded(client, list(projects))
        log = await _log(client, list(projects))
    order = _start_order(log, projects)
    assert order == _one_slot_order(counts, weights)
    if weights:
        assert "".join(order[:16]) == "ABAAABAAABAAABAA"
    else:
        assert "".join(order[:16]) == "AB" * 8
    _check_exclusive(log, 1)


@pytest.mark.timeout(600)
async def test_a_shallow_project_is_started_among_a_deep_backlog(database: str) -> None:
    """200 tasks of A queued before 20 of B, one pool of four slots: every claim gives
    a slot to whichever runs fewer, so B's tasks are spread among A's (all of B started
    before A's 40th) instead of after all 200; each task ran once, four at most."""
    async with Client(database) as client:
        projects = await _submit(client, [("A", 200), ("B", 20)])
        async with fast_pool(database, max_parallel=4, fair_share=True):
            await _all_succeeded(client, list(projects))
        log = await _log(client, list(projects))
    order = _start_order(log, projects)
    last_b = max(i for i, p in enumerate(order) if p == "B")
    assert order[: last_b + 1].count("A") < 40, "".join(order)
    _check_exclusive(log, 4)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("weights", [{}, {"A": 3.0}], ids=["equal", "A3-B1"])
async def test_several_pools_racing_share_fairly_and_exclusively(
    database: str, weights: dict[str, float]
) -> None:
    """Three pools on one PostgreSQL database (two on one SQLite file), three slots
    each, claiming at once from A's 200 tasks and B's after them: each task ran exactly
    once, no node above its three; B is spread among A's (equal weights: all of B
    started before A's 40th) or gets about a quarter while both have work (A weighs 3:
    between 6 and 14 of the first 40 starts, 10 by the weights)."""
    pools = 3 if database.startswith("postgresql://") else 2
    b_tasks = 20 if not weights else 60
    async with Client(database) as client:
        projects = await _submit(client, [("A", 200), ("B", b_tasks)])
        async with AsyncExitStack() as stack:
            for _ in range(pools):
                pool = fast_pool(database, max_parallel=3, fair_share=weights or True)
                await stack.enter_async_context(pool)
            await _all_succeeded(client, list(projects))
        log = await _log(client, list(projects))
    order = _start_order(log, projects)
    if weights:
        assert 6 <= order[:40].count("B") <= 14, "".join(order)
    else:
        last_b = max(i for i, p in enumerate(order) if p == "B")
        assert order[: last_b + 1].count("A") < 40, "".join(order)
    _check_exclusive(log, 3)


@pytest.mark.parametrize(
    ("fair_share", "recorded"),
    [(None, None), (True, {}), ({"a": 3, "b": 1}, {"a": 3.0, "b": 1.0})],
)
async def test_a_pool_registers_its_fair_share_for_operators(
    database: str, fair_share: bool | dict[str, float] | None, recorded: dict[str, float] | None
) -> None:
    """The node row says what the pool shares by, as `check_fair_share` reads it: off,
    every project 1 ({}), or the weights given."""
    async with fast_pool(database, fair_share=fair_share) as pool:
        assert pool.node is not None
        assert pool.node.fair_share == recorded
        async with Client(database) as client:
            [node] = await client.nodes()
        assert (node.id, node.fair_share) == (pool.node.id, recorded)
