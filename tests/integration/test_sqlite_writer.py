"""The SQLite group-commit writer on its own: batching, isolation of a failing operation,
cancellation on either side of the moment the thread takes an operation, durability.

Each test drives a `Writer` over a throwaway WAL database of its own, holding the
thread with a gate (a `threading.Event`) where it needs operations to queue up.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from taskpool import StoreError
from taskpool.stores._writer import Writer
from tests.helpers import eventually


class Clock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def writer(
    db: Path, *, fsync_interval_s: float = 3600, clock: Callable[[], float] | None = None
) -> AsyncIterator[Writer]:
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (name TEXT NOT NULL)")
    w = Writer(conn, Path(f"{db}-wal"), fsync_interval_s, monotonic=clock or Clock())
    try:
        yield w
    finally:
        await anyio.to_thread.run_sync(w.close)


def names(db: Path) -> list[str]:
    """What is committed, read through a connection of its own."""
    conn = sqlite3.connect(db)
    try:
        return [name for (name,) in conn.execute("SELECT name FROM t ORDER BY rowid")]
    finally:
        conn.close()


def insert(name: str) -> Callable[[sqlite3.Connection], str]:
    def op(conn: sqlite3.Connection) -> str:
        conn.execute("INSERT INTO t (name) VALUES (?)", (name,))
        return name

    return op


class Gate:
    """An operation that holds the writer thread until the test opens the gate."""

    def __init__(self) -> None:
        self.holding = threading.Event()
        self.open = threading.Event()

    def __call__(self, conn: sqlite3.Connection) -> None:
        self.holding.set()
        self.open.wait(60)  # a safety net: the test opens the gate

    async def held(self) -> bool:
        return self.holding.is_set()


async def capture(results: dict[str, object], name: str, call: Awaitable[object]) -> None:
    try:
        results[name] = await call
    except Exception as exc:
        results[name] = exc


async def test_operations_queued_behind_a_transaction_commit_together(tmp_path: Path) -> None:
    """Three writes that arrive while a transaction is in flight share the next one."""
    db = tmp_path / "w.db"
    begun: list[str] = []
    async with writer(db) as w:
        w.conn.set_trace_callback(lambda sql: begun.append(sql) if sql == "BEGIN IMMEDIATE" else 0)
        gate, results = Gate(), dict[str, object]()
        async with anyio.create_task_group() as tg:
            tg.start_soon(w.run, gate)
            await eventually(gate.held)
            for name in ("a", "b", "c"):
                tg.start_soon(capture, results, name, w.run(insert(name)))

            async def three_queued() -> bool:
                return w.queued == 3

            await eventually(three_queued)
            gate.open.set()
    assert results == {"a": "a", "b": "b", "c": "c"}
    assert sorted(names(db)) == ["a", "b", "c"]
    assert len(begun) == 2  # the gate's transaction, then one for all three


async def test_a_failing_operation_never_fails_its_neighbours(tmp_path: Path) -> None:
    """In one batch, an operation that raises is rolled back alone, its error (a driver
    error mapped to StoreError, or its own exception) goes to its caller only."""
    db = tmp_path / "w.db"

    def violates(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t (name) VALUES ('half-written')")
        conn.execute("INSERT INTO t (name) VALUES (NULL)")  # NOT NULL

    def raises(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t (name) VALUES ('also half-written')")
        raise LookupError("the operation's own error")

    async with writer(db) as w:
        gate, results = Gate(), dict[str, object]()
        async with anyio.create_task_group() as tg:
            tg.start_soon(w.run, gate)
            await eventually(gate.held)
            tg.start_soon(capture, results, "a", w.run(insert("a")))
            tg.start_soon(capture, results, "violates", w.run(violates))
            tg.start_soon(capture, results, "raises", w.run(raises))
            tg.start_soon(capture, results, "b", w.run(insert("b")))

            async def four_queued() -> bool:
                return w.queued == 4

            await eventually(four_queued)
            gate.open.set()
        assert isinstance(results["violates"], StoreError)
        assert "NOT NULL" in str(results["violates"])
        assert isinstance(results["raises"], LookupError)
        assert (results["a"], results["b"]) == ("a", "b")
        assert sorted(names(db)) == ["a", "b"]
        # An operation that fails alone in its batch is rolled back too.
        with pytest.raises(StoreError, match="NOT NULL"):
            await w.run(violates)
    assert sorted(names(db)) == ["a", "b"]


async def test_an_operation_cancelled_before_the_thread_took_it_never_runs(
    tmp_path: Path,
) -> None:
    """A caller cancelled while its operation waits in the queue withdraws it."""
    db = tmp_path / "w.db"
    async with writer(db) as w:
        gate = Gate()
        async with anyio.create_task_group() as tg:
            tg.start_soon(w.run, gate)
            await eventually(gate.held)
            with anyio.CancelScope() as scope:
                tg.start_soon(_cancel_when_queued, w, scope)
                await w.run(insert("withdrawn"))
            assert scope.cancelled_caught
            assert w.queued == 0
            gate.open.set()
        await w.run(insert("later"))  # the writer goes on
    assert names(db) == ["later"]


async def _cancel_when_queued(w: Writer, scope: anyio.CancelScope) -> None:
    async def queued() -> bool:
        return w.queued == 1

    await eventually(queued)
    scope.cancel()


async def test_an_operation_cancelled_after_the_thread_took_it_is_awaited_to_its_end(
    tmp_path: Path,
) -> None:
    """A caller cancelled while its operation runs waits, shielded, until it committed:
    nobody is told a write failed that is in the database."""
    db = tmp_path / "w.db"
    order: list[str] = []
    started, gate = threading.Event(), threading.Event()

    def slow(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t (name) VALUES ('committed')")
        started.set()
        gate.wait(60)  # a safety net: the test opens the gate

    async def caller(scope: anyio.CancelScope) -> None:
        with scope:
            await w.run(slow)
        order.append("caller returned")

    async with writer(db) as w:
        scope = anyio.CancelScope()
        async with anyio.create_task_group() as tg:
            tg.start_soon(caller, scope)

            async def running() -> bool:
                return started.is_set()

            await eventually(running)
            scope.cancel()
            await anyio.wait_all_tasks_blocked()  # the caller had its chance to return
            order.append("gate opened")
            gate.set()
        assert scope.cancelled_caught
    assert order == ["gate opened", "caller returned"]
    assert names(db) == ["committed"]


async def test_a_durable_operation_is_fsynced_before_its_caller_returns(tmp_path: Path) -> None:
    """A batch holding a durable operation commits with synchronous=FULL; a batch of
    others within the fsync interval does not."""
    async with writer(tmp_path / "w.db", fsync_interval_s=3600) as w:
        await w.run(insert("promised"), durable=True)
        assert w.full
        await w.run(insert("pool's own"))
        assert not w.full
        assert w.unsynced


async def test_commits_are_fsynced_within_the_interval_when_the_writer_goes_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-durable commit is made durable once fsync_interval_s has passed on the
    writer's clock, though nothing else comes: the writer fsyncs the WAL itself."""
    db, clock = tmp_path / "w.db", Clock()
    wal = f"{db}-wal"
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        real_fsync(fd)
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))

    async with writer(db, fsync_interval_s=0.2, clock=clock) as w:
        await w.run(insert("promised"), durable=True)
        monkeypatch.setattr(os, "fsync", spy)
        await w.run(insert("pool's own"))
        # No time has passed on the writer's clock since the last fsync: not synced.
        assert not w.full
        assert w.unsynced
        assert synced == []

        clock.now += 0.2  # the interval is up; nothing else is queued

        async def fsynced() -> bool:
            return wal in synced and not w.unsynced

        await eventually(fsynced)


async def test_a_closed_writer_refuses_operations(tmp_path: Path) -> None:
    """After close, an operation is refused with a clear error, not queued forever."""
    async with writer(tmp_path / "w.db") as w:
        pass
    with pytest.raises(StoreError, match="closed"):
        await w.run(insert("late"))
