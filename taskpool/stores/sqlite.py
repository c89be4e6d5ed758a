"""The embedded default store: one SQLite file in WAL mode.

Writes are group-committed by one writer thread: operations that arrive while a
transaction is in flight are run together in the next one, each inside its own
savepoint, so one fsync serves many callers and one failing operation never
fails its neighbours.
Every write transaction is `BEGIN IMMEDIATE`: it holds SQLite's write lock from
its first statement, which makes a claim atomic across every process sharing
the file. Reads use a second connection and never wait for writers (WAL).

The sqlite3 calls run in threads; a transaction in flight always runs to its
end even if the awaiting task is cancelled, so cancellation never leaves half
an operation behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread
from anyio.lowlevel import EventLoopToken

from .._errors import LeaseLost, StoreError, StoreUnavailable, TaskNotFound
from .._models import (
    CancelMode,
    Claim,
    Limits,
    NodeInfo,
    Outcome,
    Status,
    TaskEvent,
    TaskInfo,
    TaskSpec,
    Transition,
    decide_finish,
    decide_handback,
    decide_orphan,
)
from .._rules import Occupancy, Slot, plan_claims
from .._store import Orphan, OutputChunk, Renewal, Store
from ._common import (
    blocked_lists,
    check_schema_version,
    claim_window,
    ended_columns,
    event_from_row,
    handback_reason,
    node_from_row,
    rescue_reason,
    task_info,
)

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], T]


_TRANSIENT = ("locked", "busy", "disk i/o", "unable to open", "readonly", "full")


#: The files of a database in WAL mode, as suffixes of its path.
WAL_SUFFIXES = ("", "-wal", "-shm")

#: A file's identity: (st_dev, st_ino).
FileIdentity = tuple[int, int]


def migrations() -> list[tuple[int, str]]:
    """The numbered migrations shipped with the package, in order."""
    folder = resources.files(__package__).joinpath("sqlite_migrations")
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text("utf-8")))
    return sorted(found)


def _map_error(exc: sqlite3.Error) -> StoreError:
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and any(w in text.lower() for w in _TRANSIENT):
        return StoreUnavailable(f"SQLite: {text}")
    return StoreError(f"SQLite: {text}")


# -- file identity -----------------------------------------------------------


def _file_identities(path: str) -> dict[str, FileIdentity | None]:
    """The identity of the database at `path` and of its `-wal` and `-shm` (None: absent)."""
    found: dict[str, FileIdentity | None] = {}
    for suffix in WAL_SUFFIXES:
        try:
            st = os.stat(path + suffix)
        except (FileNotFoundError, NotADirectoryError):
            found[suffix] = None
        else:
            found[suffix] = (st.st_dev, st.st_ino)
    return found


def lost_files(
    path: str,
    opened: Mapping[str, FileIdentity | None],
    current: Mapping[str, FileIdentity | None],
) -> str | None:
    """Why the files at `path` are no longer those a store opened, or None if they are.
    A file that was absent at open (no `-shm` without WAL) is not checked. Pure."""
    problems = []
    for suffix, was in opened.items():
        now = current.get(suffix)
        if was is None or now == was:
            continue
        if now is None:
            problems.append(f"{path}{suffix} was deleted (or its directory removed or renamed)")
        else:
            problems.append(
                f"{path}{suffix} was replaced by another file (inode {now[1]} on device"
                f" {now[0]}, opened as inode {was[1]} on device {was[0]})"
            )
    if not problems:
        return None
    return f"SQLite database {path} is no longer the file this store opened: " + "; ".join(problems)


def _empty_wal(conn: sqlite3.Connection) -> None:
    """Checkpoint the WAL into the database and truncate it, through the connection's
    own descriptors (the files it opened, wherever their names now lead). Best effort:
    it never waits on another process's reader."""
    try:
        conn.execute("PRAGMA busy_timeout=0")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    except sqlite3.Error:
        return  # the close still happens; the next opener of our old file recovers it


