"""PostgreSQL: a transaction the server aborts as a deadlock victim rolled back whole,
so the store runs it again instead of failing its caller."""

from __future__ import annotations

from collections import Counter

import anyio
import asyncpg

from taskpool import PostgresStore, TaskSpec
from tests.helpers import SAFETY_TIMEOUT_S
from tests.postgres import fresh_postgres_database


async def test_both_sides_of_a_real_deadlock_commit() -> None:
    """Two transactions take two task rows in opposite orders, each waiting until the
    other holds its first row: the server aborts one (40P01), the store runs that one
    again, and both commit their writes; the victim ran twice, the other once."""
    async with fresh_postgres_database() as dsn, PostgresStore(dsn, max_size=4) as store:
        first = await store.submit(TaskSpec.build(["true"]))
        second = await store.submit(TaskSpec.build(["true"]))
        runs: Counter[str] = Counter()
        holding = {"a": anyio.Event(), "b": anyio.Event()}

        def locker(name: str, mine: int, theirs: int, other: str):  # type: ignore[no-untyped-def]
            async def fn(conn: asyncpg.Connection) -> None:
                runs[name] += 1
                await conn.execute(
                    "UPDATE taskpool_tasks SET priority = priority + 1 WHERE id = $1", mine
                )
                holding[name].set()
                await holding[other].wait()  # both hold one row: now each asks the other's
                await conn.execute(
                    "UPDATE taskpool_tasks SET priority = priority + 1 WHERE id = $1", theirs
                )

            return fn

        with anyio.fail_after(SAFETY_TIMEOUT_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(store._tx, locker("a", first, second, "b"))
                tg.start_soon(store._tx, locker("b", second, first, "a"))
        assert sorted(runs.values()) == [1, 2]
        for task_id in (first, second):
            assert (await store.get(task_id)).spec.priority == 2
