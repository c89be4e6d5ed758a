"""The scale sections of bench.py, each on both stores (SQLite and PostgreSQL): what a
claim costs as the backlog grows or fills with blocked tasks, what 1,000 waiters cost,
and how fast a bulk submit is.

Every run has a fresh database (an SQLite file, a throwaway PostgreSQL database) and
the same workload: `true` tasks through `TaskPool(location, max_parallel=8)` opened
from the location as a user would (so PostgreSQL gets the node's default connection
pool). A rate is tasks / (last terminal event .at - first 'running' event .at) of the
measured tasks, read from the events table after the run; a probe counting their
terminal rows every 20 ms (plain SQL beside the pool) says when to stop.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bench_common import (
    SAFETY_TIMEOUT_S,
    TERMINAL,
    Config,
    Json,
    connect_raw,
    fresh_pg_database,
    new_db,
    per_s,
    progress,
    summary_ms,
)

from taskpool import Client, Limits, TaskPool, TaskSpec
from taskpool._models import Outcome, OutcomeKind
from taskpool.stores import open_store

#: The pool of every run here (the issue's "pool of 8").
POOL_SLOTS = 8
#: The project of the tasks queued ahead in `blocked_ahead`, limited to one running.
BLOCKED = "blocked"
#: How much larger than the longest measured run the safety net is.
SCALE_TIMEOUT_S = 10 * SAFETY_TIMEOUT_S


class Probe(Protocol):
    """Plain SQL beside the pool: how far the measured tasks (ids lo..hi) have got."""

    async def terminal(self, lo: int, hi: int) -> int: ...
    async def succeeded(self, lo: int, hi: int) -> int: ...
    async def span(self, lo: int, hi: int) -> tuple[float, float]: ...
    async def close(self) -> None: ...


class SQLiteProbe:
    def __init__(self, path: str) -> None:
        self._conn = connect_raw(Path(path))

    def _one(self, sql: str, *params: object) -> float:
        value: float = self._conn.execute(sql, params).fetchone()[0]
        return value

    async def terminal(self, lo: int, hi: int) -> int:
        return int(
            self._one(
                "SELECT COUNT(*) FROM tasks WHERE id BETWEEN ? AND ?"
                " AND status IN (SELECT value FROM json_each(?))",
                lo,
                hi,
                json.dumps(TERMINAL),
            )
        )

    async def succeeded(self, lo: int, hi: int) -> int:
        return int(
            self._one(
                "SELECT COUNT(*) FROM tasks WHERE id BETWEEN ? AND ? AND status = 'succeeded'",
                lo,
                hi,
            )
        )

    async def span(self, lo: int, hi: int) -> tuple[float, float]:
        first = self._one(
            "SELECT MIN(at) FROM events WHERE task_id BETWEEN ? AND ? AND to_status = 'running'",
            lo,
            hi,
        )
        last = self._one(
            "SELECT MAX(at) FROM events WHERE task_id BETWEEN ? AND ?"
            " AND to_status IN (SELECT value FROM json_each(?))",
            lo,
            hi,
            json.dumps(TERMINAL),
        )
        return first, last

    async def close(self) -> None:
        self._conn.close()


class PostgresProbe:
    def __init__(self, conn: object) -> None:
        self._conn = conn

    @classmethod
    async def open(cls, dsn: str) -> PostgresProbe:
        import asyncpg

        return cls(await asyncpg.connect(dsn))

    async def _one(self, sql: str, *params: object) -> float:
        value: float = await self._conn.fetchval(sql, *params)  # type: ignore[attr-defined]
        return value

    async def backend_pid(self) -> int:
        """The server process serving this probe (so its CPU is not counted)."""
        return int(await self._one("SELECT pg_backend_pid()"))

    async def terminal(self, lo: int, hi: int) -> int:
        return int(
            await self._one(
                "SELECT count(*) FROM taskpool_tasks WHERE id BETWEEN $1 AND $2"
                " AND status = ANY($3::text[])",
                lo,
                hi,
                list(TERMINAL),
            )
        )

    async def succeeded(self, lo: int, hi: int) -> int:
        return int(
            await self._one(
                "SELECT count(*) FROM taskpool_tasks WHERE id BETWEEN $1 AND $2"
                " AND status = 'succeeded'",
                lo,
                hi,
            )
        )

    async def span(self, lo: int, hi: int) -> tuple[float, float]:
        first = await self._one(
            "SELECT min(at) FROM taskpool_events WHERE task_id BETWEEN $1 AND $2"
            " AND to_status = 'running'",
            lo,
            hi,
        )
        last = await self._one(
            "SELECT max(at) FROM taskpool_events WHERE task_id BETWEEN $1 AND $2"
            " AND to_status = ANY($3::text[])",
            lo,
            hi,
            list(TERMINAL),
        )
        return first, last

    async def close(self) -> None:
        await self._conn.close()  # type: ignore[attr-defined]


@asynccontextmanager
async def fresh_store(store: str, cfg: Config, workdir: Path, name: str) -> AsyncIterator[str]:
    """A fresh, migrated database of `store`: its location (a path or a DSN)."""
    if store == "sqlite":
        path = new_db(workdir, name)
        async with Client(path):
            pass  # creates and migrates it
        try:
            yield str(path)
        finally:
            new_db(workdir, name)  # removes it: a 100,000-task database is not small
    else:
        async with fresh_pg_database(cfg.pg_dsn) as dsn:
            async with Client(dsn):
                pass
            yield dsn


@asynccontextmanager
async def probe_of(location: str) -> AsyncIterator[Probe]:
    """A probe on the database at `location`, open only while a pool runs (an open
    SQLite connection changes when the WAL is checkpointed)."""
    probe: Probe
    if location.startswith("postgresql://"):
        probe = await PostgresProbe.open(location)
    else:
        probe = SQLiteProbe(location)
    try:
        yield probe
    finally:
        await probe.close()


async def submit_bulk(location: str, specs: Sequence[TaskSpec]) -> tuple[list[int], float]:
    """`Client.submit_many` in chunks of 100,000 (one transaction each); ids, seconds."""
    ids: list[int] = []
    start = time.perf_counter()
    async with Client(location) as client:
        for at in range(0, len(specs), 100_000):
            ids += await client.submit_many(specs[at : at + 100_000])
    return ids, time.perf_counter() - start


async def settle(location: str) -> None:
    """On PostgreSQL, VACUUM ANALYZE the freshly filled tasks table (every case, the
    baseline too): autovacuum's first pass over 100,000 new rows otherwise runs during
    the measurement, on the same 2 cores, and is measured as claim cost (without it the
    100k-vs-1k ratio read 0.79; with it 1.12, the claim loop 0.93)."""
    if not location.startswith("postgresql://"):
        return
    import asyncpg

    conn = await asyncpg.connect(location)
    try:
        await conn.execute("VACUUM ANALYZE taskpool_tasks")
    finally:
        await conn.close()


def id_range(ids: Sequence[int]) -> tuple[int, int]:
    lo, hi = min(ids), max(ids)
    if hi - lo + 1 != len(ids):
        raise RuntimeError(f"the measured tasks' ids are not contiguous: {lo}..{hi}")
    return lo, hi


@dataclass(frozen=True, slots=True)
class Run:
    tasks_per_s: float
    wall_s: float


async def run_measured(
    location: str,
    measured: Sequence[int],
    *,
    project_limits: dict[str, int] | None = None,
    cancel_first: Sequence[int] = (),
    waiters: bool = False,
) -> Run:
    """Start a pool of `POOL_SLOTS` on `location`, let it run until every measured task
    is terminal (each awaited by `pool.wait` if `waiters`), cancel `cancel_first`,
    leave; the measured tasks' rate from their events."""
    async with probe_of(location) as probe:
        return await _run_measured(
            location, probe, measured, project_limits, cancel_first, waiters=waiters
        )


