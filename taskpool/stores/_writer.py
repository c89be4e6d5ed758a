"""Group commit for SQLite: one thread owns the write connection and runs, in one
transaction, every operation queued while the previous transaction was in flight.

Each operation runs inside its own savepoint, so one fsync serves many callers and
one failing operation never fails its neighbours. Every transaction is
`BEGIN IMMEDIATE`: it holds SQLite's write lock from its first statement, which
makes each operation atomic across every process sharing the file.

A caller cancelled before the thread took its operation withdraws it (it never
runs); once taken, the operation runs to its end and the caller awaits it
shielded, so nobody is told an operation failed that committed.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel
from anyio.lowlevel import EventLoopToken

from .._errors import StoreError, StoreUnavailable

T = TypeVar("T")
#: An operation: runs in the writer thread, inside the batch's transaction.
Op = Callable[[sqlite3.Connection], T]

_TRANSIENT = ("locked", "busy", "disk i/o", "unable to open", "readonly", "full")


def map_error(exc: sqlite3.Error) -> StoreError:
    """SQLite's error as taskpool's: `StoreUnavailable` where retrying may help."""
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and any(w in text.lower() for w in _TRANSIENT):
        return StoreUnavailable(f"SQLite: {text}")
    return StoreError(f"SQLite: {text}")


@dataclass(slots=True, eq=False)
class Pending(Generic[T]):
    """One write operation on its way through the writer thread."""

    fn: Op[T]
    token: EventLoopToken  # the caller's event loop, to wake it from the writer thread
    durable: bool  # fsync before the caller returns
    done: anyio.Event = field(default_factory=anyio.Event)
    value: Any = None
    error: BaseException | None = None

    def result(self) -> T:
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[no-any-return]


class Writer:
    """The thread that owns the write connection and group-commits what is queued.

    It takes every queued operation at once, runs them in one transaction and wakes
    their callers, then takes the next lot at once: no event-loop round trip stands
    between one commit and the next, which keeps the queue short under load.

    Durability is per batch, as PostgreSQL's `synchronous_commit` is per transaction:
    a batch holding a durable operation (a submit, a cancel) is fsynced before its
    callers return; other batches are fsynced at least every `fsync_interval_s`,
    by the next commit or, when the writer goes idle, by an fsync of the WAL.
    `monotonic` is the clock that interval is measured on.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        wal: Path,
        fsync_interval_s: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.conn = conn
        self._wal = wal
        self._fsync_interval_s = fsync_interval_s
        self._monotonic = monotonic
        self._last_sync = monotonic()
        self.unsynced = False  # commits made since the last fsync
        self.full = False  # the connection's current PRAGMA synchronous is FULL
        self._queue: list[Pending[Any]] = []
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="taskpool-sqlite-writer")
        self._thread.daemon = True  # never keeps the interpreter alive on its own
        self._thread.start()

    @property
    def queued(self) -> int:
        """Operations waiting for the thread to take them."""
        with self._cond:
            return len(self._queue)

    async def run(self, fn: Op[T], *, durable: bool = False) -> T:
        """Run `fn` in a write transaction, group-committed with concurrent callers.

        Cancelled before the writer took it, the operation never runs; cancelled
        after, it is awaited to its end (shielded) so no caller is told it failed
        when it committed."""
        op: Pending[T] = Pending(fn, anyio.lowlevel.current_token(), durable)
        self._submit(op)
        try:
            await op.done.wait()
        except BaseException:
            if not self._withdraw(op):
                with anyio.CancelScope(shield=True):
                    await op.done.wait()
            raise
        return op.result()

    def _submit(self, op: Pending[Any]) -> None:
        with self._cond:
            if self._closing:
                raise StoreError("the store is closed")
            self._queue.append(op)
            self._cond.notify()

    def _withdraw(self, op: Pending[Any]) -> bool:
        """Take back an operation the thread has not started; False if it has."""
        with self._cond:
            if op in self._queue:
                self._queue.remove(op)
                return True
            return False

    def close(
        self, release: Callable[[sqlite3.Connection], None] = sqlite3.Connection.close
    ) -> None:
        """Finish what is queued, sync, stop the thread, `release` the connection (by
        default: close it) (blocking)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
        release(self.conn)

    def _next_batch(self) -> tuple[list[Pending[Any]], bool]:
        """Wait for work, or for an overdue fsync; return the batch and whether to stop."""
        with self._cond:
            while not self._queue and not self._closing:
                if not self.unsynced:
                    self._cond.wait()
                    continue
                left = self._last_sync + self._fsync_interval_s - self._monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)  # then the clock says again whether a sync is due
            batch, self._queue = self._queue, []
            return batch, self._closing and not batch

    def _serve(self) -> None:
        while True:
            batch, stop = self._next_batch()
            if not batch:
                if self.unsynced:  # idle, and a sync is due (or the writer stops)
                    self._fsync_wal()
                if stop:
                    return
                continue
            now = self._monotonic()
            full = (
                self._fsync_interval_s <= 0
                or any(op.durable for op in batch)
                or now - self._last_sync >= self._fsync_interval_s
            )
            try:
                self._set_full(full)
                run_batch(self.conn, batch)
                if full:
                    self._last_sync, self.unsynced = now, False
                else:
                    self.unsynced = True
            except BaseException as exc:  # a bug here must reach the callers, not vanish
                for op in batch:
                    op.error = op.error or StoreError(f"SQLite writer failed: {exc!r}")
            for op in batch:
                try:
                    op.token.backend_class.run_sync_soon(op.done.set, (), op.token.native_token)
                except Exception:  # the caller's event loop has ended: nobody to wake
                    continue

    def _set_full(self, full: bool) -> None:
        if full != self.full:
            self.conn.execute(f"PRAGMA synchronous={'FULL' if full else 'NORMAL'}")
            self.full = full

    def _fsync_wal(self) -> None:
        """Make the commits since the last fsync durable (fsync is per file, not per fd)."""
        try:
            fd = os.open(self._wal, os.O_RDONLY)
        except FileNotFoundError:  # checkpointed away: its content is in the synced db
            self.unsynced = False
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._last_sync, self.unsynced = self._monotonic(), False


def run_batch(conn: sqlite3.Connection, batch: list[Pending[Any]]) -> None:
    """Run a batch in one transaction: one commit (one fsync) for all of it."""
    # A savepoint per operation isolates its failure from its neighbours; a batch of
    # one needs none (its failure rolls the transaction back instead).
    isolate = len(batch) > 1
    try:
        conn.execute("BEGIN IMMEDIATE")
        for op in batch:
            if isolate:
                conn.execute("SAVEPOINT op")
            try:
                op.value = op.fn(conn)
                if isolate:
                    conn.execute("RELEASE op")
            except Exception as exc:
                op.error = map_error(exc) if isinstance(exc, sqlite3.Error) else exc
                if isolate:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
        if isolate or batch[0].error is None:
            conn.execute("COMMIT")
        else:
            conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        err = map_error(exc)
        for op in batch:
            op.error, op.value = err, None
