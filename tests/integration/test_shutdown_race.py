"""Leaving `async with TaskPool` while a claim is in flight loses nothing: whatever the
claim committed is run or handed back before the pool's context ends."""

from __future__ import annotations

import asyncio
import random

import anyio
import pytest

from taskpool import Limits, Status
from tests.helpers import eventually, fast_pool, open_store

ROUNDS = {"sqlite": 1000, "postgres": 300}


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_leaving_the_pool_mid_claim_loses_no_task(database: str) -> None:
    """Many rounds of enter, submit, leave a random 0-10 ms later: every task ends
    succeeded or is back to waiting with its attempt refunded; none is lost, none is
    left running under a stopped node."""
    backend = "postgres" if database.startswith("postgresql://") else "sqlite"
    rng = random.Random(20261126)
    # A store call cancelled mid-transaction shows up here (asyncpg reports "Resetting
    # connection with an active transaction" to the loop's exception handler).
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(str(context["message"])))
    try:
        for _ in range(ROUNDS[backend]):
            async with fast_pool(database, max_parallel=2, poll_interval_s=0.001) as pool:
                await pool.submit(["true"])
                await anyio.sleep(rng.uniform(0, 0.010))
    finally:
        loop.set_exception_handler(previous)
    assert reported == []

    async with open_store(database) as store:
        tasks = await store.list_tasks(limit=10_000)
        nodes = {node.id: node for node in await store.list_nodes()}
        events = [e for task in tasks for e in await store.events(task.id)]
    assert len(tasks) == ROUNDS[backend]
    assert all(node.stopped_at is not None for node in nodes.values())
    by_status = {
        status: [t for t in tasks if t.status is status] for status in {t.status for t in tasks}
    }
    assert set(by_status) <= {Status.SUCCEEDED, Status.WAITING}, {
        s: [(t.id, t.reason) for t in ts[:3]] for s, ts in by_status.items()
    }
    for task in by_status.get(Status.WAITING, []):
        assert task.attempts_used == 0, (task.id, task.reason)
        assert task.owner_node is None
    assert not [e for e in events if e.to_status is Status.LOST]
    # The race really happened: some rounds left with a claim or a run in progress.
    handed_back = [
        e for e in events if e.from_status is Status.RUNNING and e.to_status is Status.WAITING
    ]
    assert handed_back, "no round left the pool with a task in hand: the race was not run"


async def test_a_lease_held_but_never_started_is_handed_back(database: str) -> None:
    """A claim committed for a node whose result never reached its pool (a timed-out
    call, a lost reply) is not renewed forever: the heartbeat hands it back, refunded."""
    async with fast_pool(database, project_limits={"held": 0}, lease_ttl_s=3.0) as pool:
        task_id = await pool.submit(["true"], project="held")  # this pool never claims it
        async with open_store(database) as store:
            (claim,) = await store.claim(pool.node_id, Limits(max_parallel=1), lease_ttl_s=3.0)
        assert claim.task.id == task_id

        async def handed_back() -> bool:
            return (await pool.get(task_id)).status is Status.WAITING

        await eventually(handed_back)
        info = await pool.get(task_id)
    assert info.attempts_used == 0
    assert info.reason == (
        f"handed back without using an attempt: node {pool.node_id} held the lease"
        " but never started the task"
    )
