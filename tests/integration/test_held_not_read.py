"""A claim never reads the tasks held for their run-after dependencies: however many
wait ahead of the runnable ones, what a claim reads of the database stays the same.

Asserted on what the database itself counts, never on time. The queue: one task of a
project limited to 1, claimed and kept running; runnable tasks of another project at
a lower priority (so every held task is ahead of them in the queue); and, between
measurements, more and more tasks held after the running one. Each measured claim
(plain, and with fair sharing) runs in a transaction that is rolled back, so every
measurement sees the same runnable tasks; on PostgreSQL, with the plans a claim starts
with (custom) and those it keeps after its fifth call (generic). On SQLite the count
is of the virtual machine's instructions (a progress handler called at each one);
stepping over a held task costs several. On PostgreSQL it is the index entries and table rows the
database's own statistics say the claim's transaction read
(`pg_stat_get_xact_tuples_returned` of the table and of each of its indexes: this
backend's counts, so far in this transaction, whatever other backends do).
"""

from __future__ import annotations

import itertools
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg

from taskpool import Limits, PostgresStore, SQLiteStore, Store, TaskSpec
from taskpool.stores import _postgres_ops, _sqlite_ops
from tests.postgres import fresh_postgres_database

BLOCKED = "blocked"
RUNNABLE = 6
#: How many tasks are held ahead at each measurement. From a thousand: on a table of a
#: few hundred rows PostgreSQL rightly prefers a sequential scan to index probes here
#: and there (the fair claim's join of the ids it chose, say), which reads every row.
HELD = (1000, 2000, 4000)
#: Claim 4 of the runnable tasks, the plain way and the fair way.
CLAIMS = {
    "plain": Limits(4, {BLOCKED: 1}),
    "fair": Limits(4, {BLOCKED: 1}, fair_share={}),
}

#: What one claim reads, per claim kind (and on PostgreSQL, plan kind).
Reads = dict[str, int]


async def fill(store: Store) -> Callable[[int], Awaitable[None]]:
    """The running task and the runnable ones; what holds `n` more tasks after it."""
    (root,) = await store.submit_many([TaskSpec.build(["sleep", "600"], project=BLOCKED)])
    (claim,) = await store.claim("node-a", Limits(1, {BLOCKED: 1}), lease_ttl_s=600)
    assert claim.task.id == root
    await store.submit_many([TaskSpec.build(["true"], priority=-1)] * RUNNABLE)

    async def hold(n: int) -> None:
        await store.submit_many([TaskSpec.build(["true"], after=[root])] * n)

    return hold


async def reads_as_held_grows(
    store: Store, measure: Callable[[], Awaitable[Reads]]
) -> dict[int, Reads]:
    hold = await fill(store)
    found: dict[int, Reads] = {}
    held = 0
    for n in HELD:
        await hold(n - held)
        held = n
        found[n] = await measure()
    return found


def assert_flat(found: dict[int, Reads]) -> None:
    """What a claim reads does not grow with the number held: any two measurements
    differ by less than a tenth of the tasks held between them (a claim that stepped
    over them would read each). The slack is for the dead row versions the rolled-back
    claims leave in PostgreSQL's indexes."""
    slack = min(b - a for a, b in itertools.pairwise(HELD)) / 10
    for kind in found[HELD[0]]:
        per_held = {n: reads[kind] for n, reads in found.items()}
        assert max(per_held.values()) - min(per_held.values()) < slack, (kind, per_held)


async def test_sqlite_claims_read_the_same_however_many_are_held(tmp_path: Path) -> None:
    path = tmp_path / "held.db"

    def measure_now() -> Reads:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        steps = 0

        def count() -> int:
            nonlocal steps
            steps += 1
            return 0

        reads: Reads = {}
        try:
            for kind, limits in CLAIMS.items():
                conn.execute("BEGIN")
                steps = 0
                conn.set_progress_handler(count, 1)
                claims = _sqlite_ops.claim(conn, "node-b", limits, 30.0, time.time())
                conn.set_progress_handler(None, 1)
                conn.execute("ROLLBACK")
                assert len(claims) == 4
                reads[kind] = steps
        finally:
            conn.close()
        return reads

    async def measure() -> Reads:
        return measure_now()

    async with SQLiteStore(path) as store:
        found = await reads_as_held_grows(store, measure)
    assert_flat(found)


#: Index entries and table rows of the tasks table read so far in this transaction.
#: (A table's count is of the rows its sequential scans read; an index's, of the
#: entries its scans returned.)
TUPLES_READ = """
SELECT sum(pg_stat_get_xact_tuples_returned(rel)) FROM (
    SELECT 'taskpool_tasks'::regclass::oid
    UNION ALL
    SELECT indexrelid FROM pg_index WHERE indrelid = 'taskpool_tasks'::regclass) AS r(rel)
"""


@asynccontextmanager
async def raw(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


@asynccontextmanager
async def rolled_back(conn: asyncpg.Connection) -> AsyncIterator[None]:
    tx = conn.transaction()
    await tx.start()
    try:
        yield
    finally:
        await tx.rollback()


#: The plans a claim's queries run with: as PL/pgSQL chooses for the first five calls
#: on a connection, and for every later one.
PLAN_MODES = {"custom": "force_custom_plan", "generic": "force_generic_plan"}


async def tuples_read(conn: asyncpg.Connection) -> int:
    read: int = await conn.fetchval(TUPLES_READ)
    return read


async def test_postgres_claims_read_the_same_however_many_are_held() -> None:
    async with fresh_postgres_database() as dsn:

        async def measure() -> Reads:
            reads: Reads = {}
            async with raw(dsn) as conn:
                # Statistics as autovacuum would leave them, not as it may at any time.
                await conn.execute("ANALYZE taskpool_tasks")
                for plans, mode in PLAN_MODES.items():
                    await conn.execute(f"SET plan_cache_mode = {mode}")
                    for kind, limits in CLAIMS.items():
                        async with rolled_back(conn):
                            before = await tuples_read(conn)
                            claims, _ = await _postgres_ops.claim(conn, "node-b", limits, 30.0)
                            reads[f"{kind}, {plans}"] = await tuples_read(conn) - before
                        assert len(claims) == 4
            return reads

        async with PostgresStore(dsn) as store:
            found = await reads_as_held_grows(store, measure)
    assert_flat(found)