async def _run_measured(
    location: str,
    probe: Probe,
    measured: Sequence[int],
    project_limits: dict[str, int] | None,
    cancel_first: Sequence[int],
    *,
    waiters: bool,
) -> Run:
    lo, hi = id_range(measured)
    boot = time.perf_counter()
    async with TaskPool(
        location, max_parallel=POOL_SLOTS, project_limits=project_limits, shutdown_drain_s=5.0
    ) as pool:
        waiting = [asyncio.ensure_future(pool.wait(i)) for i in measured] if waiters else []
        deadline = time.monotonic() + SCALE_TIMEOUT_S
        while await probe.terminal(lo, hi) < len(measured):
            if time.monotonic() > deadline:
                raise TimeoutError("the measured tasks did not all end in time")
            await asyncio.sleep(0.02)
        wall_s = time.perf_counter() - boot
        if waiting:
            ended = await asyncio.wait_for(asyncio.gather(*waiting), SAFETY_TIMEOUT_S)
            if any(not info.is_terminal for info in ended):
                raise RuntimeError("a waiter returned before its task ended")
        for task_id in cancel_first:
            await pool.cancel(task_id)
    succeeded = await probe.succeeded(lo, hi)
    if succeeded != len(measured):
        raise RuntimeError(f"only {succeeded} of {len(measured)} measured tasks succeeded")
    first, last = await probe.span(lo, hi)
    return Run(per_s(len(measured), last - first), wall_s)


