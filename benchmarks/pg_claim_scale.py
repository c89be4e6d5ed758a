"""How PostgreSQL claims scale: with the backlog, with blocked tasks ahead, with nodes.

Run: `.venv/bin/python benchmarks/pg_claim_scale.py [--base SRC] [--quick]`. Every
figure is measured for each implementation given (`--impl LABEL=SRC`, a directory
holding a `taskpool` package; by default this checkout as `new`, plus `--base SRC`
as `base` if given), interleaved in one run on one PostgreSQL server, so the ratios
compare like with like. One JSON object goes to stdout, progress to stderr.

The server is a private one started for the run (tests/pg_cluster.py), unless
`--pg-dsn` names one: on a private server the database-side CPU of a run (every
server process's user + system time, read from /proc) belongs to the run alone.

Scenarios (each on a fresh database, its backlog inserted by SQL before any node
starts; a node is a process of its own running `TaskPool(PostgresStore(dsn))` with
`true` as every task):

- `backlog`: the first 1,000 tasks through one node of 8 slots with 1,000, 10,000
  or 100,000 waiting; tasks per second from the first claim to the 1,000th end.
- `blocked`: 1,000 tasks of project `free` queued behind 1 or 50,000 tasks of
  project `blocked` (limit 1, `sleep`: one runs, the rest wait), one node of 8.
- `nodes`: 1,000 tasks through 1, 2 or 4 nodes of 4 slots, submitted once every
  node is up; tasks per second from the first claim to the last end, and the
  database-side CPU per task.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(Path(__file__).resolve())
Json = dict[str, Any]
#: A measurement that has not reached its count by then reports its rate so far
#: (`"partial": true`): the baseline with a big backlog can take many minutes.
CAP_S = 120.0

#: The columns a backlog row sets; the rest keep their defaults (no template, no locks).
_INSERT = """
INSERT INTO taskpool_tasks (status, argv, project, priority, submitted_at, reason, changed_at)
SELECT 'waiting', $1::text[], $2, 0, extract(epoch FROM clock_timestamp()), 'submitted',
       extract(epoch FROM clock_timestamp())