def _abandon(conn: sqlite3.Connection) -> None:
    """Never close `conn`: its descriptors and locks go with the process. SQLite's close
    would checkpoint and then unlink `-wal` and `-shm` by name, names that may by now
    belong to another database. A reference that is never dropped keeps the connection
    open through interpreter shutdown too (a module-level list would be cleared)."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(conn))


@dataclass(slots=True, eq=False)
class _Pending(Generic[T]):
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


class _Writer:
    """The thread that owns the write connection and group-commits what is queued.

    It takes every queued operation at once, runs them in one transaction and wakes
    their callers, then takes the next lot at once: no event-loop round trip stands
    between one commit and the next, which keeps the queue short under load.

    Durability is per batch, as PostgreSQL's `synchronous_commit` is per transaction:
    a batch holding a durable operation (a submit, a cancel) is fsynced before its
    callers return; other batches are fsynced at least every `fsync_interval_s`,
    by the next commit or, when the writer goes idle, by an fsync of the WAL.
    """

    def __init__(self, conn: sqlite3.Connection, wal: Path, fsync_interval_s: float) -> None:
        self.conn = conn
        self._wal = wal
        self._fsync_interval_s = fsync_interval_s
        self._last_sync = time.monotonic()
        self._unsynced = False  # commits made since the last fsync
        self._full = False  # the connection's current PRAGMA synchronous is FULL
        self._queue: list[_Pending[Any]] = []
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="taskpool-sqlite-writer")
        self._thread.daemon = True  # never keeps the interpreter alive on its own
        self._thread.start()

    def submit(self, op: _Pending[Any]) -> None:
        with self._cond:
            if self._closing:
                raise StoreError("the store is closed")
            self._queue.append(op)
            self._cond.notify()

    def withdraw(self, op: _Pending[Any]) -> bool:
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

    def _next_batch(self) -> tuple[list[_Pending[Any]], bool]:
        """Wait for work, or for an overdue fsync; return the batch and whether to stop."""
        with self._cond:
            while not self._queue and not self._closing:
                if not self._unsynced:
                    self._cond.wait()
                    continue
                left = self._last_sync + self._fsync_interval_s - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, self._queue = self._queue, []
            return batch, self._closing and not batch

    def _serve(self) -> None:
        while True:
            batch, stop = self._next_batch()
            if not batch:
                if self._unsynced:
                    self._fsync_wal()
                if stop:
                    return
                continue
            now = time.monotonic()
            full = (
                self._fsync_interval_s <= 0
                or any(op.durable for op in batch)
                or now - self._last_sync >= self._fsync_interval_s
            )
            try:
                self._set_full(full)
                _run_batch(self.conn, batch)
                if full:
                    self._last_sync, self._unsynced = now, False
                else:
                    self._unsynced = True
            except BaseException as exc:  # a bug here must reach the callers, not vanish
                for op in batch:
                    op.error = op.error or StoreError(f"SQLite writer failed: {exc!r}")
            for op in batch:
                try:
                    op.token.backend_class.run_sync_soon(op.done.set, (), op.token.native_token)
                except Exception:  # the caller's event loop has ended: nobody to wake
                    continue

    def _set_full(self, full: bool) -> None:
        if full != self._full:
            self.conn.execute(f"PRAGMA synchronous={'FULL' if full else 'NORMAL'}")
            self._full = full

    def _fsync_wal(self) -> None:
        """Make the commits since the last fsync durable (fsync is per file, not per fd)."""
        try:
            fd = os.open(self._wal, os.O_RDONLY)
        except FileNotFoundError:  # checkpointed away: its content is in the synced db
            self._unsynced = False
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._last_sync, self._unsynced = time.monotonic(), False


def _run_batch(conn: sqlite3.Connection, batch: list[_Pending[Any]]) -> None:
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
                op.error = _map_error(exc) if isinstance(exc, sqlite3.Error) else exc
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
        err = _map_error(exc)
        for op in batch:
            op.error, op.value = err, None


class SQLiteStore(Store):
    """A store in one SQLite file, created and migrated on first use.

    Every commit survives a crash of any process at once. Against power loss or an
    OS crash: `submit` and `request_cancel` are fsynced before they return (what a
    caller was promised is on disk); the pool's own writes (claims, outcomes,
    output, heartbeats) are fsynced within `fsync_interval_s`, group-committed. A
    power cut can so forget at most that much of their history, and the attempts
    concerned are reconciled at the next boot like any orphan. `fsync_interval_s=0`
    fsyncs every commit.
    """

    def __init__(
        self, path: str | Path, *, fsync_interval_s: float = 0.1, create: bool = True
    ) -> None:
        if not fsync_interval_s >= 0:
            raise ValueError("fsync_interval_s must be >= 0")
        self.path = Path(path)
        self.fsync_interval_s = fsync_interval_s
        self.create = create  # False: a missing file is an error, never a new database
        self._writer: _Writer | None = None
        self._reader: sqlite3.Connection | None = None
        self._read_lock = anyio.Lock()
        # What `open` opened, by absolute path, for `check_identity`; and once that
        # found the files gone or replaced, why: every later call is refused with it.
        self._opened_path = ""
        self._opened_files: dict[str, FileIdentity | None] = {}
        self._lost: str | None = None

    def __repr__(self) -> str:
        state = "open" if self._writer is not None else "closed"
        return f"<SQLiteStore {str(self.path)!r} {state}>"

    # -- plumbing ----------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self.create:
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30.0
            )
        else:
            # mode=rw: SQLite itself refuses to create the file, even one deleted
            # between our check and this call.
            uri = "file:" + urllib.parse.quote(str(self.path.absolute())) + "?mode=rw"
            conn = sqlite3.connect(
                uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30.0
            )
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # the writer raises it per batch
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def _open_sync(self) -> None:
        if self.create:
            _create_private(self.path)
        elif not self.path.is_file():
            raise StoreError(
                f"no taskpool database at {str(self.path)!r}"
                " (not created: this command only reads; check the path)"
            )
        conn = self._connect()
        try:
            self._migrate(conn)
            (self.store_id,) = conn.execute("SELECT store_id FROM store_identity").fetchone()
            self._reader = self._connect()
        except BaseException:
            conn.close()
            raise
        self._writer = _Writer(conn, Path(f"{self.path}-wal"), self.fsync_interval_s)
        self._remember_files()

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            done = {r[0] for r in conn.execute("SELECT version FROM schema_version")}
            check_schema_version(done, [v for v, _ in migrations()])
            for version, sql in migrations():
                if version in done:
                    continue
                for statement in _split_sql(sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                    (version, time.time()),
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def open(self) -> None:
        if self._writer is not None:
            return
        try:
            await anyio.to_thread.run_sync(self._open_sync)
        except sqlite3.Error as exc:
            raise _map_error(exc) from exc

    async def close(self) -> None:
        release: Callable[[sqlite3.Connection], None] = sqlite3.Connection.close
        if self._lost is not None:
            release = await anyio.to_thread.run_sync(self._release_when_lost)
        writer, self._writer = self._writer, None
        if writer is not None:
            await anyio.to_thread.run_sync(writer.close, release)
        async with self._read_lock:
            if self._reader is not None:
                release(self._reader)
                self._reader = None

    async def _write(self, fn: Op[T], *, durable: bool = False) -> T:
        """Run `fn` in a write transaction, group-committed with concurrent callers.

        Cancelled before the writer took it, the operation never runs; cancelled
        after, it is awaited to its end (shielded) so no caller is told it failed
        when it committed."""
        if self._lost is not None:
            raise StoreError(self._lost)
        writer = self._writer
        if writer is None:
            raise StoreError("the store is closed")
        op: _Pending[T] = _Pending(fn, anyio.lowlevel.current_token(), durable)
        writer.submit(op)
        try:
            await op.done.wait()
        except BaseException:
            if not writer.withdraw(op):
                with anyio.CancelScope(shield=True):
                    await op.done.wait()
            raise
        return op.result()

    async def _read(self, fn: Op[T]) -> T:
        def run() -> T:
            conn = self._reader
            if conn is None:
                raise StoreError("the store is closed")
            conn.execute("BEGIN")
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")

        if self._lost is not None:
            raise StoreError(self._lost)
        async with self._read_lock:
            try:
                return await anyio.to_thread.run_sync(run)
            except sqlite3.Error as exc:
                raise _map_error(exc) from exc

    # -- identity ----------------------------------------------------------
    def _remember_files(self) -> None:
        """Note the device and inode of the files the connections opened (blocking)."""
        self._opened_path = os.path.abspath(self.path)  # a later chdir must not matter
        self._opened_files = _file_identities(self._opened_path)
        self._lost = None

    def _release_when_lost(self) -> Callable[[sqlite3.Connection], None]:
        """How to let go of the connections once `check_identity` found the files lost
        (blocking: it looks at the files again)."""
        try:
            current = _file_identities(self._opened_path)
        except OSError:
            current = {}
        opened = self._opened_files
        db_moved = current.get("") != opened.get("")
        journal_ours = all(current.get(s) == opened.get(s) for s in WAL_SUFFIXES[1:])

        def release(conn: sqlite3.Connection) -> None:
            if db_moved:
                # Nothing else reaches our database through its name any more. Left as it
                # is, our `-wal` would be applied to whatever opens the path next (the file
                # that replaced ours included): empty it into our own database instead.
                _empty_wal(conn)
            if journal_ours:
                conn.close()  # if SQLite's close unlinks -wal and -shm by name, they are ours
            else:
                _abandon(conn)  # ... names that now belong to another database's files

        return release

    async def check_identity(self) -> None:
        """Raise a fatal `StoreError` naming the file if the database, its `-wal` or its
        `-shm` is no longer the file `open` opened (same device and inode): deleted,
        its directory removed or renamed, or replaced by another file. Every later read
        or write is refused with the same error, so nothing more is written through the
        handles of a file that is no longer this store's, and nothing into the file that
        took its place (its handles never lead there). One `stat` per file."""
        if self._lost is not None:
            raise StoreError(self._lost)
        if not self._opened_files:
            return  # not open
        try:
            current = await anyio.to_thread.run_sync(_file_identities, self._opened_path)
        except OSError as exc:  # cannot tell (permissions, I/O): worth retrying
            raise StoreUnavailable(f"SQLite: cannot check {self._opened_path}: {exc}") from exc
        lost = lost_files(self._opened_path, self._opened_files, current)
        if lost is not None:
            self._lost = lost
            raise StoreError(lost)

    # -- nodes -------------------------------------------------------------
    async def register_node(self, node: NodeInfo) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO nodes (id, host, pid, pid_started_at, started_at, heartbeat_at,"
                " max_parallel, containment) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    node.id,
                    node.host,
                    node.pid,
                    node.pid_started_at,
                    node.started_at,
                    node.heartbeat_at,
                    node.max_parallel,
                    node.containment,
                ),
            )

        await self._write(op)

    async def stop_node(self, node_id: str, reason: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            now = time.time()
            conn.execute(
                "UPDATE nodes SET stopped_at = ?, stop_reason = ?"
                " WHERE id = ? AND stopped_at IS NULL",
                (now, reason, node_id),
            )
            # In the same transaction, so a stopped node never owns a running attempt.
            rows = conn.execute(
                "SELECT * FROM tasks WHERE status = 'running' AND owner_node = ?", (node_id,)
            ).fetchall()
            for row in rows:
                transition = decide_handback(
                    handback_reason(node_id, reason),
                    cancel_requested=row["cancel_requested"] is not None,
                )
                _apply(conn, row, transition, now, "handed_back", None)

        await self._write(op)

    async def list_nodes(
        self, *, host: str | None = None, alive: bool | None = None
    ) -> list[NodeInfo]:
        def op(conn: sqlite3.Connection) -> list[NodeInfo]:
            sql = "SELECT * FROM nodes WHERE (? IS NULL OR host = ?)"
            if alive is True:
                sql += " AND stopped_at IS NULL"
            elif alive is False:
                sql += " AND stopped_at IS NOT NULL"
            rows = conn.execute(sql + " ORDER BY started_at", (host, host)).fetchall()
            return [node_from_row(r) for r in rows]

        return await self._read(op)

    # -- the queue ---------------------------------------------------------
    async def submit(self, spec: TaskSpec) -> int:
        spec = spec.checked()  # InvalidTask here, before the writer sees anything
        ids = await self._write(lambda conn: _insert_tasks(conn, [spec], time.time()), durable=True)
        return ids[0]

    async def submit_many(self, specs: Sequence[TaskSpec]) -> list[int]:
        """All the tasks in one transaction (one fsync), by multi-row inserts."""
        checked = [spec.checked() for spec in specs]  # InvalidTask before anything is written
        if not checked:
            return []
        return await self._write(
            lambda conn: _insert_tasks(conn, checked, time.time()), durable=True
        )

    async def claim(self, node_id: str, limits: Limits, lease_ttl_s: float) -> list[Claim]:
        return await self._write(lambda conn: _claim(conn, node_id, limits, lease_ttl_s))

    async def record_spawn(self, task_id: int, fence: int, pid: int, pid_started_at: float) -> None:
        def op(conn: sqlite3.Connection) -> None:
            _fenced(conn, task_id, fence, time.time())
            conn.execute(
                "UPDATE tasks SET pid = ?, pid_started_at = ? WHERE id = ?",
                (pid, pid_started_at, task_id),
            )
            conn.execute(
                "UPDATE attempts SET pid = ?, pid_started_at = ? WHERE task_id = ? AND fence = ?",
                (pid, pid_started_at, task_id, fence),
            )

        await self._write(op)

    async def append_output(self, task_id: int, fence: int, texts: Sequence[str]) -> None:
        def op(conn: sqlite3.Connection) -> None:
            _fenced(conn, task_id, fence, time.time())
            (last,) = conn.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM output WHERE task_id = ? AND fence = ?",
                (task_id, fence),
            ).fetchone()
            conn.executemany(
                "INSERT INTO output (task_id, fence, seq, text) VALUES (?, ?, ?, ?)",
                [(task_id, fence, last + i, text) for i, text in enumerate(texts, 1)],
            )

        await self._write(op)

    async def finish(self, task_id: int, fence: int, outcome: Outcome) -> TaskInfo:
        return await self._write(lambda conn: _info(_finish(conn, task_id, fence, outcome)))

    async def finish_and_claim(
        self,
        task_id: int,
        fence: int,
        outcome: Outcome,
        *,
        node_id: str,
        limits: Limits,
        lease_ttl_s: float,
    ) -> list[Claim]:
        def op(conn: sqlite3.Connection) -> list[Claim]:
            _finish(conn, task_id, fence, outcome)
            return _claim(conn, node_id, limits, lease_ttl_s)

        return await self._write(op)

    async def renew_leases(self, node_id: str, lease_ttl_s: float) -> Renewal:
        def op(conn: sqlite3.Connection) -> Renewal:
            now = time.time()
            rows = conn.execute(
                "UPDATE tasks SET lease_expires_at = ? WHERE owner_node = ? AND status = 'running'"
                " AND lease_expires_at >= ? RETURNING id, fence, cancel_requested",
                (now + lease_ttl_s, node_id, now),
            ).fetchall()
            conn.execute("UPDATE nodes SET heartbeat_at = ? WHERE id = ?", (now, node_id))
            return Renewal(
                held={r["id"]: r["fence"] for r in rows},
                cancel_requests={
                    r["id"]: CancelMode(r["cancel_requested"])
                    for r in rows
                    if r["cancel_requested"]
                },
            )

        return await self._write(op)

    async def rescue_expired(
        self, *, except_attempts: Collection[tuple[int, int]] = ()
    ) -> list[TaskInfo]:
        spared = set(except_attempts)

        def op(conn: sqlite3.Connection) -> list[TaskInfo]:
            now = time.time()
            rows = conn.execute(
                "SELECT t.*, n.heartbeat_at AS node_heartbeat_at FROM tasks t"
                " LEFT JOIN nodes n ON n.id = t.owner_node"
                " WHERE t.status = 'running' AND t.lease_expires_at < ?",
                (now,),
            ).fetchall()
            rescued = []
            for row in rows:
                if (row["id"], row["fence"]) in spared:
                    continue
                reason = rescue_reason(
                    row["owner_node"], row["node_heartbeat_at"], row["lease_expires_at"]
                )
                transition = decide_orphan(
                    attempts_used=row["attempts_used"],
                    max_attempts=row["max_attempts"],
                    reason=reason,
                    cancel_requested=row["cancel_requested"] is not None,
                )
                rescued.append(_info(_apply(conn, row, transition, now, "rescued", None)))
            return rescued

        return await self._write(op)

    async def orphans_of(self, node_id: str) -> list[Orphan]:
        def op(conn: sqlite3.Connection) -> list[Orphan]:
            rows = conn.execute(
                "SELECT id, fence, owner_node, pid, pid_started_at FROM tasks"
                " WHERE status = 'running' AND owner_node = ?",
                (node_id,),
            ).fetchall()
            return [Orphan(r[0], r[1], r[2], r[3], r[4]) for r in rows]

        return await self._read(op)

    async def settle_orphan(self, task_id: int, fence: int, reason: str) -> TaskInfo:
        def op(conn: sqlite3.Connection) -> TaskInfo:
            row = _row(conn, task_id)
            if row["status"] != Status.RUNNING or row["fence"] != fence:
                return _info(row)  # someone settled it already
            transition = decide_orphan(
                attempts_used=row["attempts_used"],
                max_attempts=row["max_attempts"],
                reason=reason,
                cancel_requested=row["cancel_requested"] is not None,
            )
            return _info(_apply(conn, row, transition, time.time(), "orphaned", None))

        return await self._write(op)

    # -- operator actions --------------------------------------------------
    async def request_cancel(self, task_id: int, *, force: bool = False) -> TaskInfo:
        def op(conn: sqlite3.Connection) -> TaskInfo:
            now = time.time()
            row = _row(conn, task_id)
            status = Status(row["status"])
            if status is Status.WAITING:
                transition = Transition(Status.CANCELLED, False, reason="cancelled while waiting")
                return _info(_apply(conn, row, transition, now, None, None))
            if status is Status.RUNNING:
                mode = "force" if force or row["cancel_requested"] == "force" else "graceful"
                conn.execute("UPDATE tasks SET cancel_requested = ? WHERE id = ?", (mode, task_id))
                _event(
                    conn,
                    task_id,
                    now,
                    row["fence"],
                    row["owner_node"],
                    status,
                    status,
                    f"cancel requested ({mode})",
                )
                return _info(_row(conn, task_id))
            return _info(row)

        return await self._write(op, durable=True)

    # -- reads -------------------------------------------------------------
    async def get(self, task_id: int) -> TaskInfo:
        return await self._read(lambda conn: _info(_row(conn, task_id)))

    async def list_tasks(
        self,
        *,
        statuses: Sequence[Status] | None = None,
        project: str | None = None,
        limit: int = 100,
    ) -> list[TaskInfo]:
        def op(conn: sqlite3.Connection) -> list[TaskInfo]:
            wanted = json.dumps([str(s) for s in statuses]) if statuses is not None else None
            rows = conn.execute(
                "SELECT * FROM tasks"
                " WHERE (? IS NULL OR status IN (SELECT value FROM json_each(?)))"
                " AND (? IS NULL OR project = ?) ORDER BY id DESC LIMIT ?",
                (wanted, wanted, project, project, limit),
            ).fetchall()
            return [_info(r) for r in rows]

        return await self._read(op)

    async def events(self, task_id: int) -> list[TaskEvent]:
        def op(conn: sqlite3.Connection) -> list[TaskEvent]:
            rows = conn.execute(
                "SELECT * FROM events WHERE task_id = ? ORDER BY id", (task_id,)
            ).fetchall()
            return [event_from_row(r) for r in rows]

        return await self._read(op)

    async def read_output(
        self, task_id: int, *, after: tuple[int, int] = (0, 0), limit: int = 1000
    ) -> list[OutputChunk]:
        def op(conn: sqlite3.Connection) -> list[OutputChunk]:
            rows = conn.execute(
                "SELECT fence, seq, text FROM output WHERE task_id = ? AND (fence, seq) > (?, ?)"
                " ORDER BY fence, seq LIMIT ?",
                (task_id, after[0], after[1], limit),
            ).fetchall()
            return [OutputChunk(r[0], r[1], r[2]) for r in rows]

        return await self._read(op)


# -- operations, run inside a transaction ------------------------------------


def _create_private(path: Path) -> None:
    """Create the database file 0600, and each missing directory above it 0700, so
    nothing taskpool creates is readable by other users. SQLite gives the -wal and
    -shm files the database file's mode. An existing file keeps the mode it has."""
    missing = []
    for parent in path.absolute().parents:
        if parent.exists():
            break
        missing.append(parent)
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it first
            os.mkdir(directory, 0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    os.close(fd)  # an empty file is an empty SQLite database


def _split_sql(script: str) -> list[str]:
    """Split a migration into complete statements, keeping their text as written."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip() and not all(
        not ln.strip() or ln.strip().startswith("--") for ln in buffer.splitlines()
    ):
        raise StoreError(f"incomplete SQL statement in migration: {buffer.strip()[:80]!r}")
    return statements


def _row(conn: sqlite3.Connection, task_id: int) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
    if row is None:
        raise TaskNotFound(f"no task {task_id}")
    return row  # type: ignore[no-any-return]


def _fenced(conn: sqlite3.Connection, task_id: int, fence: int, now: float) -> sqlite3.Row:
    """The task row if `fence` still owns it, else `LeaseLost`.

    Ownership ends when someone else takes the task over (a rescue, then a new claim:
    status or fence change), not at lease expiry itself: expiry only allows a rescue.
    Until one happens, the owner may still record what its attempt did within the
    lease, whose processes never outlive it (the owner stops them before it runs out
    when it cannot renew it)."""
    row = _row(conn, task_id)
    if row["status"] != Status.RUNNING or row["fence"] != fence:
        raise LeaseLost(
            f"task {task_id}: fence {fence} is stale"
            f" (task is {row['status']}, fence {row['fence']})"
        )
    return row


def _event(
    conn: sqlite3.Connection,
    task_id: int,
    at: float,
    fence: int | None,
    node_id: str | None,
    from_status: Status | None,
    to_status: Status,
    reason: str,
) -> None:
    conn.execute(
        "INSERT INTO events (task_id, at, fence, node_id, from_status, to_status, reason)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (task_id, at, fence, node_id, from_status, to_status, reason),
    )


def _apply(
    conn: sqlite3.Connection,
    row: sqlite3.Row,
    transition: Transition,
    now: float,
    outcome: str | None,
    exit_code: int | None,
) -> sqlite3.Row:
    """Write the end of an attempt (or of a waiting task); the trigger logs the event."""
    columns = ended_columns(row, transition, now, exit_code)
    assignments = ", ".join(f"{name} = :{name}" for name in columns)
    updated = conn.execute(
        f"UPDATE tasks SET {assignments} WHERE id = :id RETURNING *", {**columns, "id": row["id"]}
    ).fetchone()
    if row["status"] == Status.RUNNING:
        conn.execute(
            "UPDATE attempts SET finished_at = ?, outcome = ?, exit_code = ?, reason = ?"
            " WHERE task_id = ? AND fence = ?",
            (now, outcome, exit_code, transition.reason, row["id"], row["fence"]),
        )
    return updated  # type: ignore[no-any-return]


def _finish(conn: sqlite3.Connection, task_id: int, fence: int, outcome: Outcome) -> sqlite3.Row:
    now = time.time()
    row = _fenced(conn, task_id, fence, now)
    transition = decide_finish(
        outcome,
        attempts_used=row["attempts_used"],
        max_attempts=row["max_attempts"],
        backoff_s=row["retry_backoff_s"],
        now=now,
        cancel_requested=row["cancel_requested"] is not None,
    )
    return _apply(conn, row, transition, now, outcome.kind.value, outcome.exit_code)


def _locks(text: str) -> frozenset[str]:
    return frozenset(json.loads(text)) if text != "[]" else frozenset()


def _slot(row: sqlite3.Row) -> Slot:
    return Slot(
        task_id=row["id"],
        project=row["project"],
        template=row["template"],
        template_parallel=bool(row["template_parallel"]),
        locks=_locks(row["locks"]),
    )


#: Filters that drop waiting tasks certainly blocked by what already runs; each is
#: added only when its list is non-empty, so the common query stays a plain index walk.
_CANDIDATE_FILTERS = {
    "full_projects": "project NOT IN (SELECT value FROM json_each(:full_projects))",
    "templates_exclusive": "(template IS NULL OR template NOT IN "
    "(SELECT value FROM json_each(:templates_exclusive)))",
    "templates_any": "(template IS NULL OR template_parallel "
    "OR template NOT IN (SELECT value FROM json_each(:templates_any)))",
    "locks_held": "NOT EXISTS (SELECT 1 FROM task_locks l WHERE l.task_id = tasks.id "
    "AND l.lock_name IN (SELECT value FROM json_each(:locks_held)))",
}


def _candidates(
    conn: sqlite3.Connection, now: float, window: int, blocked: dict[str, list[str]]
) -> list[sqlite3.Row]:
    """Waiting tasks in queue order, minus those certainly blocked."""
    where = ["status = 'waiting'", "not_before <= :now"]
    params: dict[str, object] = {"now": now, "window": window}
    for name, values in blocked.items():
        if values:
            where.append(_CANDIDATE_FILTERS[name])
            params[name] = json.dumps(values)
    sql = (
        "SELECT id, project, template, template_parallel, locks FROM tasks WHERE "
        + " AND ".join(where)
        + " ORDER BY priority DESC, id LIMIT :window"
    )
    return conn.execute(sql, params).fetchall()


def _claim(
    conn: sqlite3.Connection, node_id: str, limits: Limits, lease_ttl_s: float
) -> list[Claim]:
    now = time.time()
    node = conn.execute("SELECT stopped_at FROM nodes WHERE id = ?", (node_id,)).fetchone()
    if node is not None and node["stopped_at"] is not None:
        return []  # a stopped node runs nothing: its claim would be left for lease expiry
    rows = conn.execute(
        "SELECT id, project, template, template_parallel, locks, owner_node FROM tasks"
        " WHERE status = 'running' AND lease_expires_at >= ?",
        (now,),
    ).fetchall()
    running = [_slot(r) for r in rows]
    node_running = sum(1 for r in rows if r["owner_node"] == node_id)
    chosen: list[Slot] = []
    while node_running + len(chosen) < limits.max_parallel:
        window = claim_window(limits.max_parallel - node_running - len(chosen))
        occ = Occupancy.of(running + chosen, node_running=node_running + len(chosen))
        candidates = _candidates(conn, now, window, blocked_lists(occ, limits))
        picked = plan_claims(
            [_slot(r) for r in candidates],
            running + chosen,
            node_running=node_running + len(chosen),
            max_parallel=limits.max_parallel,
            project_limits=limits.project_limits,
        )
        chosen.extend(picked)
        # A full window may hide runnable tasks behind ones blocked by this very
        # batch; look again (those are now filtered out in SQL) until no progress.
        if not picked or len(candidates) < window:
            break
    claims = []
    for slot in chosen:
        # The trigger logs the event; the reason names the node and the attempt number.
        row = conn.execute(
            "UPDATE tasks SET status = 'running', fence = fence + 1,"
            " attempts_used = attempts_used + 1, owner_node = :node, lease_expires_at = :expires,"
            " started_at = :now, changed_at = :now, pid = NULL, pid_started_at = NULL,"
            " exit_code = NULL, reason = printf('claimed by node %s (attempt %d of %d)',"
            " :node, attempts_used + 1, max_attempts) WHERE id = :id RETURNING *",
            {"node": node_id, "expires": now + lease_ttl_s, "now": now, "id": slot.task_id},
        ).fetchone()
        conn.execute(
            "INSERT INTO attempts (task_id, fence, node_id, claimed_at) VALUES (?, ?, ?, ?)",
            (slot.task_id, row["fence"], node_id, now),
        )
        info = _info(row)
        claims.append(Claim(info, info.fence))
    return claims


#: Tasks per INSERT statement in `_insert_tasks`: at 20 parameters a row, well under
#: SQLite's default limit of 32,766 bound parameters per statement.
_INSERT_ROWS = 500


def _insert_tasks(conn: sqlite3.Connection, specs: Sequence[TaskSpec], now: float) -> list[int]:
    """Insert checked specs as waiting tasks, and their locks; their ids in order. Runs
    in the caller's transaction: all of them are stored or none."""
    ids: list[int] = []
    for start in range(0, len(specs), _INSERT_ROWS):
        chunk = specs[start : start + _INSERT_ROWS]
        values = ", ".join(
            ["('waiting', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'submitted', ?, ?, ?, ?)"]
            * len(chunk)
        )
        params = [
            value
            for spec in chunk
            for value in (
                json.dumps(list(spec.argv)),
                spec.cwd,
                json.dumps(dict(spec.env)) if spec.env is not None else None,
                json.dumps(sorted(spec.pass_env)),
                int(spec.inherit_env),
                spec.project,
                spec.template,
                int(spec.template_parallel),
                json.dumps(sorted(spec.locks)),
                spec.priority,
                now,
                spec.not_before or 0.0,
                spec.timeout_s,
                spec.stall_timeout_s,
                spec.max_attempts,
                spec.retry_backoff_s,
                now,
                spec.memory_max,
                spec.pids_max,
                spec.cpu_max,
            )
        ]
        rows = conn.execute(
            "INSERT INTO tasks (status, argv, cwd, env, pass_env, inherit_env, project,"
            " template, template_parallel, locks, priority, submitted_at, not_before,"
            " timeout_s, stall_timeout_s, max_attempts, retry_backoff_s, reason, changed_at,"
            f" memory_max, pids_max, cpu_max) VALUES {values} RETURNING id",
            params,
        ).fetchall()
        # RETURNING's order is unspecified, but AUTOINCREMENT gives one statement's rows
        # ascending ids in the order of its VALUES: sorted, they match the specs.
        chunk_ids = sorted(row[0] for row in rows)
        conn.executemany(
            "INSERT INTO task_locks (task_id, lock_name) VALUES (?, ?)",
            [
                (task_id, name)
                for task_id, spec in zip(chunk_ids, chunk, strict=True)
                for name in spec.locks
            ],
        )
        ids += chunk_ids
    return ids


def _info(r: sqlite3.Row) -> TaskInfo:
    env = r["env"]
    return task_info(
        r,
        argv=json.loads(r["argv"]),
        env=json.loads(env) if env is not None else None,
        pass_env=json.loads(r["pass_env"]),
        locks=sorted(_locks(r["locks"])),
    )
