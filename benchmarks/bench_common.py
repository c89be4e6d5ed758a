"""What every benchmark module shares: the run's sizes (`Config`), timing and
summary helpers, the bare asyncio baseline, and throwaway PostgreSQL databases.

Not a script: `bench.py` runs the sections; `scale.py` and `pg_compare.py` hold
the scale sections (backlogs, nodes, waiters, bulk submit, PgQueuer).
"""

from __future__ import annotations

import asyncio
import math
import os
import sqlite3
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from taskpool import Status

Json = dict[str, Any]
T = TypeVar("T")


TERMINAL = tuple(str(s) for s in Status if s.is_terminal)
#: Nothing in a benchmark round should take this long; hitting it is a failure.
SAFETY_TIMEOUT_S = 60.0
#: The PostgreSQL server of the `postgres` section: a DSN of a database to connect to
#: for CREATE/DROP DATABASE (each measurement gets a fresh throwaway database).
DEFAULT_PG_DSN = os.environ.get(
    "TASKPOOL_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@dataclass(frozen=True, slots=True)
class Config:
    quick: bool
    concurrency: int
    throughput_tasks: int
    throughput_repeats: int
    kill_rounds: int
    backlog_big: int
    backlog_small: int
    backlog_repeats: int
    commit_loop_n: int
    submit_concurrent_n: int
    pg_tasks: int
    pg_repeats: int
    pg_dsn: str
    workdir: str | None
    # The scale sections (scale.py, pg_compare.py).
    scale_measured: int  # tasks measured through the pool in `backlog`, `blocked_ahead`
    scale_backlogs: tuple[int, ...]  # waiting tasks in `backlog`, the first the baseline
    scale_blocked: int  # tasks of a full project queued ahead in `blocked_ahead`
    scale_repeats: int
    waiter_tasks: int  # tasks, each with its own waiter, in `waiters`
    submit_many_n: int
    node_counts: tuple[int, ...]
    node_tasks: int
    compare_tasks: int  # `pgqueuer`: N
    compare_repeats: int
    stores: tuple[str, ...] = ("sqlite", "postgres")  # of the scale sections

    @classmethod
    def make(
        cls, *, quick: bool, concurrency: int, workdir: str | None, pg_dsn: str = DEFAULT_PG_DSN
    ) -> Config:
        return cls(
            quick=quick,
            concurrency=concurrency,
            throughput_tasks=500 if quick else 2000,
            throughput_repeats=1 if quick else 3,
            kill_rounds=50 if quick else 200,
            backlog_big=100_000,
            backlog_small=1_000,
            backlog_repeats=1 if quick else 3,
            commit_loop_n=200 if quick else 500,
            submit_concurrent_n=500 if quick else 2000,
            pg_tasks=300 if quick else 1000,
            pg_repeats=1 if quick else 2,
            pg_dsn=pg_dsn,
            workdir=workdir,
            scale_measured=200 if quick else 1000,
            scale_backlogs=(1_000, 10_000, 100_000),
            scale_blocked=50_000,
            scale_repeats=1 if quick else 2,
            waiter_tasks=1000,
            submit_many_n=100_000,
            node_counts=(1, 2, 4, 8),
            node_tasks=500 if quick else 2000,
            compare_tasks=300 if quick else 1000,
            compare_repeats=1 if quick else 2,
        )


# -- small helpers -------------------------------------------------------------


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q% of values <= it."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary_ms(values_s: Sequence[float]) -> Json:
    """p50/p99/max (and mean) of durations given in seconds, in milliseconds."""
    ms = [v * 1000 for v in values_s]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "max_ms": round(max(ms), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }


def per_s(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else math.inf


def new_db(workdir: Path, name: str) -> Path:
    """A fresh, not yet existing database path."""
    path = workdir / f"{name}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return path


def connect_raw(path: Path, synchronous: str = "NORMAL") -> sqlite3.Connection:
    """A plain sqlite3 connection with the store's pragmas (WAL), in autocommit mode."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


async def poll_until(
    check: Callable[[], Awaitable[T | None]], *, interval_s: float, what: str
) -> T:
    """Call `check` every `interval_s` until it returns something not None."""
    deadline = time.monotonic() + SAFETY_TIMEOUT_S
    while True:
        value = await check()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(interval_s)


async def bare_asyncio_run(n: int, concurrency: int) -> float:
    """Seconds to run `true` n times with asyncio subprocesses, at most `concurrency` at once."""
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            proc = await asyncio.create_subprocess_exec(
                "true", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
            await proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"true exited with {proc.returncode}")

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return time.perf_counter() - start


async def contained_asyncio_run(n: int, concurrency: int) -> float:
    """`bare_asyncio_run` with taskpool's own containment around each `true` and nothing
    else (no database, no pool): each run gets a cgroup of its own, which the child joins
    through the /bin/sh wrapper before it executes, and the cgroup is removed after. The
    floor under any design that keeps a cgroup per attempt. Raises if no cgroup can be
    made here (the figure would be the bare loop's)."""
    from taskpool import _containment
    from taskpool._models import ResourceLimits

    containment = _containment.choose(f"bench-{uuid.uuid4().hex[:12]}", "floor", mode="cgroup")
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            box = containment.box(f"run-{i}", ResourceLimits())
            try:
                proc = await asyncio.create_subprocess_exec(
                    *box.wrap(["true"]),
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                )
                await proc.communicate()
                if proc.returncode != 0:
                    raise RuntimeError(f"contained true exited with {proc.returncode}")
            finally:
                box.remove()

    try:
        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - start
    finally:
        containment.close()


def pg_dsn_for(admin_dsn: str, database: str) -> str:
    """`admin_dsn` (a postgresql:// URL) pointed at another database, query string kept."""
    base, sep, query = admin_dsn.partition("?")
    head, _, _ = base.rpartition("/")
    return f"{head}/{database}{sep}{query}"


@asynccontextmanager
async def fresh_pg_database(admin_dsn: str) -> AsyncIterator[str]:
    """Create an empty database, yield its DSN, drop it (and its connections) after."""
    import asyncpg

    name = f"taskpool_bench_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield pg_dsn_for(admin_dsn, name)
        finally:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()