@dataclass(frozen=True, slots=True)
class ClaimLoop:
    tasks_per_s: float
    claim_ms: Json
    cpu_ms_per_task: float  # this process's CPU (all of SQLite's work; PostgreSQL's client)


async def claim_loop(
    location: str, measured: Sequence[int], project_limits: dict[str, int] | None = None
) -> ClaimLoop:
    """The store alone, no processes: `claim` up to `POOL_SLOTS` at a time, `finish` each
    claimed task at once (but those of `BLOCKED`, which keep their project full), until
    every measured task has been claimed; their rate, and each claim call's latency."""
    wanted = set(measured)
    limits = Limits(POOL_SLOTS, project_limits or {})
    exited = Outcome(OutcomeKind.EXITED, "exited with 0", 0)
    latencies: list[float] = []
    held = 0  # tasks of BLOCKED left running
    async with open_store(location) as store:
        start, cpu = time.perf_counter(), time.process_time()
        while wanted:
            called = time.perf_counter()
            claims = await store.claim("bench-claim-loop", limits, lease_ttl_s=600)
            latencies.append(time.perf_counter() - called)
            if not claims:
                raise RuntimeError(f"nothing claimable with {len(wanted)} measured tasks left")
            for claim in claims:
                wanted.discard(claim.task.id)
                if claim.task.spec.project == BLOCKED:
                    held += 1
                else:
                    await store.finish(claim.task.id, claim.fence, exited)
            if held >= POOL_SLOTS:
                raise RuntimeError("the blocked project took every slot")
        seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    return ClaimLoop(
        per_s(len(measured), seconds), summary_ms(latencies), round(cpu_s / len(measured) * 1e3, 3)
    )


def true_specs(n: int, project: str = "default") -> list[TaskSpec]:
    spec = TaskSpec.build(["true"], project=project)
    return [spec] * n


# -- backlog -----------------------------------------------------------------------------


#: Fills a fresh database; returns the ids of the measured tasks, and of those to
#: cancel after the pool run (the running blocker).
Prepare = Callable[[str], Awaitable[tuple[list[int], list[int]]]]


