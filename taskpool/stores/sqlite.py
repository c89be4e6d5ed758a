"""The embedded default store: one SQLite file in WAL mode.

Writes are group-committed by one writer thread (`_writer.Writer`): every
operation is atomic across every process sharing the file, and one fsync serves
many callers. Reads use a second connection and never wait for writers (WAL).
The sqlite3 calls run in threads; a transaction in flight always runs to its
end even if the awaiting task is cancelled, so cancellation never leaves half
an operation behind.

The operations themselves, run inside a transaction, are in `_sqlite_ops.py`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Collection, Sequence
from importlib import resources
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.to_thread

from .._errors import StoreError, StoreUnavailable
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
)
from .._retention import PruneReport, Retention
from .._store import Orphan, OutputChunk, Renewal, Store
from .._validation import check_batch_keys
from . import _prune
from . import _sqlite_ops as ops
from . import _unique_keys as unique_keys
from ._common import (
    NODE_COLUMNS,
    alive_filter,
    check_schema_version,
    event_from_row,
    node_from_row,
    node_values,
)
from ._schedules_sql import SQLiteSchedules
from ._sqlite_changes import watch_changes
from ._sqlite_claim import QUEUED
from ._sqlite_files import (
    FileIdentity,
    create_private,
    file_identities,
    lost_files,
    release_when_lost,
)
from ._writer import Op, Writer, map_error

__all__ = ["SQLiteStore", "lost_files", "migrations"]

T = TypeVar("T")


def migrations() -> list[tuple[int, str]]:
    """The numbered migrations shipped with the package, in order."""
    folder = resources.files(__package__).joinpath("sqlite_migrations")
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text("utf-8")))
    return sorted(found)


class SQLiteStore(Store):
    """A store in one SQLite file, created and migrated on first use.

    Every commit survives a crash of any process at once. Against power loss or an
    OS crash: `submit` and `request_cancel` are fsynced before they return (what a
    caller was promised is on disk); the pool's own writes (claims, outcomes,
    output, heartbeats) are fsynced within `fsync_interval_s`, group-committed. A
    power cut can so forget at most that much of their history, and the attempts
    concerned are reconciled at the next boot like any orphan. `fsync_interval_s=0`
    fsyncs every commit.

    `clock` is the UNIX time leases, retries and claims are decided on (tests pass
    their own, to test a rule rather than the scheduler); every process sharing the
    file must agree on it.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        fsync_interval_s: float = 0.1,
        create: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not fsync_interval_s >= 0:
            raise ValueError("fsync_interval_s must be >= 0")
        self.path = Path(path)
        self.fsync_interval_s = fsync_interval_s
        self.create = create  # False: a missing file is an error, never a new database
        self._clock = clock
        self._writer: Writer | None = None
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
        # Before anything else: a new file takes it with its first table, and then
        # shrinks after a prune (taskpool/stores/_prune.py); no effect on existing ones.
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # the writer raises it per batch
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def _open_sync(self) -> None:
        if self.create:
            create_private(self.path)
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
        self._writer = Writer(conn, Path(f"{self.path}-wal"), self.fsync_interval_s)
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
            raise map_error(exc) from exc

    async def close(self) -> None:
        release: Callable[[sqlite3.Connection], None] = sqlite3.Connection.close
        if self._lost is not None:
            release = await anyio.to_thread.run_sync(
                release_when_lost, self._opened_path, self._opened_files
            )
        writer, self._writer = self._writer, None
        if writer is not None:
            await anyio.to_thread.run_sync(writer.close, release)
        async with self._read_lock:
            if self._reader is not None:
                release(self._reader)
                self._reader = None

    async def _write(self, fn: Op[T], *, durable: bool = False) -> T:
        """Run `fn` in a write transaction, group-committed (see `Writer.run`)."""
        if self._lost is not None:
            raise StoreError(self._lost)
        writer = self._writer
        if writer is None:
            raise StoreError("the store is closed")
        return await writer.run(fn, durable=durable)

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
                raise map_error(exc) from exc

    # -- identity ----------------------------------------------------------
    def _remember_files(self) -> None:
        """Note the device and inode of the files the connections opened (blocking)."""
        self._opened_path = os.path.abspath(self.path)  # a later chdir must not matter
        self._opened_files = file_identities(self._opened_path)
        self._lost = None

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
            current = await anyio.to_thread.run_sync(file_identities, self._opened_path)
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
                f"INSERT INTO nodes ({NODE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                node_values(node),
            )

        await self._write(op)

    async def stop_node(self, node_id: str, reason: str) -> None:
        await self._write(lambda conn: ops.stop_node(conn, node_id, reason, self._clock()))

    async def list_nodes(
        self, *, host: str | None = None, alive: bool | None = None
    ) -> list[NodeInfo]:
        def op(conn: sqlite3.Connection) -> list[NodeInfo]:
            sql = "SELECT * FROM nodes WHERE (? IS NULL OR host = ?)" + alive_filter(alive)
            rows = conn.execute(sql + " ORDER BY started_at", (host, host)).fetchall()
            return [node_from_row(r) for r in rows]

        return await self._read(op)

    def schedules(self) -> SQLiteSchedules:
        return SQLiteSchedules(self)

    # -- the queue ---------------------------------------------------------
    async def submit(self, spec: TaskSpec, *, reason: str = "submitted") -> int:
        spec = spec.checked()  # InvalidTask here, before the writer sees anything
        results = await self._write(
            lambda conn: unique_keys.sqlite_submit(conn, [spec], self._clock(), reason),
            durable=True,
        )
        return results[0]

    async def submit_many(self, specs: Sequence[TaskSpec]) -> list[int]:
        """All the tasks in one transaction (one fsync), by multi-row inserts (one by
        one for specs with a unique key)."""
        checked = [spec.checked() for spec in specs]  # InvalidTask before anything is written
        check_batch_keys(spec.unique_key for spec in checked)
        if not checked:
            return []
        return await self._write(
            lambda conn: unique_keys.sqlite_submit(conn, checked, self._clock()), durable=True
        )

    async def claim(self, node_id: str, limits: Limits, lease_ttl_s: float) -> list[Claim]:
        return await self._write(
            lambda conn: ops.claim(conn, node_id, limits, lease_ttl_s, self._clock())
        )

    async def record_spawn(self, task_id: int, fence: int, pid: int, pid_started_at: float) -> None:
        await self._write(lambda conn: ops.record_spawn(conn, task_id, fence, pid, pid_started_at))

    async def append_output(self, task_id: int, fence: int, texts: Sequence[str]) -> None:
        await self._write(lambda conn: ops.append_output(conn, task_id, fence, texts))

    async def finish(self, task_id: int, fence: int, outcome: Outcome) -> TaskInfo:
        def op(conn: sqlite3.Connection) -> TaskInfo:
            return ops.info(ops.finish(conn, task_id, fence, outcome, self._clock()))

        return await self._write(op)

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
            now = self._clock()
            ops.finish(conn, task_id, fence, outcome, now)
            return ops.claim(conn, node_id, limits, lease_ttl_s, now)

        return await self._write(op)

    async def renew_leases(self, node_id: str, lease_ttl_s: float) -> Renewal:
        return await self._write(
            lambda conn: ops.renew_leases(conn, node_id, lease_ttl_s, self._clock())
        )

    async def rescue_expired(
        self, *, except_attempts: Collection[tuple[int, int]] = ()
    ) -> list[TaskInfo]:
        spared = set(except_attempts)
        return await self._write(lambda conn: ops.rescue_expired(conn, spared, self._clock()))

    async def orphans_of(self, node_id: str) -> list[Orphan]:
        def op(conn: sqlite3.Connection) -> list[Orphan]:
            rows = conn.execute(
                "SELECT id, fence, owner_node, pid, pid_started_at FROM tasks"
                " WHERE status = 'running' AND owner_node = ? ORDER BY id",
                (node_id,),
            ).fetchall()
            return [Orphan(*r) for r in rows]

        return await self._read(op)

    async def settle_orphan(self, task_id: int, fence: int, reason: str) -> TaskInfo:
        return await self._write(
            lambda conn: ops.settle_orphan(conn, task_id, fence, reason, self._clock())
        )

    # -- operator actions --------------------------------------------------
    async def request_cancel(self, task_id: int, *, force: bool = False) -> TaskInfo:
        return await self._write(
            lambda conn: ops.request_cancel(conn, task_id, force, self._clock()), durable=True
        )

    async def cancel_requests(self, node_id: str) -> dict[int, tuple[int, CancelMode]]:
        return await self._read(lambda conn: ops.cancel_requests(conn, node_id))

    async def watch_for_cancels(self, node_id: str, on_cancel: Callable[[], None]) -> None:
        """Poll the file for commits of other connections (`_sqlite_changes`): a change
        may be a cancel, which `cancel_requests` then reads. Every node shares the file,
        so `node_id` filters nothing here."""
        del node_id
        await watch_changes(Path(self._opened_path or self.path), on_cancel)

    # -- reads -------------------------------------------------------------
    async def get(self, task_id: int) -> TaskInfo:
        return await self._read(lambda conn: ops.info(ops.task_row(conn, task_id)))

    async def statuses(self, task_ids: Collection[int]) -> dict[int, Status]:
        wanted = json.dumps(sorted(set(task_ids)))

        def op(conn: sqlite3.Connection) -> dict[int, Status]:
            rows = conn.execute(
                "SELECT id, status FROM tasks WHERE id IN (SELECT value FROM json_each(?))",
                (wanted,),
            ).fetchall()
            return {r[0]: Status(r[1]) for r in rows}

        return await self._read(op)

    async def get_many(
        self, task_ids: Collection[int], *, ended_only: bool = False
    ) -> dict[int, TaskInfo]:
        wanted = json.dumps(sorted(set(task_ids)))

        def op(conn: sqlite3.Connection) -> dict[int, TaskInfo]:
            rows = conn.execute(
                "SELECT * FROM tasks WHERE id IN (SELECT value FROM json_each(?))"
                " AND (NOT ? OR status NOT IN ('waiting', 'running'))",
                (wanted, ended_only),
            ).fetchall()
            return {info.id: info for info in map(ops.info, rows)}

        return await self._read(op)

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
            return [ops.info(r) for r in rows]

        return await self._read(op)

    async def waiting_ahead(self, task_id: int, *, limit: int) -> list[TaskInfo]:
        def op(conn: sqlite3.Connection) -> list[TaskInfo]:
            me = ops.task_row(conn, task_id)
            rows = conn.execute(
                # In QUEUED's words, so that the queue index is used (it leaves held
                # tasks out; migration 0011).
                f"SELECT * FROM tasks WHERE {QUEUED.format(t='tasks')} AND not_before <= ?"
                " AND (priority > ? OR (priority = ? AND id < ?))"
                " ORDER BY priority DESC, id LIMIT ?",
                (self._clock(), me["priority"], me["priority"], me["id"], limit),
            ).fetchall()
            return [ops.info(r) for r in rows]

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

    # -- retention ---------------------------------------------------------
    async def prune(
        self, policy: Retention, *, now: float | None = None, dry_run: bool = False
    ) -> PruneReport:
        return await _prune.prune_sqlite(self, policy, now, dry_run)

    async def vacuum(self) -> int | None:
        return await _prune.vacuum_sqlite(self)


# -- operations, run inside a transaction ------------------------------------


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
