"""PostgreSQL's one-statement writes keep the guarantees of the locked transactions.

`record_spawn`, `append_output` and `finish` first try one statement that writes only
while the fence owns the task (and, for `finish`, only if the row is as the decision
read it); when it writes nothing, the locked transaction decides. A node's concurrent
claims queue in the store, and `submit_many` is one binary COPY: each is checked here
on a real server.
"""

from __future__ import annotations

import os
import time

import anyio
import asyncpg

from taskpool import Limits, NodeInfo, Status, TaskSpec
from taskpool._decisions import plan_finish
from taskpool._errors import LeaseLost
from taskpool._models import Outcome, OutcomeKind
from taskpool.stores import _postgres_ops as ops
from taskpool.stores._common import task_state
from taskpool.stores.postgres import PostgresStore
from tests.postgres import fresh_postgres_database

EXITED_0 = Outcome(OutcomeKind.EXITED, "exited with code 0", 0)


def _node(node_id: str, capacity: int) -> NodeInfo:
    now = time.time()
    return NodeInfo(node_id, "host", os.getpid(), now, now, now, None, capacity)


async def test_a_stale_fence_is_refused_and_writes_nothing() -> None:
    async with fresh_postgres_database() as dsn:
        store = PostgresStore(dsn)
        await store.open()
        try:
            await store.register_node(_node("n1", 1))
            await store.register_node(_node("n2", 1))
            [task_id] = await store.submit_many([TaskSpec.build(["true"], max_attempts=2)])
            [first] = await store.claim("n1", Limits(1), 30.0)
            await store.stop_node("n1", "gone")  # hands the task back: fence 1 is stale
            [second] = await store.claim("n2", Limits(1), 30.0)
            stale, fresh = first.task.fence, second.task.fence
            assert fresh > stale
            for write in (
                store.record_spawn(task_id, stale, 4242, 1.0),
                store.append_output(task_id, stale, ["late"]),
                store.finish(task_id, stale, EXITED_0),
            ):
                try:
                    await write
                except LeaseLost:
                    pass
                else:
                    raise AssertionError("a stale fence was not refused")
            now = await store.get(task_id)
            assert (now.status, now.fence, now.pid) == (Status.RUNNING, fresh, None)
            assert await store.read_output(task_id) == []
            # The owner's writes go through, numbered in order.
            await store.record_spawn(task_id, fresh, 4242, 1.0)
            await store.append_output(task_id, fresh, ["a", "b"])
            await store.append_output(task_id, fresh, ["c"])
            chunks = await store.read_output(task_id)
            assert [(c.fence, c.seq, c.text) for c in chunks] == [
                (fresh, 1, "a"),
                (fresh, 2, "b"),
                (fresh, 3, "c"),
            ]
            assert (await store.get(task_id)).pid == 4242
            ended = await store.finish(task_id, fresh, EXITED_0)
            assert ended.status is Status.SUCCEEDED
        finally:
            await store.close()


async def test_a_finish_decided_on_a_row_that_changed_writes_nothing() -> None:
    async with fresh_postgres_database() as dsn:
        store = PostgresStore(dsn)
        await store.open()
        conn = await asyncpg.connect(dsn)
        try:
            await store.register_node(_node("n1", 1))
            [task_id] = await store.submit_many([TaskSpec.build(["true"])])
            [claim] = await store.claim("n1", Limits(1), 30.0)
            row = await ops.task_row(conn, task_id)
            ending = plan_finish(task_state(row), claim.task.fence, EXITED_0, row["now"])
            await store.request_cancel(task_id)  # the row changes after the read
            assert await ops.end(conn, ending, unless_changed_from=row) is None
            assert (await store.get(task_id)).status is Status.RUNNING
            attempts = await conn.fetchval(
                "SELECT count(*) FROM taskpool_attempts WHERE task_id = $1 AND finished_at IS NULL",
                task_id,
            )
            assert attempts == 1
            # The store's finish then decides under the lock, with the request seen.
            ended = await store.finish(task_id, claim.task.fence, EXITED_0)
            assert ended.status is not Status.RUNNING
            assert ended.cancel_requested is not None
        finally:
            await conn.close()
            await store.close()


async def test_one_nodes_concurrent_claims_take_each_task_once_within_its_slots() -> None:
    async with fresh_postgres_database() as dsn:
        store = PostgresStore(dsn, max_size=8)
        await store.open()
        try:
            await store.register_node(_node("n1", 4))
            await store.submit_many([TaskSpec.build(["true"]) for _ in range(10)])
            got: list[int] = []

            async def claim() -> None:
                got.extend(c.task.id for c in await store.claim("n1", Limits(4), 30.0))

            async with anyio.create_task_group() as tg:
                for _ in range(6):
                    tg.start_soon(claim)
            assert len(got) == len(set(got)) == 4
            running = await store.list_tasks(statuses=[Status.RUNNING])
            assert sorted(t.id for t in running) == sorted(got)
        finally:
            await store.close()


async def test_submit_many_copies_every_field_ids_in_order_each_logged_once() -> None:
    specs = [
        TaskSpec.build(
            ["echo", str(i)],
            env={"K": str(i)} if i % 2 else None,
            project=f"p{i % 3}",
            template="t" if i % 4 == 0 else None,
            locks=["b", "a"] if i % 5 == 0 else [],
            priority=i % 3,
            timeout_s=9.5,
            max_attempts=3,
            memory_max=1 << 20,
        )
        for i in range(50)
    ]
    async with fresh_postgres_database() as dsn:
        store = PostgresStore(dsn)
        await store.open()
        try:
            ids = await store.submit_many(specs)
            assert ids == sorted(ids)
            assert len(set(ids)) == len(specs)
            tasks = await store.get_many(ids)
            for task_id, spec in zip(ids, specs, strict=True):
                task = tasks[task_id]
                assert task.status is Status.WAITING
                assert task.spec == spec
                [event] = await store.events(task_id)
                assert (event.to_status, event.reason) == (Status.WAITING, "submitted")
        finally:
            await store.close()
