"""Cancels from another process reach the owning pool at once, not at its next heartbeat.

The pools here renew their leases every 300 s (lease 600 s), far beyond the tests'
safety timeout: a cancel that lands could only have come by the cancel watcher
(`taskpool._cancels`, woken by the store's push). The heartbeat stays the fallback
when no push comes.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import anyio
import asyncpg
import pytest

from taskpool import CancelMode, Client, Status, Store, TaskPool
from taskpool._leases import Key
from taskpool.stores import open_store
from taskpool.stores.postgres import PostgresStore
from tests.helpers import SAFETY_TIMEOUT_S, eventually, no_attempt_processes, running
from tests.postgres import fresh_postgres_database


#: Heartbeats that never come within a test: only the cancel watcher can deliver.
def no_heartbeat_pool(database: str, *, max_parallel: int = 4) -> TaskPool:
    return TaskPool(
        database, max_parallel=max_parallel, lease_ttl_s=600.0, heartbeat_interval_s=300.0
    )


SIGNAL_SENT = {False: "SIGTERM", True: "SIGKILL"}


def cli_cancel(database: str, task_id: int, *, force: bool) -> None:
    """`taskpool cancel` in a process of its own, as an operator would type it."""
    command = [sys.executable, "-m", "taskpool", "--db", database, "cancel", str(task_id)]
    done = subprocess.run(
        [*command, *(["--force"] if force else [])],
        capture_output=True,
        text=True,
        timeout=SAFETY_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("force", [False, True], ids=["graceful", "force"])
async def test_a_cancel_from_the_cli_stops_a_running_task_without_a_heartbeat(
    database: str, force: bool
) -> None:
    """`taskpool cancel [--force]` from another process stops the task on a pool whose
    heartbeat never comes during the test: the pool ends it cancelled, with the signal
    the mode asks for, and leaves no process."""
    async with no_heartbeat_pool(database) as pool:
        task = await pool.submit(["sleep", "600"])
        await running(pool, task)
        await anyio.to_thread.run_sync(lambda: cli_cancel(database, task, force=force))
        with anyio.fail_after(SAFETY_TIMEOUT_S):
            ended = await pool.wait(task)
        assert ended.status is Status.CANCELLED
        assert ended.reason == f"cancelled by request; process group sent {SIGNAL_SENT[force]}"
        assert ended.cancel_requested is (CancelMode.FORCE if force else CancelMode.GRACEFUL)
    assert await no_attempt_processes()


def deafened(store: Store) -> Store:
    """The store, its cancel watch never reporting: the push is down for the whole test."""

    async def never(node_id: str, on_cancel: Callable[[], None]) -> None:
        await Store.watch_for_cancels(store, node_id, on_cancel)  # the default: never calls

    store.watch_for_cancels = never  # type: ignore[method-assign]
    return store


async def test_a_cancel_while_the_watch_is_down_comes_with_the_heartbeat(database: str) -> None:
    """With the store's push down, a cancel from another handle still stops the task:
    the heartbeat's renewal brings it."""
    store = deafened(open_store(database))
    async with store, TaskPool(store, lease_ttl_s=6.0, heartbeat_interval_s=0.5) as pool:
        task = await pool.submit(["sleep", "600"])
        await running(pool, task)
        async with Client(database) as operator:
            await operator.cancel(task)
            with anyio.fail_after(SAFETY_TIMEOUT_S):
                ended = await operator.wait(task)
        assert ended.status is Status.CANCELLED
        assert ended.reason == "cancelled by request; process group sent SIGTERM"
    assert await no_attempt_processes()


async def test_a_cancel_after_the_listen_connection_dropped_still_lands() -> None:
    """PostgreSQL: the LISTEN connection of the pool's cancel watch is terminated by
    the server; the watch connects again by itself and a later cancel still lands
    before any heartbeat."""
    async with (
        fresh_postgres_database() as postgres_dsn,
        no_heartbeat_pool(postgres_dsn) as pool,
    ):
        task = await pool.submit(["sleep", "600"])
        await running(pool, task)
        assert isinstance(pool.store, PostgresStore)
        name = pool.store.listener_name  # this pool's own connection, no other
        admin = await asyncpg.connect(postgres_dsn)
        try:

            async def listener_pid() -> int | None:
                return await admin.fetchval(  # type: ignore[no-any-return]
                    "SELECT pid FROM pg_stat_activity WHERE application_name = $1", name
                )

            first = await eventually(listener_pid)
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", first)

            async def reconnected() -> int | None:
                pid = await listener_pid()
                return pid if pid is not None and pid != first else None

            await eventually(reconnected)
        finally:
            await admin.close()
        async with Client(postgres_dsn) as operator:
            await operator.cancel(task, force=True)
            with anyio.fail_after(SAFETY_TIMEOUT_S):
                ended = await operator.wait(task)
        assert ended.status is Status.CANCELLED
        assert ended.reason == "cancelled by request; process group sent SIGKILL"
    assert await no_attempt_processes()


async def test_a_cancel_of_another_nodes_task_leaves_this_node_alone(database: str) -> None:
    """Two pools on one store each run a task; a cancel of one's task stops it there,
    and the other node's task runs on, untouched (same attempt, no stop asked)."""
    async with (
        no_heartbeat_pool(database, max_parallel=1) as first,
        no_heartbeat_pool(database, max_parallel=1) as second,
    ):
        tasks = [await first.submit(["sleep", "600"]) for _ in range(2)]
        infos = [await running(first, task) for task in tasks]
        assert {info.owner_node for info in infos} == {first.node_id, second.node_id}
        doomed, spared = infos
        async with Client(database) as operator:
            await operator.cancel(doomed.id, force=True)
            with anyio.fail_after(SAFETY_TIMEOUT_S):
                assert (await operator.wait(doomed.id)).status is Status.CANCELLED
            still = await operator.get(spared.id)
        assert (still.status, still.fence, still.pid) == (Status.RUNNING, spared.fence, spared.pid)
        assert still.cancel_requested is None
        spared_pool = first if spared.owner_node == first.node_id else second
        key: Key = (spared.id, spared.fence)
        assert spared_pool._runners[key].request is None
    assert await no_attempt_processes()
