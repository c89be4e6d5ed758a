"""The multi-node store: PostgreSQL through asyncpg (imported only when used).

Every operation is one transaction. Claims take a transaction-level advisory
lock first, so two nodes never decide on overlapping snapshots: the database,
not a check in Python, makes template and lock exclusivity hold cluster-wide.
Fenced writes lock their task row (`FOR UPDATE`) and compare fence, status and
lease expiry against the database's own clock, the one clock every node shares.
Rescues skip rows another transaction holds (`SKIP LOCKED`).

Driver errors become `StoreUnavailable` when retrying may help (connection lost,
server shutting down, serialization failure) and `StoreError` otherwise.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from .._errors import StoreError, StoreUnavailable
from .._models import Claim, Limits, NodeInfo, Outcome, Status, TaskEvent, TaskInfo, TaskSpec
from .._redact import dsn_secrets, redact
from .._store import Orphan, OutputChunk, Renewal, Store
from . import _postgres_ops as ops
from ._common import (
    NODE_COLUMNS,
    alive_filter,
    check_schema_version,
    event_from_row,
    node_from_row,
    node_values,
)

if TYPE_CHECKING:
    import asyncpg

T = TypeVar("T")
log = logging.getLogger("taskpool")

#: The channel the schema's trigger NOTIFYs, at commit, on every status change but a
#: claim (submits, ends, retries, rescues).
WORK_CHANNEL = "taskpool_work"

_NOW = ops.NOW

#: SQLSTATE classes worth retrying: connection exceptions, insufficient resources,
#: operator intervention (shutdown), and serialization failures or deadlocks.
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "53", "57", "40")


def migrations() -> list[tuple[int, str]]:
    """The numbered migrations shipped with the package, in order."""
    folder = resources.files(__package__).joinpath("postgres_migrations")
    found = [
        (int(entry.name.split("_", 1)[0]), entry.read_text("utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    ]
    return sorted(found)


#: `submit_many`'s one statement. `$1` is a JSON array of specs (`_spec_json`). Ids are
#: drawn first and paired with the specs by rank, so that a batch's ids ascend in the
#: order given (the queue's order among equal priorities) whatever order the
#: sequence is read in; the insert trigger logs each task's 'submitted' event.
_SUBMIT_MANY = f"""
WITH spec AS (
    SELECT s, n FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS t(s, n)
), drawn AS (
    SELECT nextval(pg_get_serial_sequence('taskpool_tasks', 'id')) AS id
    FROM spec
), ranked AS (
    SELECT id, row_number() OVER (ORDER BY id) AS n FROM drawn
), now AS ({_NOW} AS t), inserted AS (
    INSERT INTO taskpool_tasks (id, status, argv, cwd, env, project, template,
        template_parallel, locks, priority, submitted_at, not_before, timeout_s,
        stall_timeout_s, max_attempts, retry_backoff_s, reason, changed_at, pass_env,
        inherit_env, memory_max, pids_max, cpu_max)
    SELECT ranked.id, 'waiting',
        ARRAY(SELECT a FROM jsonb_array_elements_text(s->'argv') WITH ORDINALITY AS v(a, i)
              ORDER BY i),
        s->>'cwd',
        CASE WHEN jsonb_typeof(s->'env') = 'object' THEN s->'env' END,
        s->>'project',
        s->>'template',
        (s->>'template_parallel')::boolean,
        ARRAY(SELECT jsonb_array_elements_text(s->'locks')),
        (s->>'priority')::integer,
        now.t,
        (s->>'not_before')::float8,
        (s->>'timeout_s')::float8,
        (s->>'stall_timeout_s')::float8,
        (s->>'max_attempts')::integer,
        (s->>'retry_backoff_s')::float8,
        'submitted',
        now.t,
        ARRAY(SELECT jsonb_array_elements_text(s->'pass_env')),
        (s->>'inherit_env')::boolean,
        (s->>'memory_max')::bigint,
        (s->>'pids_max')::integer,
        (s->>'cpu_max')::float8
    FROM spec JOIN ranked USING (n), now
    ORDER BY ranked.id
    RETURNING id
)
SELECT id FROM inserted ORDER BY id
"""


def _spec_json(spec: TaskSpec) -> dict[str, Any]:
    """A checked spec as one element of `_SUBMIT_MANY`'s JSON array."""
    return {
        "argv": list(spec.argv),
        "cwd": spec.cwd,
        "env": dict(spec.env) if spec.env is not None else None,
        "project": spec.project,
        "template": spec.template,
        "template_parallel": spec.template_parallel,
        "locks": sorted(spec.locks),
        "priority": spec.priority,
        "not_before": spec.not_before or 0.0,
        "timeout_s": spec.timeout_s,
        "stall_timeout_s": spec.stall_timeout_s,
        "max_attempts": spec.max_attempts,
        "retry_backoff_s": spec.retry_backoff_s,
        "pass_env": sorted(spec.pass_env),
        "inherit_env": spec.inherit_env,
        "memory_max": spec.memory_max,
        "pids_max": spec.pids_max,
        "cpu_max": spec.cpu_max,
    }


