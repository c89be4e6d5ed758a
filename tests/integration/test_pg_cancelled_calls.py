"""A PostgreSQL store call cancelled by its caller finishes its transaction first.

Background loops of a pool (scheduler, cancel watcher, retention) and clients' waits
are cancelled at shutdown at any moment; a transaction cut off mid-way would leave a
commit in flight unseen and asyncpg resetting the connection."""

from __future__ import annotations

import asyncio
import random

import anyio

from taskpool import Status, TaskSpec
from taskpool.stores.postgres import PostgresStore
from tests.postgres import fresh_postgres_database


async def test_a_cancelled_call_completes_its_transaction_and_resets_nothing() -> None:
    rng = random.Random(20261126)
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(str(context["message"])))
    cut = 0
    try:
        async with fresh_postgres_database() as dsn, PostgresStore(dsn, max_size=2) as store:
            for _ in range(200):
                with anyio.move_on_after(rng.uniform(0, 0.003)) as scope:
                    await store.submit(TaskSpec.build(["true"]))
                cut += scope.cancel_called  # its deadline passed during the call
            tasks = await store.list_tasks(limit=1000)
    finally:
        loop.set_exception_handler(previous)
    assert reported == []
    # Every submit, cut short or not, committed whole: a task and its event.
    assert len(tasks) == 200
    assert all(t.status is Status.WAITING for t in tasks)
    assert cut > 0  # some calls were cancelled mid-way, or this proved nothing
