"""The multi-node store: PostgreSQL through asyncpg (imported only when used).

Every operation is one transaction. A claim is one statement outside any explicit
transaction (`taskpool_claim`, migration 0006): it locks what its choice depends on
(the claiming node, and each blocking key of the tasks it takes: a limited project,
a template, a named lock) with transaction-level advisory locks released at its own
commit, never across a round trip, so claims that share no key run side by side,
and the database, not a check in Python, makes template and lock exclusivity hold
cluster-wide. Fenced writes lock their task row (`FOR UPDATE`) and compare fence,
status and lease expiry against the database's own clock, the one clock every node
shares. Rescues skip rows another transaction holds (`SKIP LOCKED`).

Driver errors become `StoreUnavailable` when retrying may help (connection lost,
server shutting down, serialization failure) and `StoreError` otherwise.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, TypeVar

import anyio

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
from .._redact import redact
from .._retention import PruneReport, Retention
from .._store import Orphan, OutputChunk, Renewal, Store, Wake
from .._validation import check_batch_keys
from . import _postgres_ops as ops
from . import _postgres_reads as reads
from . import _prune
from . import _unique_keys as unique_keys
from ._common import (
    NODE_COLUMNS,
    check_schema_version,
    node_values,
)
from ._postgres_driver import map_error, quiet_connection_class, scrub
from ._postgres_listen import CANCEL_CHANNEL, Listener
from ._postgres_listen import WORK_CHANNEL as WORK_CHANNEL  # tests LISTEN on it
from ._schedules_sql import PostgresSchedules

if TYPE_CHECKING:
    import asyncpg

T = TypeVar("T")
log = logging.getLogger("taskpool")

#: How many times a transaction aborted as a deadlock victim or a serialization
#: failure is run in all before the error is raised (`PostgresStore._tx`).
TRANSACTION_RETRIES = 3

#: How long a claim that lost a race waits before each new try (then it returns what
#: it has): the claim it lost to holds its locks for one statement, about a millisecond.
_CLAIM_RACE_DELAYS_S = (0.001, 0.004, 0.016)


@dataclass
class _ClaimQueue:
    """One node's claims through this store: one at a time; `begun` counts them,
    `answered` is the number of the latest that succeeded, `last` what the latest
    asked with (limits, lease)."""

    lock: anyio.Lock = field(default_factory=anyio.Lock)
    begun: int = 0
    answered: int = 0
    last: tuple[Limits, float] | None = None


def migrations() -> list[tuple[int, str]]:
    """The numbered migrations shipped with the package, in order."""
    folder = resources.files(__package__).joinpath("postgres_migrations")
    found = [
        (int(entry.name.split("_", 1)[0]), entry.read_text("utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    ]
    return sorted(found)


class PostgresStore(Store):
    """A store in a PostgreSQL database shared by every node.

    `dsn` is a libpq connection string or URL; tables are prefixed `taskpool_`
    so they can live beside an application's own. Connections come from one
    asyncpg pool of `min_size`..`max_size` per store.

    Every transaction commits with the server's `synchronous_commit` (on by
    default): a crash or failover of the database forgets nothing committed. (Off
    for the pool's own writes was measured: no throughput gained, and a server
    crashed by the outage test then forgot output already written.)
    """

    pushes_wakes = True  # LISTEN/NOTIFY (`watch_for_work`)

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        create: bool = True,
        connect_timeout_s: float = 10.0,
        command_timeout_s: float = 10.0,
        lease_connection: bool = False,
    ) -> None:
        self.dsn = dsn  # may hold a password: shown only through `redact`
        self.min_size = min_size
        self.max_size = max_size
        self.create = create  # False: a database without taskpool's tables is an error
        # Every call is bounded: a silent network (dropped packets, a paused server)
        # becomes StoreUnavailable like a refused connection, never a hang.
        self.connect_timeout_s = connect_timeout_s
        self.command_timeout_s = command_timeout_s
        self._pool: asyncpg.Pool | None = None
        # A worker's lease renewals get a connection of their own: queued behind its
        # runners' writes on the shared pool, a renewal could be late enough to fence.
        self.lease_connection = lease_connection
        self._lease_pool: asyncpg.Pool | None = None
        self._claim_queues: dict[str, _ClaimQueue] = {}
        #: The `application_name` of this store's LISTEN connection (pg_stat_activity).
        self.listener_name = f"taskpool listener {uuid.uuid4().hex[:12]}"
        self._listener: Listener | None = None

    def __repr__(self) -> str:
        state = "open" if self._pool is not None else "closed"
        return f"<PostgresStore {redact(self.dsn)!r} {state} max_size={self.max_size}>"

    # -- plumbing ----------------------------------------------------------
    async def open(self) -> None:
        """Connect, and create or migrate taskpool's tables (with `create=False`, only
        migrate tables that exist). Errors name the DSN with its password redacted."""
        if self._pool is not None:
            return

        pool = await self._create_pool(self.min_size, self.max_size)
        try:
            async with pool.acquire() as conn:
                await self._migrate(conn, create=self.create)
                self.store_id = await conn.fetchval("SELECT store_id FROM taskpool_store_identity")
            if self.lease_connection:
                self._lease_pool = await self._create_pool(1, 1)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        self._claim_queues = {}  # their locks belong to the event loop that opened
        # Every watcher of this store (work, cancels) shares one LISTEN connection.
        self._listener = Listener(
            self.dsn, connect_timeout_s=self.connect_timeout_s, application_name=self.listener_name
        )

    async def _create_pool(self, min_size: int, max_size: int) -> asyncpg.Pool:
        import asyncpg

        where = f"PostgreSQL at {redact(self.dsn)}"
        try:
            return await asyncpg.create_pool(
                self.dsn,
                min_size=min_size,
                max_size=max_size,
                connection_class=quiet_connection_class(),
                timeout=self.connect_timeout_s,
                command_timeout=self.command_timeout_s,
                # A client frozen inside a transaction (SIGSTOP, a paused VM) must not
                # hold its row locks, and so block every rescue, for longer than this.
                server_settings={
                    "idle_in_transaction_session_timeout": str(int(self.command_timeout_s * 1000))
                },
            )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            error = map_error(scrub(exc, self.dsn))
            raise type(error)(f"{where}: {error}") from exc
        except ValueError as exc:  # a malformed DSN (a port that is not a number, ...)
            raise StoreError(f"{where}: {scrub(exc, self.dsn)}") from exc

    @staticmethod
    async def _migrate(conn: asyncpg.Connection, *, create: bool = True) -> None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", ops.MIGRATION_LOCK)
            if not create and not await conn.fetchval(
                "SELECT to_regclass('taskpool_schema_version') IS NOT NULL"
            ):
                name = await conn.fetchval("SELECT current_database()")
                raise StoreError(
                    f"PostgreSQL database {name!r} holds no taskpool tables"
                    " (not created: this command only reads)"
                )
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS taskpool_schema_version"
                " (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
            )
            done = {r[0] for r in await conn.fetch("SELECT version FROM taskpool_schema_version")}
            check_schema_version(done, [v for v, _ in migrations()])
            for version, sql in migrations():
                if version in done:
                    continue
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO taskpool_schema_version (version, applied_at)"
                    f" VALUES ($1, ({ops.NOW}))",
                    version,
                )

    async def close(self) -> None:
        for pool in (self._pool, self._lease_pool):
            if pool is not None:
                # A graceful close waits on the server; an unreachable one must not hang us.
                with anyio.move_on_after(self.command_timeout_s) as scope:
                    await pool.close()
                if scope.cancelled_caught:
                    pool.terminate()
        self._pool = self._lease_pool = None

    async def _tx(
        self,
        fn: Callable[[asyncpg.Connection], Awaitable[T]],
        *,
        transaction: bool = True,
        for_leases: bool = False,
    ) -> T:
        """Run `fn` in one transaction on a pooled connection (the lease connection, if
        the store has one, `for_leases`), mapping driver errors. A transaction the server
        aborted as a deadlock victim or a serialization failure rolled back whole, so it
        is run again (a few times, after a short random pause) before it is an error."""
        import asyncpg

        for attempt in range(1, TRANSACTION_RETRIES + 1):
            try:
                return await self._once(fn, transaction=transaction, for_leases=for_leases)
            except (
                asyncpg.DeadlockDetectedError,
                asyncpg.SerializationError,
            ) as exc:
                if not transaction or attempt == TRANSACTION_RETRIES:
                    raise map_error(exc) from exc
                log.info("PostgreSQL %s; running the transaction again", exc.sqlstate)
                await anyio.sleep(random.uniform(0, 0.01 * attempt))
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise map_error(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _once(
        self,
        fn: Callable[[asyncpg.Connection], Awaitable[T]],
        *,
        transaction: bool,
        for_leases: bool,
    ) -> T:
        pool = self._pool
        if for_leases and self._lease_pool is not None and pool is not None:
            pool = self._lease_pool
        if pool is None:
            raise StoreError("the store is closed")
        # One unit, shielded from cancellation and bounded by the timeouts instead
        # (the connect's, each statement's): a cancel landing while the pool opens a
        # connection leaks its socket, and one landing mid-transaction leaves a
        # commit in flight unseen and asyncpg resetting the connection. A caller
        # cancelled meanwhile (a loop of a pool shutting down) is cancelled after.
        with anyio.CancelScope(shield=True):
            conn = await pool.acquire(timeout=self.connect_timeout_s)
            try:
                if not transaction:
                    result = await fn(conn)
                else:
                    async with conn.transaction():
                        result = await fn(conn)
            finally:
                await pool.release(conn, timeout=self.command_timeout_s)
        return result

    async def _statement(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run `fn`, one statement, outside an explicit transaction (PostgreSQL commits it
        as it ends), on a pooled connection, mapping driver errors."""
        return await self._tx(fn, transaction=False)

    def _opened_listener(self) -> Listener:
        if self._listener is None:
            raise StoreError("the store is closed")
        return self._listener

    async def check_identity(self) -> None:
        """The database answering must be the one opened: a restore of another database
        at the same address, or one dropped and made anew, is a fatal error."""

        async def op(conn: asyncpg.Connection) -> str | None:
            return await conn.fetchval(  # type: ignore[no-any-return]
                "SELECT store_id FROM taskpool_store_identity"
            )

        try:
            now = await self._tx(op)
        except StoreUnavailable:
            raise
        except StoreError as exc:  # e.g. the table is gone: not the database we opened
            raise StoreError(f"the PostgreSQL database is no longer the one opened: {exc}") from exc
        if now != self.store_id:
            raise StoreError(
                f"the PostgreSQL database is no longer the one opened: its store id is {now},"
                f" this store opened {self.store_id}"
            )

    # -- nodes -------------------------------------------------------------
    async def register_node(self, node: NodeInfo) -> None:
        async def op(conn: asyncpg.Connection) -> None:
            await conn.execute(
                f"INSERT INTO taskpool_nodes ({NODE_COLUMNS})"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10::jsonb)",
                *node_values(node),
            )

        await self._tx(op)

    async def stop_node(self, node_id: str, reason: str) -> None:
        await self._tx(lambda conn: ops.stop_node(conn, node_id, reason))

    async def list_nodes(
        self, *, host: str | None = None, alive: bool | None = None
    ) -> list[NodeInfo]:
        return await self._tx(lambda conn: reads.list_nodes(conn, host, alive))

    def schedules(self) -> PostgresSchedules:
        return PostgresSchedules(self)

    # -- the queue ---------------------------------------------------------
    async def submit(self, spec: TaskSpec, *, reason: str = "submitted") -> int:
        spec = spec.checked()  # InvalidTask here, before the database sees anything

        return await self._tx(lambda conn: unique_keys.postgres_submit(conn, spec, reason))

    async def submit_many(self, specs: Sequence[TaskSpec]) -> list[int]:
        """All the tasks in one transaction; without unique keys one binary COPY
        (`ops.submit_many`), ids ascending in the specs' order."""
        checked = [spec.checked() for spec in specs]  # InvalidTask before the database
        check_batch_keys(spec.unique_key for spec in checked)
        if not checked:
            return []
        return await self._tx(lambda conn: unique_keys.postgres_submit_many(conn, checked))

    async def claim(self, node_id: str, limits: Limits, lease_ttl_s: float) -> list[Claim]:
        """One claim statement, again at once (a few times) while it lost a race to
        another claim and left slots free: what that claim held is decided by now.

        A node's claims queue here, not in the database: `taskpool_claim` serializes
        them anyway (the node's advisory lock), and one waiting there holds a pooled
        connection the node's other writes need. A claim that waited while another of
        the node's, begun after it was asked for, succeeded returns nothing: that one saw
        every slot this one would have, and its caller starts what it took."""
        queue = self._claim_queues.setdefault(node_id, _ClaimQueue())
        asked = queue.begun
        async with queue.lock:
            if queue.answered > asked and queue.last == (limits, lease_ttl_s):
                return []
            queue.begun += 1
            number, queue.last = queue.begun, (limits, lease_ttl_s)
            claims: list[Claim] = []
            for delay in (*_CLAIM_RACE_DELAYS_S, None):
                got, contended = await self._statement(
                    lambda conn: ops.claim(conn, node_id, limits, lease_ttl_s)
                )
                claims.extend(got)
                if not contended or delay is None:
                    queue.answered = number
                    return claims
                await anyio.sleep(delay)
        raise AssertionError("unreachable")

    # record_spawn, append_output, finish: one statement each (no BEGIN/COMMIT round
    # trips) that writes only while the fence owns the task; when it did not write,
    # the locked transaction (`ops.fenced`) decides, and raises `LeaseLost`.
    async def record_spawn(self, task_id: int, fence: int, pid: int, pid_started_at: float) -> None:
        args = (task_id, fence, pid, pid_started_at)
        if not await self._statement(lambda conn: ops.record_spawn_at_once(conn, *args)):
            await self._tx(lambda conn: ops.record_spawn(conn, *args))

    async def append_output(self, task_id: int, fence: int, texts: Sequence[str]) -> None:
        if not await self._statement(
            lambda conn: ops.append_output_at_once(conn, task_id, fence, texts)
        ):
            await self._tx(lambda conn: ops.append_output(conn, task_id, fence, texts))

    async def finish(self, task_id: int, fence: int, outcome: Outcome) -> TaskInfo:
        return await self._finish(task_id, fence, outcome, wake_nodes=True)

    async def _finish(
        self, task_id: int, fence: int, outcome: Outcome, *, wake_nodes: bool
    ) -> TaskInfo:
        """`wake_nodes`: say 'work' (nobody claims what the end freed); `finish_and_claim`
        does not, its own claim follows, and the commit says 'end', for waiters only
        (migration 0007)."""
        ended = await self._statement(
            lambda conn: ops.finish_at_once(conn, task_id, fence, outcome, wake=wake_nodes)
        )
        if ended is None:  # the row changed after the read (a cancel request, a rescue)

            async def op(conn: asyncpg.Connection) -> object:
                row = await ops.finish(conn, task_id, fence, outcome)
                if wake_nodes:
                    await conn.execute("SELECT taskpool_wake_work()")
                return row

            ended = await self._tx(op)
        return ops.info(ended)

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
        """`finish`, committed, then `claim`: a claim holds its locks for its own statement
        only, never across the round trips of a finish. The outcome is written whatever
        becomes of the claim: a claim that fails for an outage claims nothing here (the
        node's claim loop finds it at its next poll). The finish wakes no node: this
        node claims what it freed at once, and its claim says 'work' if it leaves work
        for others (it filled the node)."""
        await self._finish(task_id, fence, outcome, wake_nodes=False)
        try:
            return await self.claim(node_id, limits, lease_ttl_s)
        except StoreUnavailable as exc:
            log.warning(
                "claim after finishing task %s failed, left to the claim loop: %s", task_id, exc
            )
            return []

    async def renew_leases(self, node_id: str, lease_ttl_s: float) -> Renewal:
        return await self._tx(
            lambda conn: ops.renew_leases(conn, node_id, lease_ttl_s), for_leases=True
        )

    async def rescue_expired(
        self, *, except_attempts: Collection[tuple[int, int]] = ()
    ) -> list[TaskInfo]:
        spared = set(except_attempts)
        return await self._tx(lambda conn: ops.rescue_expired(conn, spared))

    async def orphans_of(self, node_id: str) -> list[Orphan]:
        return await self._tx(lambda conn: reads.orphans_of(conn, node_id))

    async def settle_orphan(self, task_id: int, fence: int, reason: str) -> TaskInfo:
        return await self._tx(lambda conn: ops.settle_orphan(conn, task_id, fence, reason))

    async def watch_for_work(self, on_wake: Callable[[Wake], None]) -> None:
        """LISTEN on `taskpool_work`, whose triggers NOTIFY once per transaction at most,
        the payload saying what happened (`Wake`, migration 0007)."""
        await self._opened_listener().watch(
            WORK_CHANNEL,
            lambda payload: on_wake(Wake.WORK if payload is None else Wake.of(payload)),
        )

    # -- operator actions --------------------------------------------------
    async def request_cancel(self, task_id: int, *, force: bool = False) -> TaskInfo:
        return await self._tx(lambda conn: ops.request_cancel(conn, task_id, force))

    async def cancel_requests(self, node_id: str) -> dict[int, tuple[int, CancelMode]]:
        return await self._tx(lambda conn: ops.cancel_requests(conn, node_id))

    async def watch_for_cancels(self, node_id: str, on_cancel: Callable[[], None]) -> None:
        """LISTEN on `taskpool_cancel` (NOTIFYed with the owner's node id when a cancel is
        asked of a running task, migration 0009); another node's id is not ours."""
        await self._opened_listener().watch(
            CANCEL_CHANNEL, lambda payload: on_cancel() if payload in (None, node_id) else None
        )

    # -- reads (`_postgres_reads`) ---------------------------------------
    async def get(self, task_id: int) -> TaskInfo:
        return await self._tx(lambda conn: reads.get(conn, task_id))

    async def statuses(self, task_ids: Collection[int]) -> dict[int, Status]:
        return await self._tx(lambda conn: reads.statuses(conn, task_ids))

    async def get_many(
        self, task_ids: Collection[int], *, ended_only: bool = False
    ) -> dict[int, TaskInfo]:
        return await self._tx(lambda conn: reads.get_many(conn, task_ids, ended_only))

    async def list_tasks(
        self,
        *,
        statuses: Sequence[Status] | None = None,
        project: str | None = None,
        limit: int = 100,
    ) -> list[TaskInfo]:
        return await self._tx(lambda conn: reads.list_tasks(conn, statuses, project, limit))

    async def waiting_ahead(self, task_id: int, *, limit: int) -> list[TaskInfo]:
        return await self._tx(lambda conn: reads.waiting_ahead(conn, task_id, limit))

    async def events(self, task_id: int) -> list[TaskEvent]:
        return await self._tx(lambda conn: reads.events(conn, task_id))

    async def read_output(
        self, task_id: int, *, after: tuple[int, int] = (0, 0), limit: int = 1000
    ) -> list[OutputChunk]:
        return await self._tx(lambda conn: reads.read_output(conn, task_id, after, limit))

    # -- retention ---------------------------------------------------------
    async def prune(
        self, policy: Retention, *, now: float | None = None, dry_run: bool = False
    ) -> PruneReport:
        return await _prune.prune_postgres(self, policy, now, dry_run)

    async def vacuum(self) -> int | None:
        await _prune.vacuum_postgres(self)
        return None