async def measure_case(
    store: str,
    cfg: Config,
    workdir: Path,
    name: str,
    prepare: Prepare,
    project_limits: dict[str, int] | None = None,
) -> tuple[Run, ClaimLoop]:
    """One case twice, each on a fresh database `prepare` fills: through a pool, and
    through the bare claim loop."""
    async with fresh_store(store, cfg, workdir, f"{name}-pool") as location:
        measured, cancel = await prepare(location)
        run = await run_measured(
            location, measured, project_limits=project_limits, cancel_first=cancel
        )
    async with fresh_store(store, cfg, workdir, f"{name}-claims") as location:
        measured, _ = await prepare(location)
        loop = await claim_loop(location, measured, project_limits)
    return run, loop


def compare(runs: dict[str, list[Run]], loops: dict[str, list[ClaimLoop]], base: str) -> Json:
    """Best pool rate and best claim-loop rate per case, each with its ratio to `base`."""
    pool = {case: max(r.tasks_per_s for r in rs) for case, rs in runs.items()}
    claims = {case: max(c.tasks_per_s for c in cs) for case, cs in loops.items()}
    return {
        "pool_tasks_per_s": pool,
        "pool_ratio": {case: round(rate / pool[base], 3) for case, rate in pool.items()},
        "claim_loop_tasks_per_s": claims,
        "claim_loop_ratio": {case: round(rate / claims[base], 3) for case, rate in claims.items()},
        "claim_ms": {
            case: max(cs, key=lambda c: c.tasks_per_s).claim_ms for case, cs in loops.items()
        },
        "claim_loop_cpu_ms_per_task": {
            case: min(c.cpu_ms_per_task for c in cs) for case, cs in loops.items()
        },
        "all_pool_tasks_per_s": {case: [r.tasks_per_s for r in rs] for case, rs in runs.items()},
        "all_claim_loop_tasks_per_s": {
            case: [c.tasks_per_s for c in cs] for case, cs in loops.items()
        },
    }


#: How the rates of `backlog` and `blocked_ahead` are measured, for their "what".
MEASURED = (
    f"Each case twice, each time on a fresh database filled with submit_many: 'pool' ="
    f" TaskPool(max_parallel={POOL_SLOTS}) running them (`true`), tasks/s = the measured"
    " tasks / (their last terminal event - their first 'running' event); 'claim_loop' ="
    f" the store alone in this process: claim (up to {POOL_SLOTS} slots) then finish each"
    " claimed task at once, until every measured task was claimed (claim_ms: each claim"
    " call's latency, client side). Best of the repeats, cases interleaved; ratios are to"
    " the baseline case, same store, same kind."
)


# -- backlog -----------------------------------------------------------------------------


async def bench_backlog(cfg: Config, workdir: Path) -> Json:
    k = cfg.scale_measured
    out: Json = {
        "what": (
            f"The first {k} tasks in queue order with N waiting in all; baseline: the"
            f" smallest N. {MEASURED}"
        ),
        "measured_tasks": k,
        "target_ratio": 0.8,
        "stores": {},
    }
    for store in cfg.stores:
        runs: dict[str, list[Run]] = {str(n): [] for n in cfg.scale_backlogs}
        loops: dict[str, list[ClaimLoop]] = {str(n): [] for n in cfg.scale_backlogs}
        fills: dict[str, float] = {}
        for rep in range(cfg.scale_repeats):
            for n in cfg.scale_backlogs:

                async def prepare(location: str, n: int = n) -> tuple[list[int], list[int]]:
                    ids, fills[str(n)] = await submit_bulk(location, true_specs(n))  # noqa: B023
                    await settle(location)
                    return ids[:k], []

                progress(f"backlog {store}: first {k} of {n} waiting (#{rep + 1})")
                run, loop = await measure_case(store, cfg, workdir, f"backlog-{n}", prepare)
                runs[str(n)].append(run)
                loops[str(n)].append(loop)
                progress(
                    f"backlog {store}: {n} waiting: pool {run.tasks_per_s}/s,"
                    f" claim loop {loop.tasks_per_s}/s"
                )
        out["stores"][store] = {
            **compare(runs, loops, str(cfg.scale_backlogs[0])),
            "fill_s": {n: round(s, 2) for n, s in fills.items()},
        }
    return out


