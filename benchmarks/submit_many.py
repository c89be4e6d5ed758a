"""`submit_many` (one transaction) against `submit` one at a time, on both stores.

    .venv/bin/python benchmarks/submit_many.py [--tasks 10000] [--pg-dsn URL] [--runs 3]

Each figure is the best of `--runs`, each run on a fresh database: SQLite in a
temporary directory (default durability: a submit is fsynced before it returns),
PostgreSQL in a throwaway database on the server of `--pg-dsn` (default
`TASKPOOL_BENCH_PG_DSN`, else the local server with trust auth).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from bench import DEFAULT_PG_DSN, fresh_pg_database  # beside this file

from taskpool import Client, TaskSpec


@asynccontextmanager
async def sqlite_database() -> AsyncIterator[str]:
    with tempfile.TemporaryDirectory() as tmp:
        yield str(Path(tmp) / "bench.db")


async def best_of(
    runs: int, database: Callable[[], Any], measure: Callable[[Client], Awaitable[None]]
) -> float:
    """The shortest of `runs` timings of `measure`, each on a fresh database, in s."""
    best = float("inf")
    for _ in range(runs):
        async with database() as name, Client(name) as client:
            started = time.perf_counter()
            await measure(client)
            best = min(best, time.perf_counter() - started)
    return best


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pg-dsn", default=DEFAULT_PG_DSN)
    args = parser.parse_args()
    specs = [TaskSpec.build(["echo", str(i)], project="bench") for i in range(args.tasks)]

    async def one_by_one(client: Client) -> None:
        for spec in specs:
            await client.submit_spec(spec)

    async def in_one_batch(client: Client) -> None:
        ids = await client.submit_many(specs)
        assert len(ids) == len(specs)

    stores: dict[str, Callable[[], Any]] = {
        "SQLite": sqlite_database,
        "PostgreSQL": lambda: fresh_pg_database(args.pg_dsn),
    }
    print(f"{args.tasks:,} tasks, best of {args.runs}")
    for name, database in stores.items():
        single = await best_of(args.runs, database, one_by_one)
        batch = await best_of(args.runs, database, in_one_batch)
        print(
            f"{name:<10} submit one at a time: {single:7.2f} s ({args.tasks / single:9,.0f}/s)"
            f"   submit_many: {batch:6.3f} s ({args.tasks / batch:9,.0f}/s)"
            f"   x{single / batch:,.0f}"
        )


if __name__ == "__main__":
    anyio.run(main)
