"""The client API: the same answers from a Client and a TaskPool, who owns a store,
submit_many's one transaction, waiters woken by events rather than by polling."""

from __future__ import annotations

import contextlib
import itertools
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg
import pytest

from taskpool import (
    CancelMode,
    Client,
    InvalidTask,
    Limits,
    NodeInfo,
    Status,
    Store,
    StoreError,
    TaskPool,
    TaskSpec,
    _client,
)
from taskpool.testing import MemoryStore
from tests.helpers import SAFETY_TIMEOUT_S, fast_pool, open_store, running


def _no_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiters back off to an hour at once: only a change notification can wake them."""

    def hour(first_s: float, max_s: float) -> Iterator[float]:
        return itertools.repeat(3600.0)

    monkeypatch.setattr(_client, "poll_delays", hour)


async def _closed(store: Store) -> bool:
    try:
        await store.get(1)
    except StoreError as exc:
        return "closed" in str(exc)
    except Exception:
        return False
    return False


async def test_pool_and_client_give_the_same_answers(database: str) -> None:
    """Every read of the client API answers the same through a pool and through a client
    of its own on the same database, and what a client submits the pool runs."""
    async with fast_pool(database) as pool, Client(database) as client:
        ok = await client.submit(["sh", "-c", "echo out; echo err >&2"])
        bad = await pool.submit(["sh", "-c", "echo no; exit 3"])
        many = await client.submit_many([TaskSpec.build(["echo", str(i)]) for i in range(3)])
        for task in [ok, bad, *many]:
            assert await pool.wait(task) == await client.wait(task)
            assert await pool.get(task) == await client.get(task)
            assert await pool.events(task) == await client.events(task)
            assert await pool.output(task) == await client.output(task)
            assert [t async for t in pool.follow(task)] == [t async for t in client.follow(task)]
        assert (await client.get(ok)).status is Status.SUCCEEDED
        assert await client.output(ok) == "out\nerr\n"
        assert (await client.get(bad)).status is Status.FAILED
        again = await client.retry(bad)
        assert (await pool.wait(again)).spec == (await client.get(bad)).spec
        assert await pool.list_tasks() == await client.list_tasks()
        assert await pool.nodes() == await client.nodes()
        from_pool, from_client = await pool.stale(), await client.stale()
        assert (from_pool.expired_leases, from_pool.silent_nodes) == (
            from_client.expired_leases,
            from_client.silent_nodes,
        )


async def test_cancel_through_the_client_stores_the_mode(database: str) -> None:
    """A cancel asked through a client is stored as its CancelMode for the running
    task's owner: forced escalates a graceful request and is never softened by one."""
    async with Client(database) as client:
        store = client.store
        now = time.time()
        await store.register_node(NodeInfo("node", "host", os.getpid(), now, now, now, None, 1))
        task = await client.submit(["sleep", "600"])
        [claim] = await store.claim("node", Limits(max_parallel=1), lease_ttl_s=60)
        assert claim.task.id == task
        assert (await client.cancel(task)).cancel_requested is CancelMode.GRACEFUL
        assert (await client.cancel(task, "force")).cancel_requested is CancelMode.FORCE
        assert (await client.cancel(task)).cancel_requested is CancelMode.FORCE
        renewal = await store.renew_leases("node", lease_ttl_s=60)
        assert renewal.cancel_requests == {task: CancelMode.FORCE}
        assert (await client.get(task)).status is Status.RUNNING  # its owner stops it
        with pytest.raises(ValueError, match="cancel mode must be one of 'graceful', 'force'"):
            await client.cancel(task, "gently")


async def test_a_forced_cancel_reaches_the_runner(database: str) -> None:
    """pool.cancel(id, CancelMode.FORCE) kills a task that ignores SIGTERM at once,
    although the grace period it would otherwise get is ten minutes."""
    async with fast_pool(database, kill_grace_s=600) as pool:
        task = await pool.submit(["sh", "-c", "trap '' TERM; sleep 600 & wait; sleep 600"])
        await running(pool, task)
        info = await pool.cancel(task, CancelMode.FORCE)
        assert info.cancel_requested is CancelMode.FORCE
        done = await pool.wait(task)
        assert done.status is Status.CANCELLED
        assert done.reason == "cancelled by request; process group sent SIGKILL"


async def test_retry_refuses_a_task_that_has_not_ended(database: str) -> None:
    """Only a finished task is retried; a waiting one is refused with InvalidTask."""
    async with Client(database) as client:
        task = await client.submit(["true"])
        with pytest.raises(InvalidTask, match=f"task {task} is waiting"):
            await client.retry(task)
        assert [t.id for t in await client.list_tasks()] == [task]


# -- who owns a store -----------------------------------------------------------------


async def test_a_pool_closes_the_store_it_opened(database: str) -> None:
    """TaskPool(path or URL) owns its store: open while the pool runs, closed after."""
    pool = fast_pool(database)
    assert pool.owns_store
    async with pool:
        assert not await _closed(pool.store)
    assert await _closed(pool.store)


async def test_a_pool_never_closes_a_store_it_was_given(database: str) -> None:
    """TaskPool(store) leaves the store open, for its owner, who may use it after."""
    async with open_store(database) as store:
        pool = fast_pool(store)
        assert not pool.owns_store
        async with pool:
            task = await pool.submit(["true"])
            await pool.wait(task)
        assert (await store.get(task)).status is Status.SUCCEEDED  # still open
    assert await _closed(store)  # its owner closed it


