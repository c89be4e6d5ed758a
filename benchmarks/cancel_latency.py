"""The `cancel` section of bench.py: how soon a cancel from another store handle
reaches the running task, on both stores, beside the heartbeat-only baseline.

Latency is "cancel written -> SIGTERM received": from just before `Client.cancel`
(a store handle of its own, as the CLI or a web page would use) to the instant the
task's own SIGTERM handler runs and writes `time.time()` to a file. So it includes
the cancel's own write (SQLite fsyncs a cancel before it returns), reported apart as
`cancel_call`. The pool runs with its default lease (30 s, heartbeat every 10 s). The
baseline is the same measurement with the pool's store's cancel watch disabled (its
`watch_for_cancels` is the default that never calls): only the heartbeat delivers.

Each round starts `ROUND` tasks, waits until every one is ready, then cancels them one
after another, a random 10-60 ms apart (none waits for the previous delivery).

`idle_cpu` measures what the watcher costs an idle pool: the bench process's CPU
time over a window with no task, with the watcher and without, interleaved; and per
call, the cost of the SQLite change checks considered (PRAGMA data_version on the
event loop, the same through a thread, stat() of the -wal file).
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from bench_common import (
    SAFETY_TIMEOUT_S,
    Config,
    Json,
    connect_raw,
    fresh_pg_database,
    new_db,
    poll_until,
    progress,
    summary_ms,
)

from taskpool import Client, Status, Store, TaskPool
from taskpool.stores import open_store

#: Tasks running at once in a round, each cancelled once.
ROUND = 10

#: The task: note that it is ready, then sleep until SIGTERM, whose handler writes the
#: time it ran (the measurement's end) and exits.
TASK = """
import signal, sys, time
def on_term(*_):
    at = time.time()
    with open(sys.argv[2], "w") as f:
        f.write(repr(at))
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(sys.argv[1], "w").close()
time.sleep(600)
"""


def deafened(store: Store) -> Store:
    """The store with its cancel watch disabled: the heartbeat-only baseline."""

    async def never(node_id: str, on_cancel: Callable[[], None]) -> None:
        await Store.watch_for_cancels(store, node_id, on_cancel)  # never calls

    store.watch_for_cancels = never  # type: ignore[method-assign]
    return store


async def cancel_rounds(location: str, workdir: Path, *, push: bool, n: int) -> Json:
    """Cancel `n` running tasks through a second handle; latencies and the cancel calls."""
    await asyncio.to_thread(workdir.mkdir, exist_ok=True)
    store = open_store(location)
    if not push:
        store = deafened(store)
    latencies: list[float] = []
    calls: list[float] = []
    rng = random.Random(7)
    async with store, TaskPool(store, max_parallel=ROUND) as pool, Client(location) as client:
        for round_no in range(-(-n // ROUND)):
            size = min(ROUND, n - round_no * ROUND)
            files = [
                (workdir / f"r{round_no}-{i}.ready", workdir / f"r{round_no}-{i}.term")
                for i in range(size)
            ]
            tasks = [
                await pool.submit([sys.executable, "-c", TASK, str(ready), str(term)])
                for ready, term in files
            ]

            async def all_ready(files: list[tuple[Path, Path]] = files) -> bool | None:
                return True if all(ready.exists() for ready, _ in files) else None

            await poll_until(all_ready, interval_s=0.01, what="tasks ready")
            written: list[float] = []
            for task in tasks:
                await asyncio.sleep(rng.uniform(0.01, 0.06))
                before = time.time()
                await client.cancel(task)
                calls.append(time.time() - before)
                written.append(before)

            async def all_terminated(files: list[tuple[Path, Path]] = files) -> bool | None:
                return True if all(term.exists() for _, term in files) else None

            await poll_until(all_terminated, interval_s=0.01, what="SIGTERM received")
            for (_, term), at in zip(files, written, strict=True):
                latencies.append(float(term.read_text()) - at)
            for task in tasks:
                info = await asyncio.wait_for(pool.wait(task), SAFETY_TIMEOUT_S)
                if info.status is not Status.CANCELLED:
                    raise RuntimeError(f"task {task} ended {info.status}: {info.reason}")
    return {"to_sigterm": summary_ms(latencies), "cancel_call": summary_ms(calls)}


async def idle_cpu_s(location: str, *, push: bool, window_s: float) -> float:
    """CPU seconds the bench process spends over `window_s` with an idle pool."""
    store = open_store(location)
    if not push:
        store = deafened(store)
    async with store, TaskPool(store):
        await asyncio.sleep(1.0)  # past the start
        before = time.process_time()
        await asyncio.sleep(window_s)
        spent = time.process_time() - before
    return spent


async def idle_cost(location: str, *, window_s: float, repeats: int) -> Json:
    """Idle CPU with and without the watcher, interleaved; the difference per hour."""
    with_watch: list[float] = []
    without: list[float] = []
    for _ in range(repeats):
        with_watch.append(await idle_cpu_s(location, push=True, window_s=window_s))
        without.append(await idle_cpu_s(location, push=False, window_s=window_s))
    per_hour = 3600 / window_s / repeats
    return {
        "window_s": window_s,
        "repeats": repeats,
        "cpu_s_per_hour_with_watch": round(sum(with_watch) / repeats * per_hour, 2),
        "cpu_s_per_hour_heartbeat_only": round(sum(without) / repeats * per_hour, 2),
        "watch_cost_cpu_s_per_hour": round(
            (sum(with_watch) - sum(without)) / repeats * per_hour, 2
        ),
    }


def sqlite_check_costs(workdir: Path, n: int) -> Json:
    """CPU microseconds per call of each SQLite change check considered."""
    path = new_db(workdir, "checks")
    writer = connect_raw(path)
    writer.execute("CREATE TABLE t (x)")
    writer.execute("INSERT INTO t VALUES (1)")
    reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    wal = f"{path}-wal"

    def per_call_us(fn: Callable[[], object]) -> float:
        before = time.process_time()
        for _ in range(n):
            fn()
        return round((time.process_time() - before) / n * 1e6, 2)

    result = {
        "data_version_us": per_call_us(lambda: reader.execute("PRAGMA data_version").fetchone()),
        "stat_wal_us": per_call_us(lambda: os.stat(wal)),
    }

    async def through_thread() -> float:
        loop = asyncio.get_running_loop()
        before = time.process_time()
        for _ in range(n // 10):
            await loop.run_in_executor(
                None, lambda: reader.execute("PRAGMA data_version").fetchone()
            )
        return round((time.process_time() - before) / (n // 10) * 1e6, 2)

    result["data_version_through_thread_us"] = asyncio.run(through_thread())
    reader.close()
    writer.close()
    return result


@asynccontextmanager
async def stores(cfg: Config, workdir: Path) -> AsyncIterator[dict[str, str]]:
    async with fresh_pg_database(cfg.pg_dsn) as dsn:
        yield {"sqlite": str(new_db(workdir, "cancel")), "postgres": dsn}


async def bench_cancel(cfg: Config, workdir: Path) -> Json:
    n = 20 if cfg.quick else 50
    window_s, repeats = (10.0, 1) if cfg.quick else (30.0, 2)
    result: Json = {"cancels_per_mode": n, "tasks_at_once": ROUND}
    checks = await asyncio.to_thread(sqlite_check_costs, workdir, 20_000)
    result["sqlite_check_cpu_per_call"] = checks
    async with stores(cfg, workdir) as locations:
        for name, location in locations.items():
            if name not in cfg.stores:
                continue
            progress(f"cancel: {name}, watcher on")
            push = await cancel_rounds(location, workdir / f"{name}-push", push=True, n=n)
            progress(f"cancel: {name}, heartbeat only")
            beat = await cancel_rounds(location, workdir / f"{name}-beat", push=False, n=n)
            progress(f"cancel: {name}, idle cost")
            idle = await idle_cost(location, window_s=window_s, repeats=repeats)
            result[name] = {
                "watcher": push,
                "heartbeat_only": beat,
                "p99_ratio_heartbeat_over_watcher": round(
                    beat["to_sigterm"]["p99_ms"] / push["to_sigterm"]["p99_ms"], 1
                ),
                "idle_cpu": idle,
            }
    return result