# -- blocked ahead -------------------------------------------------------------------------


async def bench_blocked_ahead(cfg: Config, workdir: Path) -> Json:
    k, blocked = cfg.scale_measured, cfg.scale_blocked
    out: Json = {
        "what": (
            f"Project '{BLOCKED}' is limited to 1 running and its first task (`sleep 600`,"
            " the queue's head) is claimed first and kept running; in 'ahead' the"
            f" {blocked - 1} more tasks of it wait ahead of {k} tasks of another project,"
            f" in 'held_ahead' {blocked - 1} tasks of that other project that run after it"
            " (`after=[first]`: held until it succeeds) wait ahead of them, in"
            f" 'nothing_ahead' neither. The {k} are measured; baseline: nothing_ahead."
            f" {MEASURED}"
        ),
        "measured_tasks": k,
        "blocked_ahead": blocked,
        "target_ratio": 0.8,
        "stores": {},
    }
    limits = {BLOCKED: 1}
    blocker = TaskSpec.build(["sleep", "600"], project=BLOCKED)
    cases = ("nothing_ahead", "ahead", "held_ahead")
    for store in cfg.stores:
        runs: dict[str, list[Run]] = {case: [] for case in cases}
        loops: dict[str, list[ClaimLoop]] = {case: [] for case in cases}
        for rep in range(cfg.scale_repeats):
            for case in cases:

                async def prepare(location: str, case: str = case) -> tuple[list[int], list[int]]:
                    (first,), _ = await submit_bulk(location, [blocker])
                    if case == "ahead":
                        await submit_bulk(location, true_specs(blocked - 1, BLOCKED))
                    elif case == "held_ahead":
                        held = TaskSpec.build(["true"], after=[first])
                        await submit_bulk(location, [held] * (blocked - 1))
                    measured, _ = await submit_bulk(location, true_specs(k))
                    await settle(location)
                    return measured, [first]

                progress(f"blocked_ahead {store}: {case} (#{rep + 1})")
                run, loop = await measure_case(
                    store, cfg, workdir, f"blocked-{case}", prepare, limits
                )
                runs[case].append(run)
                loops[case].append(loop)
                progress(
                    f"blocked_ahead {store}: {case}: pool {run.tasks_per_s}/s,"
                    f" claim loop {loop.tasks_per_s}/s"
                )
        out["stores"][store] = compare(runs, loops, "nothing_ahead")
    return out


# -- waiters -------------------------------------------------------------------------------


async def bench_waiters(cfg: Config, workdir: Path) -> Json:
    n = cfg.waiter_tasks
    out: Json = {
        "what": (
            f"{n} `true` tasks (submitted first) through TaskPool(max_parallel={POOL_SLOTS});"
            f" 'waiters': each of them awaited by its own `pool.wait(id)`, all {n} started"
            " as the pool starts; 'none': no waiter. tasks_per_s = tasks / (last terminal -"
            " first 'running' event); ratio = waiters / none, same store; best of"
            f" {cfg.scale_repeats} interleaved run(s)."
        ),
        "tasks": n,
        "waiters": n,
        "target_ratio": 0.9,
        "stores": {},
    }
    for store in cfg.stores:
        rates: dict[str, list[float]] = {"none": [], "waiters": []}
        for rep in range(cfg.scale_repeats):
            for case in rates:
                name = f"waiters-{store}-{case}-{rep}"
                async with fresh_store(store, cfg, workdir, name) as location:
                    ids, _ = await submit_bulk(location, true_specs(n))
                    progress(f"waiters {store}: {case} (#{rep + 1})")
                    run = await run_measured(location, ids, waiters=case == "waiters")
                rates[case].append(run.tasks_per_s)
                progress(f"waiters {store}: {case}: {run.tasks_per_s}/s")
        best = {case: max(r) for case, r in rates.items()}
        out["stores"][store] = {
            "tasks_per_s": best,
            "ratio": round(best["waiters"] / best["none"], 3),
            "all_tasks_per_s": rates,
        }
    return out