async def test_a_pool_opens_a_store_it_was_given_unopened_and_leaves_it_open() -> None:
    """A Store object not yet opened is opened by the pool, and still not closed by it."""
    store = MemoryStore()
    async with TaskPool(store, poll_interval_s=0.05) as pool:
        task = await pool.submit(["true"])
        await pool.wait(task)
    assert (await store.get(task)).status is Status.SUCCEEDED
    await store.close()


async def test_a_client_closes_the_store_it_opened_and_never_one_it_was_given(
    database: str,
) -> None:
    """Client(path or URL) closes its store on leaving; Client(store) never does."""
    owned = Client(database)
    async with owned:
        task = await owned.submit(["true"])
    assert await _closed(owned.store)
    async with open_store(database) as store:
        async with Client(store) as given:
            assert not given.owns_store
            assert (await given.get(task)).status is Status.WAITING
        assert (await store.get(task)).status is Status.WAITING  # still open


async def test_a_client_refuses_to_create_a_database_when_told_not_to(tmp_path: Path) -> None:
    """Client(path, create=False) on a missing file is a StoreError, and no file is made."""
    path = tmp_path / "missing.db"
    with pytest.raises(StoreError):
        async with Client(path, create=False):
            pass
    assert not path.exists()


# -- submit_many ------------------------------------------------------------------------


@pytest.fixture
def database_kind(database: str) -> str:
    return "postgres" if database.startswith("postgresql://") else "sqlite"


async def test_submit_many_stores_every_task_in_order(database: str) -> None:
    """submit_many returns ascending ids in the order given, each task stored as its
    spec with its 'submitted' event, and an empty batch stores nothing."""
    specs = [
        TaskSpec.build(["echo", str(i)], project=f"p{i % 2}", locks=[f"l{i}"], priority=i % 3)
        for i in range(1200)  # more than one SQLite statement's worth
    ]
    async with Client(database) as client:
        assert await client.submit_many([]) == []
        ids = await client.submit_many(specs)
        assert ids == sorted(ids)
        assert len(set(ids)) == len(specs)
        stored = await client.list_tasks(limit=10_000)
        assert [t.id for t in stored] == ids[::-1]  # newest first
        assert [t.spec for t in stored[::-1]] == specs
        for task_id in (ids[0], ids[-1]):
            assert [e.reason for e in await client.events(task_id)] == ["submitted"]


async def test_submit_many_default_and_memory_store_keep_the_order() -> None:
    """The Store default (check all, then submit each) keeps the order too."""
    async with MemoryStore() as store:
        ids = await store.submit_many([TaskSpec.build(["echo", str(i)]) for i in range(5)])
        assert [(await store.get(i)).spec.argv for i in ids] == [("echo", str(i)) for i in range(5)]


async def test_submit_many_with_one_invalid_spec_stores_nothing(any_store: Store) -> None:
    """One spec made by hand with bad input fails the whole batch with InvalidTask, and
    nothing at all is stored."""
    good = [TaskSpec.build(["echo", str(i)]) for i in range(5)]
    bad = TaskSpec(argv=("echo", "nul\x00byte"))
    with pytest.raises(InvalidTask, match="NUL"):
        await any_store.submit_many([*good[:3], bad, *good[3:]])
    assert await any_store.list_tasks() == []


async def test_submit_many_is_one_transaction(database: str, database_kind: str) -> None:
    """A failure in the database half-way through the batch (a trigger refusing the
    fourth row) leaves nothing of the batch stored: it was one transaction."""
    async with open_store(database) as store:
        if database_kind == "sqlite":
            with contextlib.closing(sqlite3.connect(database)) as db, db:
                db.execute(
                    "CREATE TRIGGER refuse BEFORE INSERT ON tasks WHEN NEW.project = 'refused'"
                    " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
                )
        else:
            conn = await asyncpg.connect(database)
            try:
                await conn.execute(
                    "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$"
                    " BEGIN IF NEW.project = 'refused' THEN RAISE EXCEPTION 'refused by"
                    " the test'; END IF; RETURN NEW; END $$;"
                    " CREATE TRIGGER refuse BEFORE INSERT ON taskpool_tasks"
                    " FOR EACH ROW EXECUTE FUNCTION refuse()"
                )
            finally:
                await conn.close()
        specs = [TaskSpec.build(["echo", str(i)]) for i in range(6)]
        specs[3] = TaskSpec.build(["echo", "3"], project="refused")
        with pytest.raises(StoreError, match="refused by the test"):
            await store.submit_many(specs)
        assert await store.list_tasks() == []
        assert await store.submit_many(specs[:3]) != []  # the store is fine afterwards


# -- waiters are woken, not polling ----------------------------------------------------


async def test_a_pools_waiters_are_woken_by_its_own_events(
    database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With polling backed off to an hour, pool.wait and pool.follow still return as soon
    as the pool's runner writes output and ends the task: they wait on its events."""
    _no_polling(monkeypatch)
    go = tmp_path / "go"
    script = f"echo one; while [ ! -e {go} ]; do sleep 0.01; done; echo two"
    async with fast_pool(database) as pool:
        task = await pool.submit(["sh", "-c", script])
        seen = []
        with anyio.fail_after(SAFETY_TIMEOUT_S):
            async for text in pool.follow(task):
                seen.append(text)
                go.touch()
            info = await pool.wait(task)
        assert "".join(seen) == "one\ntwo\n"
        assert info.status is Status.SUCCEEDED
