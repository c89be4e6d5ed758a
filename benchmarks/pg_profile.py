"""Where taskpool's PostgreSQL time goes: the `pgqueuer` section's taskpool run (N tasks
of `true` on one node of 8 slots), with `pg_stat_statements` reset just before the
pool starts and its heaviest statements printed after, with the backends' CPU per task.

Needs a server that preloads `pg_stat_statements` (`shared_preload_libraries`), e.g.
a private one started with `-c shared_preload_libraries=pg_stat_statements
-c pg_stat_statements.track=all`; the DSN is of a database to CREATE/DROP others from.

    .venv/bin/python benchmarks/pg_profile.py postgresql://postgres@127.0.0.1:55432/postgres 1000
"""

from __future__ import annotations

import asyncio
import sys

import asyncpg
from bench_common import fresh_pg_database
from pg_compare import taskpool_run


async def main(dsn: str, n: int) -> None:
    admin = await asyncpg.connect(dsn)
    try:
        async with fresh_pg_database(dsn) as db:
            await admin.execute("SELECT pg_stat_statements_reset()")
            run = await taskpool_run(db, n)
            rows = await admin.fetch(
                "SELECT calls, total_exec_time, rows, left(regexp_replace(query, '\\s+', ' ',"
                " 'g'), 110) AS q FROM pg_stat_statements"
                " ORDER BY total_exec_time DESC LIMIT 40"
            )
    finally:
        await admin.close()
    print(f"n={n} run_s={run['run_s']:.2f} db_cpu_ms_per_task={run['db_cpu_s'] * 1000 / n:.3f}")
    total = sum(r["total_exec_time"] for r in rows)
    for r in rows:
        print(
            f"{r['calls']:>7} calls {r['total_exec_time']:>9.1f} ms"
            f" {r['total_exec_time'] * 1000 / n:>7.1f} us/task  {r['q']}"
        )
    print(f"top statements: {total / n * 1000:.1f} us/task")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1000))