# -- submit_many ------------------------------------------------------------------------------


def sqlite_one_insert(path: str, n: int) -> float:
    """Seconds for one INSERT statement of n waiting `true` tasks (rows from one JSON
    parameter), its transaction and fsync, on the migrated store's own table."""
    conn = connect_raw(Path(path), "FULL")
    try:
        rows = json.dumps([["true"]] * n)
        start = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO tasks (status, argv, project, locks, submitted_at, reason, changed_at)"
            " SELECT 'waiting', value, 'default', '[]', :now, 'submitted', :now"
            " FROM json_each(:rows)",
            {"rows": rows, "now": time.time()},
        )
        conn.execute("COMMIT")
        return time.perf_counter() - start
    finally:
        conn.close()


async def postgres_one_insert(dsn: str, n: int) -> float:
    """The same in PostgreSQL: one INSERT of n rows unnested from one text[] parameter."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        start = time.perf_counter()
        await conn.execute(
            "INSERT INTO taskpool_tasks (status, argv, project, submitted_at, reason, changed_at)"
            " SELECT 'waiting', ARRAY[a], 'default', extract(epoch FROM clock_timestamp()),"
            " 'submitted', extract(epoch FROM clock_timestamp()) FROM unnest($1::text[]) AS a",
            ["true"] * n,
        )
        return time.perf_counter() - start
    finally:
        await conn.close()


async def bench_submit_many(cfg: Config, workdir: Path) -> Json:
    n = cfg.submit_many_n
    out: Json = {
        "what": (
            f"{n} `true` tasks through Client(location).submit_many (one call, one"
            " transaction, durable on return) on a freshly migrated database, timed from the"
            " call to its return; baseline: one INSERT statement of the same number of rows"
            " into the same table (its trigger logging each 'submitted' event), sent as one"
            " parameter, committed (SQLite synchronous=FULL), on another fresh database."
            " ratio = baseline_s / submit_many_s (1.0: as fast as one raw INSERT); best of"
            f" {cfg.scale_repeats} interleaved run(s)."
        ),
        "tasks": n,
        "target_s": 3.0,
        "stores": {},
    }
    for store in cfg.stores:
        times: dict[str, list[float]] = {"submit_many": [], "one_insert": []}
        for rep in range(cfg.scale_repeats):
            progress(f"submit_many {store}: {n} tasks (#{rep + 1})")
            async with fresh_store(store, cfg, workdir, f"submit-{store}-{rep}") as location:
                ids, seconds = await submit_bulk(location, true_specs(n))
                assert len(ids) == n
                times["submit_many"].append(seconds)
            async with fresh_store(store, cfg, workdir, f"insert-{store}-{rep}") as location:
                if store == "sqlite":
                    times["one_insert"].append(
                        await asyncio.to_thread(sqlite_one_insert, location, n)
                    )
                else:
                    times["one_insert"].append(await postgres_one_insert(location, n))
            progress(
                f"submit_many {store}: {times['submit_many'][-1]:.2f} s,"
                f" one INSERT {times['one_insert'][-1]:.2f} s"
            )
        best = {k: min(v) for k, v in times.items()}
        out["stores"][store] = {
            "submit_many_s": round(best["submit_many"], 3),
            "one_insert_s": round(best["one_insert"], 3),
            "submits_per_s": per_s(n, best["submit_many"]),
            "ratio": round(best["one_insert"] / best["submit_many"], 3),
            "meets_target": best["submit_many"] < out["target_s"],
            "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        }
    return out