def _map_error(exc: BaseException) -> StoreError:
    """The taskpool error for a driver error, its text redacted (a driver may echo the
    connection string it was given)."""
    import asyncpg

    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        if state.startswith(_TRANSIENT_SQLSTATE_PREFIXES):
            return StoreUnavailable(redact(f"PostgreSQL {state}: {exc}"))
        return StoreError(redact(f"PostgreSQL {state}: {exc}"))
    return StoreUnavailable(redact(f"PostgreSQL connection: {exc!r}"))


def _scrub(exc: BaseException, dsn: str) -> BaseException:
    """Redact, in place, a driver exception's arguments: it stays the cause of the
    taskpool error (tracebacks print it), so it must not carry the DSN's password."""
    secrets = dsn_secrets(dsn)
    exc.args = tuple(redact(a, secrets=secrets) if isinstance(a, str) else a for a in exc.args)
    return exc


def _quiet_connection_class() -> type:
    import asyncpg

    class QuietConnection(asyncpg.Connection):  # type: ignore[misc]
        """Skips the reset query on release (a round trip per operation): the store
        takes only transaction-level locks, opens no cursors, sets nothing and LISTENs
        on a connection of its own. Open transactions are still rolled back."""

        def get_reset_query(self) -> str:
            return ""

    return QuietConnection


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

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        create: bool = True,
        connect_timeout_s: float = 10.0,
        command_timeout_s: float = 10.0,
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

    def __repr__(self) -> str:
        state = "open" if self._pool is not None else "closed"
        return f"<PostgresStore {redact(self.dsn)!r} {state} max_size={self.max_size}>"

    # -- plumbing ----------------------------------------------------------
    async def open(self) -> None:
        """Connect, and create or migrate taskpool's tables (with `create=False`, only
        migrate tables that exist). Errors name the DSN with its password redacted."""
        if self._pool is not None:
            return
        import asyncpg

        where = f"PostgreSQL at {redact(self.dsn)}"
        try:
            pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self.min_size,
                max_size=self.max_size,
                connection_class=_quiet_connection_class(),
                timeout=self.connect_timeout_s,
                command_timeout=self.command_timeout_s,
                # A client frozen inside a transaction (SIGSTOP, a paused VM) must not
                # hold its row locks, and so block every rescue, for longer than this.
                server_settings={
                    "idle_in_transaction_session_timeout": str(int(self.command_timeout_s * 1000))
                },
            )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            error = _map_error(_scrub(exc, self.dsn))
            raise type(error)(f"{where}: {error}") from exc
        except ValueError as exc:  # a malformed DSN (a port that is not a number, ...)
            raise StoreError(f"{where}: {_scrub(exc, self.dsn)}") from exc
        try:
            async with pool.acquire() as conn:
                await self._migrate(conn, create=self.create)
                self.store_id = await conn.fetchval("SELECT store_id FROM taskpool_store_identity")
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

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
                    f" VALUES ($1, ({_NOW}))",
                    version,
                )

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            # A graceful close waits on the server; an unreachable one must not hang us.
            with anyio.move_on_after(self.command_timeout_s) as scope:
                await pool.close()
            if scope.cancelled_caught:
                pool.terminate()

    async def _tx(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run `fn` in one transaction on a pooled connection, mapping driver errors."""
        import asyncpg

        pool = self._pool
        if pool is None:
            raise StoreError("the store is closed")
        try:
            # Shielded, bounded by its own timeout: a cancel that lands while the pool
            # opens a new connection would leak that connection's socket (asyncpg).
            with anyio.CancelScope(shield=True):
                conn = await pool.acquire(timeout=self.connect_timeout_s)
            try:
                async with conn.transaction():
                    return await fn(conn)
            finally:
                with anyio.CancelScope(shield=True):
                    await pool.release(conn, timeout=self.command_timeout_s)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise _map_error(exc) from exc

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
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb)",
                *node_values(node),
            )

        await self._tx(op)

    async def stop_node(self, node_id: str, reason: str) -> None:
        await self._tx(lambda conn: ops.stop_node(conn, node_id, reason))

    async def list_nodes(
        self, *, host: str | None = None, alive: bool | None = None
    ) -> list[NodeInfo]:
        async def op(conn: asyncpg.Connection) -> list[NodeInfo]:
            sql = "SELECT * FROM taskpool_nodes WHERE ($1::text IS NULL OR host = $1)"
            sql += alive_filter(alive)
            rows = await conn.fetch(sql + " ORDER BY started_at", host)
            return [node_from_row(r) for r in rows]

        return await self._tx(op)

    # -- the queue ---------------------------------------------------------
    async def submit(self, spec: TaskSpec) -> int:
        spec = spec.checked()  # InvalidTask here, before the database sees anything

        async def op(conn: asyncpg.Connection) -> int:
            task_id: int = await conn.fetchval(
                "INSERT INTO taskpool_tasks (status, argv, cwd, env, project, template,"
                " template_parallel, locks, priority, submitted_at, not_before, timeout_s,"
                " stall_timeout_s, max_attempts, retry_backoff_s, reason, changed_at,"
                " pass_env, inherit_env, memory_max, pids_max, cpu_max)"
                f" SELECT 'waiting', $1, $2, $3::jsonb, $4, $5, $6, $7, $8, now.t, $9, $10,"
                f" $11, $12, $13, 'submitted', now.t, $14, $15, $16, $17, $18"
                f" FROM ({_NOW}) AS now(t)"
                " RETURNING id",
                list(spec.argv),
                spec.cwd,
                json.dumps(dict(spec.env)) if spec.env is not None else None,
                spec.project,
                spec.template,
                spec.template_parallel,
                sorted(spec.locks),
                spec.priority,
                spec.not_before or 0.0,
                spec.timeout_s,
                spec.stall_timeout_s,
                spec.max_attempts,
                spec.retry_backoff_s,
                sorted(spec.pass_env),
                spec.inherit_env,
                spec.memory_max,
                spec.pids_max,
                spec.cpu_max,
            )
            return task_id

        return await self._tx(op)

    async def submit_many(self, specs: Sequence[TaskSpec]) -> list[int]:
        """All the tasks in one transaction and one statement: the specs travel as one
        JSON array, ids are drawn from the table's sequence in the specs' order."""
        checked = [spec.checked() for spec in specs]  # InvalidTask before the database
        if not checked:
            return []
        rows = json.dumps([_spec_json(spec) for spec in checked])

        async def op(conn: asyncpg.Connection) -> list[int]:
            ids = await conn.fetch(_SUBMIT_MANY, rows)
            return [r["id"] for r in ids]

        return await self._tx(op)

    async def claim(self, node_id: str, limits: Limits, lease_ttl_s: float) -> list[Claim]:
        return await self._tx(lambda conn: ops.claim(conn, node_id, limits, lease_ttl_s))

    async def record_spawn(self, task_id: int, fence: int, pid: int, pid_started_at: float) -> None:
        await self._tx(lambda conn: ops.record_spawn(conn, task_id, fence, pid, pid_started_at))

    async def append_output(self, task_id: int, fence: int, texts: Sequence[str]) -> None:
        await self._tx(lambda conn: ops.append_output(conn, task_id, fence, texts))

    async def finish(self, task_id: int, fence: int, outcome: Outcome) -> TaskInfo:
        async def op(conn: asyncpg.Connection) -> TaskInfo:
            return ops.info(await ops.finish(conn, task_id, fence, outcome))

        return await self._tx(op)

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
        async def op(conn: asyncpg.Connection) -> list[Claim]:
            await ops.finish(conn, task_id, fence, outcome)
            return await ops.claim(conn, node_id, limits, lease_ttl_s)

        return await self._tx(op)

    async def renew_leases(self, node_id: str, lease_ttl_s: float) -> Renewal:
        return await self._tx(lambda conn: ops.renew_leases(conn, node_id, lease_ttl_s))

    async def rescue_expired(
        self, *, except_attempts: Collection[tuple[int, int]] = ()
    ) -> list[TaskInfo]:
        spared = set(except_attempts)
        return await self._tx(lambda conn: ops.rescue_expired(conn, spared))

    async def orphans_of(self, node_id: str) -> list[Orphan]:
        async def op(conn: asyncpg.Connection) -> list[Orphan]:
            rows = await conn.fetch(
                "SELECT id, fence, owner_node, pid, pid_started_at FROM taskpool_tasks"
                " WHERE status = 'running' AND owner_node = $1 ORDER BY id",
                node_id,
            )
            return [Orphan(*r) for r in rows]

        return await self._tx(op)

    async def settle_orphan(self, task_id: int, fence: int, reason: str) -> TaskInfo:
        return await self._tx(lambda conn: ops.settle_orphan(conn, task_id, fence, reason))

    async def watch_for_work(self, on_work: Callable[[], None]) -> None:
        """LISTEN on `taskpool_work` (NOTIFYed by submits, retries and rescues) on a
        connection of its own, reconnecting with backoff when it drops."""
        import asyncpg

        delay = 0.1
        while True:
            try:
                # Shielded (and bounded by its timeout): a connect cancelled half-way
                # leaks its socket; finished, the connection is closed below instead.
                with anyio.CancelScope(shield=True):
                    conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout_s)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning(
                    "LISTEN connection failed, retrying in %.1f s: %s",
                    delay,
                    redact(repr(exc), secrets=dsn_secrets(self.dsn)),
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.1
            lost = anyio.Event()
            try:
                conn.add_termination_listener(lambda _, lost=lost: lost.set())
                await conn.add_listener(WORK_CHANNEL, lambda *_: on_work())
                on_work()  # work may have come while nobody listened
                while not conn.is_closed():  # checked too, should the listener not fire
                    with anyio.move_on_after(1.0):
                        await lost.wait()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning(
                    "LISTEN connection lost: %s", redact(repr(exc), secrets=dsn_secrets(self.dsn))
                )
            finally:
                conn.terminate()

    # -- operator actions --------------------------------------------------
    async def request_cancel(self, task_id: int, *, force: bool = False) -> TaskInfo:
        return await self._tx(lambda conn: ops.request_cancel(conn, task_id, force))

    # -- reads -------------------------------------------------------------
    async def get(self, task_id: int) -> TaskInfo:
        async def op(conn: asyncpg.Connection) -> TaskInfo:
            return ops.info(await ops.task_row(conn, task_id))

        return await self._tx(op)

    async def list_tasks(
        self,
        *,
        statuses: Sequence[Status] | None = None,
        project: str | None = None,
        limit: int = 100,
    ) -> list[TaskInfo]:
        async def op(conn: asyncpg.Connection) -> list[TaskInfo]:
            rows = await conn.fetch(
                "SELECT * FROM taskpool_tasks WHERE ($1::text[] IS NULL OR status = ANY($1))"
                " AND ($2::text IS NULL OR project = $2) ORDER BY id DESC LIMIT $3",
                [str(s) for s in statuses] if statuses is not None else None,
                project,
                limit,
            )
            return [ops.info(r) for r in rows]

        return await self._tx(op)

    async def waiting_ahead(self, task_id: int, *, limit: int) -> list[TaskInfo]:
        async def op(conn: asyncpg.Connection) -> list[TaskInfo]:
            me = await ops.task_row(conn, task_id)
            # Due by the database's clock, as the claim (taskpool_claim) judges it.
            rows = await conn.fetch(
                "SELECT * FROM taskpool_tasks WHERE status = 'waiting'"
                " AND not_before <= extract(epoch FROM clock_timestamp())"
                " AND (priority > $1 OR (priority = $1 AND id < $2))"
                " ORDER BY priority DESC, id LIMIT $3",
                me["priority"],
                me["id"],
                limit,
            )
            return [ops.info(r) for r in rows]

        return await self._tx(op)

    async def events(self, task_id: int) -> list[TaskEvent]:
        async def op(conn: asyncpg.Connection) -> list[TaskEvent]:
            rows = await conn.fetch(
                "SELECT * FROM taskpool_events WHERE task_id = $1 ORDER BY id", task_id
            )
            return [event_from_row(r) for r in rows]

        return await self._tx(op)

    async def read_output(
        self, task_id: int, *, after: tuple[int, int] = (0, 0), limit: int = 1000
    ) -> list[OutputChunk]:
        async def op(conn: asyncpg.Connection) -> list[OutputChunk]:
            rows = await conn.fetch(
                "SELECT fence, seq, text FROM taskpool_output WHERE task_id = $1"
                " AND (fence, seq) > ($2, $3) ORDER BY fence, seq LIMIT $4",
                task_id,
                after[0],
                after[1],
                limit,
            )
            return [OutputChunk(r[0], r[1], r[2]) for r in rows]

        return await self._tx(op)