FROM generate_series(1, $3)
"""


def progress(message: str) -> None:
    print(f"[pg_claim_scale] {message}", file=sys.stderr, flush=True)


# -- a node: one process, one pool ------------------------------------------------------


async def run_node(dsn: str, slots: int, limits: Json) -> None:
    """A pool on `dsn` until stdin closes (the parent's signal to stop)."""
    from taskpool import TaskPool
    from taskpool.stores.postgres import PostgresStore

    # Generous timeouts: the baseline's claims, serialized, take seconds with a big
    # backlog, and a node that crashed on them would measure nothing.
    store = PostgresStore(dsn, max_size=slots + 4, command_timeout_s=60)
    await store.open()
    try:
        async with TaskPool(
            store,
            max_parallel=slots,
            project_limits=limits,
            shutdown_drain_s=0.1,
            guard=False,
            lease_ttl_s=180,
            store_call_timeout_s=60,
        ):
            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await store.close()


async def migrate(dsn: str) -> None:
    from taskpool.stores.postgres import PostgresStore

    store = PostgresStore(dsn)
    await store.open()
    await store.close()


def child(src: str, *argv: str, stdin: int | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": src}
    return subprocess.Popen(
        [sys.executable, SCRIPT, *argv], env=env, stdin=stdin, stdout=subprocess.PIPE
    )


@contextlib.contextmanager
def nodes(
    src: str, dsn: str, count: int, slots: int, limits: Json
) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [
        child(src, "_node", dsn, str(slots), json.dumps(limits), stdin=subprocess.PIPE)
        for _ in range(count)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != b"ready":
                raise RuntimeError("a node did not start")
        yield procs
    finally:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in procs:
            proc.wait(timeout=60)


# -- the server -------------------------------------------------------------------------


def server_cpu_s(data_dir: Path | None) -> float:
    """User + system CPU seconds of the private server's processes so far (0 without one)."""
    if data_dir is None:
        return 0.0
    postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == postmaster or int(fields[1]) == postmaster:
            total += int(fields[11]) + int(fields[12])
    return total / tick


@contextlib.asynccontextmanager
async def fresh_database(admin_dsn: str) -> AsyncIterator[str]:
    name = f"claim_scale_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        yield admin_dsn.rsplit("/", 1)[0] + "/" + name
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def insert(dsn: str, argv: list[str], project: str, n: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(_INSERT, argv, project, n)
        await conn.execute("ANALYZE taskpool_tasks")
    finally:
        await conn.close()


async def wait_for_ends(
    dsn: str, project: str, n: int, procs: list[subprocess.Popen[bytes]], timeout_s: float
) -> tuple[float, bool]:
    """Tasks of `project` per second from its first claim to its `n`th end; if that
    takes longer than `timeout_s`, the rate so far (and True: a partial figure)."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + timeout_s
        partial = False
        while True:
            ends = await conn.fetchval(
                "SELECT count(*) FROM taskpool_tasks WHERE project = $1 AND status = 'succeeded'",
                project,
            )
            if ends >= n:
                break
            if any(proc.poll() is not None for proc in procs):
                raise RuntimeError(f"a node exited after {ends} tasks of {project}")
            if time.monotonic() > deadline:
                partial = True
                break
            await asyncio.sleep(0.05)
        row = await conn.fetchrow(
            "WITH e AS (SELECT e.at, e.to_status FROM taskpool_events e"
            " JOIN taskpool_tasks t ON t.id = e.task_id WHERE t.project = $1)"
            " SELECT (SELECT min(at) FROM e WHERE to_status = 'running') AS first,"
            " (SELECT at FROM e WHERE to_status = 'succeeded' ORDER BY at OFFSET $2 - 1 LIMIT 1)"
            " AS nth, extract(epoch FROM clock_timestamp())::float8 AS now",
            project,
            max(1, min(n, ends)),
        )
        if partial:
            return ends / (row["now"] - row["first"]), True
        return n / (row["nth"] - row["first"]), False
    finally:
        await conn.close()


# -- the scenarios ----------------------------------------------------------------------


async def backlog_run(src: str, admin: str, waiting: int, n: int) -> Json:
    async with fresh_database(admin) as dsn:
        await asyncio.to_thread(lambda: child(src, "_migrate", dsn).wait())
        await insert(dsn, ["true"], "default", waiting)
        with nodes(src, dsn, 1, 8, {}) as procs:
            rate, partial = await wait_for_ends(dsn, "default", n, procs, CAP_S)
    return {"waiting": waiting, "tasks_per_s": round(rate, 1), "partial": partial}


async def blocked_run(src: str, admin: str, blocked: int, n: int) -> Json:
    async with fresh_database(admin) as dsn:
        await asyncio.to_thread(lambda: child(src, "_migrate", dsn).wait())
        await insert(dsn, ["sleep", "600"], "blocked", blocked)
        await insert(dsn, ["true"], "free", n)
        with nodes(src, dsn, 1, 8, {"blocked": 1}) as procs:
            rate, partial = await wait_for_ends(dsn, "free", n, procs, CAP_S)
    return {"blocked_ahead": blocked, "tasks_per_s": round(rate, 1), "partial": partial}


async def nodes_run(src: str, admin: str, count: int, n: int, data_dir: Path | None) -> Json:
    async with fresh_database(admin) as dsn:
        await asyncio.to_thread(lambda: child(src, "_migrate", dsn).wait())
        with nodes(src, dsn, count, 4, {}) as procs:
            cpu_before = server_cpu_s(data_dir)
            await insert(dsn, ["true"], "default", n)
            rate, partial = await wait_for_ends(dsn, "default", n, procs, CAP_S)
            cpu = server_cpu_s(data_dir) - cpu_before
    return {
        "nodes": count,
        "tasks_per_s": round(rate, 1),
        "partial": partial,
        "db_cpu_ms_per_task": round(1000 * cpu / n, 3) if data_dir and not partial else None,
    }


async def measure(args: argparse.Namespace, admin: str, data_dir: Path | None) -> Json:
    impls = dict(spec.split("=", 1) for spec in args.impl)
    if args.base:
        impls = {"base": args.base, **impls}
    impls.setdefault("new", str(ROOT))
    n = 300 if args.quick else 1000
    big = 20_000 if args.quick else 100_000
    blocked = 10_000 if args.quick else 50_000
    node_counts = [int(c) for c in args.nodes.split(",")]
    results: Json = {label: {"backlog": [], "blocked": [], "nodes": []} for label in impls}
    wanted = set(args.only.split(",")) if args.only else {"backlog", "blocked", "nodes"}
    for rep in range(args.repeats):
        for label, src in impls.items():  # interleaved: each round runs every impl
            out = results[label]
            if "backlog" in wanted:
                for waiting in (n, 10_000, big):
                    progress(f"{label} rep {rep}: backlog {waiting}")
                    out["backlog"].append(await backlog_run(src, admin, waiting, n))
            if "blocked" in wanted:
                for ahead in (1, blocked):
                    progress(f"{label} rep {rep}: blocked ahead {ahead}")
                    out["blocked"].append(await blocked_run(src, admin, ahead, n))
            if "nodes" in wanted:
                for count in node_counts:
                    progress(f"{label} rep {rep}: {count} nodes")
                    out["nodes"].append(await nodes_run(src, admin, count, n, data_dir))
    return {label: summarize(out) for label, out in results.items()} | {"impls": impls}


def summarize(out: Json) -> Json:
    """Medians per setting, and the ratios the issue's goals are stated in."""

    def medians(runs: list[Json], key: str) -> dict[int, float]:
        by: dict[int, list[float]] = {}
        for run in runs:
            by.setdefault(run[key], []).append(run["tasks_per_s"])
        return {k: statistics.median(v) for k, v in sorted(by.items())}

    summary: Json = {"runs": out}
    if out["backlog"]:
        rates = medians(out["backlog"], "waiting")
        low = min(rates)
        summary["backlog_tasks_per_s"] = rates
        summary["backlog_ratio_vs_smallest"] = {
            k: round(v / rates[low], 3) for k, v in rates.items()
        }
    if out["blocked"]:
        rates = medians(out["blocked"], "blocked_ahead")
        summary["blocked_tasks_per_s"] = rates
        summary["blocked_ratio"] = round(rates[max(rates)] / rates[min(rates)], 3)
    if out["nodes"]:
        rates = medians(out["nodes"], "nodes")
        summary["nodes_tasks_per_s"] = rates
        one = min(rates)
        summary["nodes_ratio_vs_one"] = {k: round(v / rates[one], 3) for k, v in rates.items()}
        cpu: dict[int, list[float]] = {}
        for run in out["nodes"]:
            if run["db_cpu_ms_per_task"] is not None:
                cpu.setdefault(run["nodes"], []).append(run["db_cpu_ms_per_task"])
        summary["db_cpu_ms_per_task"] = {k: statistics.median(v) for k, v in sorted(cpu.items())}
    return summary


async def main_async(args: argparse.Namespace) -> Json:
    if args.pg_dsn:
        return await measure(args, args.pg_dsn, None)
    sys.path.insert(0, str(ROOT))
    from tests.pg_cluster import private_cluster

    # The settings of a small dedicated server; fsync stays on, as in production.
    with private_cluster({"max_connections": "200", "shared_buffers": "256MB"}) as cluster:
        return await measure(args, cluster.dsn, cluster.data)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_node":
        asyncio.run(run_node(sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_migrate":
        asyncio.run(migrate(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="a directory holding the baseline's taskpool package")
    parser.add_argument("--impl", action="append", default=[], help="LABEL=SRC, repeatable")
    parser.add_argument("--only", help="comma-separated: backlog, blocked, nodes")
    parser.add_argument("--nodes", default="1,2,4", help="node counts (4 slots each)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pg-dsn", help="use this server (CREATE DATABASE rights) instead")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main_async(args)), indent=1))


if __name__ == "__main__":
    main()
