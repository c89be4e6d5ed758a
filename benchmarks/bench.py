"""taskpool benchmarks, each figure beside a raw baseline measured in the same run.

Run: `.venv/bin/python benchmarks/bench.py [--quick] [--only NAME]`. One JSON
object goes to stdout, progress to stderr. See benchmarks/README.md for what
each figure means and how it is timed.

Sections (`--only` takes one of these names):

- `store_commit`: a raw sqlite3 INSERT + COMMIT loop vs `SQLiteStore.submit`,
  awaited one by one and concurrently (group commit), for each durability setting.
- `throughput`: `true` tasks through a TaskPool vs a bare asyncio subprocess loop.
- `kill_to_slot_free`: SIGKILL a running task; how soon its end is recorded and
  the next queued task's process starts, vs the same with bare asyncio.
- `first_start_with_backlog`: boot to first process start with 100,000 waiting
  tasks vs 1,000, and the pool process's RSS growth while doing it.
- `containment`: the throughput run three ways in one run, interleaved: the bare
  asyncio loop, the pool with a cgroup per task (made, joined before exec, killed
  and removed for each one), and the pool with process groups only; the figure is
  the ratio cgroup / process-group.
- `postgres`: the PostgreSQL store (server from `--pg-dsn`), each measurement on a
  fresh throwaway database: a raw asyncpg INSERT transaction loop vs
  `PostgresStore.submit` (sequential and concurrent); `true` tasks through
  `TaskPool(PostgresStore(dsn), max_parallel=4)` vs the bare asyncio loop; and the
  same tasks through two pools (nodes) sharing one database.
- `cancel` (cancel_latency.py): cancel written by another store handle -> SIGTERM
  received by the task, p50/p99 on SQLite and PostgreSQL, with the pool's cancel
  watcher and heartbeat-only (the watcher disabled) in the same run; the watcher's
  CPU cost on an idle pool.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import resource
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path

import cancel_latency  # beside this file
import pg_compare  # beside this file
import psutil
import scale  # beside this file
from bench_common import (  # beside this file
    DEFAULT_PG_DSN,
    SAFETY_TIMEOUT_S,
    TERMINAL,
    Config,
    Json,
    bare_asyncio_run,
    connect_raw,
    fresh_pg_database,
    new_db,
    per_s,
    poll_until,
    progress,
    summary_ms,
)

from taskpool import SQLiteStore, Status, TaskPool, TaskSpec

#: Imported from here by submit_many.py.
__all__ = ["DEFAULT_PG_DSN", "fresh_pg_database", "main"]

SECTIONS = (
    "store_commit",
    "throughput",
    "kill_to_slot_free",
    "first_start_with_backlog",
    "containment",
    "postgres",
    "backlog",
    "blocked_ahead",
    "waiters",
    "submit_many",
    "nodes",
    "pgqueuer",
    "cancel",
)
#: Store durability settings compared: the default (submits fsynced at once, the pool's
#: own writes within 0.1 s) and an fsync on every commit. A submit is fsynced in both,
#: so the raw sqlite3 baseline of `store_commit` is synchronous=FULL in both.
SYNC_MODES = ("default", "fsync_every_commit")
FSYNC_INTERVAL_S = {"default": 0.1, "fsync_every_commit": 0.0}
RAW_SYNCHRONOUS = {"default": "FULL", "fsync_every_commit": "FULL"}
SCRIPT = str(Path(__file__).resolve())
#: `max_parallel` of the single pool in `postgres.throughput` (and the baseline's
#: semaphore), and of each of the two pools in `postgres.two_nodes` (4 slots in all).
PG_CONCURRENCY = 4
PG_NODE_PARALLEL = 2


# -- store commit cost -----------------------------------------------------------


def raw_commit_loop(path: Path, synchronous: str, n: int) -> float:
    """Seconds for `n` transactions of one INSERT + COMMIT each (WAL, given synchronous)."""
    conn = connect_raw(path, synchronous)
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        start = time.perf_counter()
        for i in range(n):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (v) VALUES (?)", (f"row {i}",))
            conn.execute("COMMIT")
        return time.perf_counter() - start
    finally:
        conn.close()


async def bench_store_commit(cfg: Config, workdir: Path) -> Json:
    spec = TaskSpec.build(["true"])
    out: Json = {
        "what": (
            "raw: one INSERT + COMMIT per transaction on a plain sqlite3 connection (WAL, same"
            " synchronous), in the calling thread; store_sequential: SQLiteStore.submit awaited"
            " one at a time (one transaction each: task row + event, in a worker thread);"
            " store_concurrent: that many submits started at once (group-committed)"
        ),
        "modes": {},
    }
    for sync in SYNC_MODES:
        progress(f"store_commit {sync}: raw loop of {cfg.commit_loop_n} commits")
        raw_s = raw_commit_loop(
            new_db(workdir, f"raw-{sync}"), RAW_SYNCHRONOUS[sync], cfg.commit_loop_n
        )

        progress(f"store_commit {sync}: {cfg.commit_loop_n} sequential store.submit")
        store = SQLiteStore(
            new_db(workdir, f"store-seq-{sync}"), fsync_interval_s=FSYNC_INTERVAL_S[sync]
        )
        await store.open()
        try:
            start = time.perf_counter()
            for _ in range(cfg.commit_loop_n):
                await store.submit(spec)
            seq_s = time.perf_counter() - start
        finally:
            await store.close()

        progress(f"store_commit {sync}: {cfg.submit_concurrent_n} concurrent store.submit")
        store = SQLiteStore(
            new_db(workdir, f"store-conc-{sync}"), fsync_interval_s=FSYNC_INTERVAL_S[sync]
        )
        await store.open()
        try:
            start = time.perf_counter()
            await asyncio.gather(*(store.submit(spec) for _ in range(cfg.submit_concurrent_n)))
            conc_s = time.perf_counter() - start
        finally:
            await store.close()

        raw_rate = per_s(cfg.commit_loop_n, raw_s)
        seq_rate = per_s(cfg.commit_loop_n, seq_s)
        out["modes"][sync] = {
            "raw_commits_per_s": raw_rate,
            "raw_commit_ms": round(raw_s / cfg.commit_loop_n * 1000, 3),
            "store_sequential_submits_per_s": seq_rate,
            "store_sequential_submit_ms": round(seq_s / cfg.commit_loop_n * 1000, 3),
            "store_sequential_vs_raw": round(seq_rate / raw_rate, 3),
            "store_concurrent_submits_per_s": per_s(cfg.submit_concurrent_n, conc_s),
            "store_concurrent_n": cfg.submit_concurrent_n,
        }
    return out


# -- throughput --------------------------------------------------------------------


async def pool_run(
    path: Path,
    mode: str,
    n: int,
    concurrency: int,
    containment: str = "auto",
    guard: bool = True,
) -> Json:
    """Submit n `true` tasks, then run them all through a fresh pool; return timings."""
    spec = TaskSpec.build(["true"])
    store = SQLiteStore(path, fsync_interval_s=FSYNC_INTERVAL_S[mode])
    await store.open()
    try:
        start = time.perf_counter()
        await asyncio.gather(*(store.submit(spec) for _ in range(n)))
        submit_s = time.perf_counter() - start

        not_done = [Status.WAITING, Status.RUNNING]
        boot = time.time()
        async with TaskPool(
            store, max_parallel=concurrency, containment=containment, guard=guard
        ) as pool:

            async def all_done() -> bool | None:
                return True if not await pool.list_tasks(statuses=not_done, limit=1) else None

            await poll_until(all_done, interval_s=0.01, what="all tasks terminal")
            seen_done = time.time()
    finally:
        await store.close()

    conn = connect_raw(path)
    try:
        (first_claim,) = conn.execute(
            "SELECT MIN(at) FROM events WHERE to_status = 'running'"
        ).fetchone()
        (last_end,) = conn.execute(
            "SELECT MAX(at) FROM events WHERE to_status IN (SELECT value FROM json_each(?))",
            (json.dumps(TERMINAL),),
        ).fetchone()
        (succeeded,) = conn.execute(
            "SELECT COUNT(*) FROM tasks WHERE status = 'succeeded'"
        ).fetchone()
    finally:
        conn.close()
    if succeeded != n:
        raise RuntimeError(f"only {succeeded} of {n} tasks succeeded")
    return {
        "submit_s": submit_s,
        "boot_to_first_claim_s": first_claim - boot,
        "run_s": last_end - first_claim,
        "wall_s": seen_done - boot,
    }


async def bench_throughput(cfg: Config, workdir: Path) -> Json:
    n, c, reps = cfg.throughput_tasks, cfg.concurrency, cfg.throughput_repeats
    out: Json = {
        "tasks": n,
        "concurrency": c,
        "repeats": reps,
        "what": (
            "pool_tasks_per_s = tasks / (last terminal event .at - first 'running' event .at),"
            " i.e. first claim to all terminal, read from the events table after the run; all"
            " tasks were submitted (concurrently, group-committed) before the pool started."
            " pool_wall_tasks_per_s = tasks / (entering `async with TaskPool` to all terminal"
            " seen by a 10 ms poll), so it includes boot and polling lag. baseline ="
            " asyncio.create_subprocess_exec('true', stdout=PIPE, stderr=STDOUT) +"
            " communicate() bounded by asyncio.Semaphore(concurrency), in the same process."
            " Baseline and pool runs alternate `repeats` times per mode (fresh db each pool"
            " run); rates are the best of the repeats (least disturbed by other load), ratio ="
            " best pool / best baseline, paired_ratios = pool / the baseline run just before it."
        ),
        "target_ratio": 0.70,
        "modes": {},
    }
    for sync in SYNC_MODES:
        base_rates: list[float] = []
        runs: list[Json] = []
        for rep in range(reps):
            progress(f"throughput {sync} #{rep + 1}: bare asyncio baseline, {n} x true at {c}")
            base_rates.append(per_s(n, await bare_asyncio_run(n, c)))
            progress(f"throughput {sync} #{rep + 1}: pool, {n} x true at {c}")
            runs.append(await pool_run(new_db(workdir, f"throughput-{sync}-{rep}"), sync, n, c))
            progress(
                f"throughput {sync} #{rep + 1}: pool {per_s(n, runs[-1]['run_s'])}/s,"
                f" baseline {base_rates[-1]}/s"
            )
        pool_rates = [per_s(n, r["run_s"]) for r in runs]
        ratio = round(max(pool_rates) / max(base_rates), 3)
        out["modes"][sync] = {
            "submit_s": round(min(r["submit_s"] for r in runs), 3),
            "submits_per_s": max(per_s(n, r["submit_s"]) for r in runs),
            "boot_to_first_claim_ms": round(min(r["boot_to_first_claim_s"] for r in runs) * 1e3, 1),
            "pool_tasks_per_s": max(pool_rates),
            "pool_wall_tasks_per_s": max(per_s(n, r["wall_s"]) for r in runs),
            "baseline_tasks_per_s": max(base_rates),
            "ratio": ratio,
            "meets_target": ratio >= out["target_ratio"],
            "all_pool_tasks_per_s": pool_rates,
            "all_baseline_tasks_per_s": base_rates,
            "paired_ratios": [round(p / b, 3) for p, b in zip(pool_rates, base_rates, strict=True)],
        }
    return out


async def bench_containment(cfg: Config, workdir: Path) -> Json:
    n, c, reps = cfg.throughput_tasks, cfg.concurrency, cfg.throughput_repeats
    variants = {  # name -> (containment, guard)
        "cgroup": ("cgroup", True),
        "process-group": ("process-group", True),
        "cgroup-no-guard": ("cgroup", False),
        "process-group-no-guard": ("process-group", False),
    }
    rates: dict[str, list[float]] = {"baseline": [], **{m: [] for m in variants}}
    for rep in range(reps):
        progress(f"containment #{rep + 1}: bare asyncio baseline, {n} x true at {c}")
        rates["baseline"].append(per_s(n, await bare_asyncio_run(n, c)))
        for name, (mode, guard) in variants.items():
            progress(f"containment #{rep + 1}: pool, {name}")
            db = new_db(workdir, f"containment-{name}-{rep}")
            run = await pool_run(db, "default", n, c, mode, guard)
            rates[name].append(per_s(n, run["run_s"]))
    best = {name: max(values) for name, values in rates.items()}
    return {
        "tasks": n,
        "concurrency": c,
        "repeats": reps,
        "what": (
            "tasks/s from first claim to last terminal event, best of the repeats, all runs"
            " interleaved; cgroup mode makes, joins (a /bin/sh wrapper before exec), kills"
            " and removes a cgroup per task; the guard process is on unless said"
            " (no-guard); ratio = cgroup / process-group, both with the guard"
        ),
        "tasks_per_s": best,
        "all_tasks_per_s": rates,
        "ratio_cgroup_to_process_group": round(best["cgroup"] / best["process-group"], 3),
        "ratio_cgroup_to_baseline": round(best["cgroup"] / best["baseline"], 3),
        "ratio_process_group_to_baseline": round(best["process-group"] / best["baseline"], 3),
        "ratio_guard_cost_cgroup": round(best["cgroup"] / best["cgroup-no-guard"], 3),
        "ratio_guard_cost_process_group": round(
            best["process-group"] / best["process-group-no-guard"], 3
        ),
    }


# -- kill to slot free -----------------------------------------------------------------


class RowWatcher:
    """Polls two task rows from its own connection and thread, noting when states appear.

    Records time.time() of the first poll that sees task `a` terminal and the first
    that sees task `b` with a recorded pid (or terminal): commit visibility to a reader.
    """

    def __init__(self, path: Path, a: int, b: int, interval_s: float = 0.001) -> None:
        self._conn = connect_raw(path)
        self._a, self._b = a, b
        self._interval_s = interval_s
        self.a_terminal_at: float | None = None
        self.b_started_at: float | None = None
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="row watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self.ready.wait(5)

    def _run(self) -> None:
        deadline = time.monotonic() + SAFETY_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                rows = self._conn.execute(
                    "SELECT id, status, pid FROM tasks WHERE id IN (?, ?)", (self._a, self._b)
                ).fetchall()
                now = time.time()
                self.ready.set()
                for task_id, status, pid in rows:
                    if task_id == self._a and self.a_terminal_at is None and status in TERMINAL:
                        self.a_terminal_at = now
                    started = pid is not None or status in TERMINAL
                    if task_id == self._b and self.b_started_at is None and started:
                        self.b_started_at = now
                if self.a_terminal_at is not None and self.b_started_at is not None:
                    return
                time.sleep(self._interval_s)
        finally:
            self.ready.set()
            self._conn.close()

    async def join(self) -> None:
        await asyncio.to_thread(self._thread.join)


async def bare_kill_round() -> tuple[float, float]:
    """Bare asyncio: SIGKILL a running `sleep 600`; seconds until it is reaped (pipe at EOF)
    and until the next `true` has been spawned."""
    pipe, stdout = asyncio.subprocess.PIPE, asyncio.subprocess.STDOUT
    a = await asyncio.create_subprocess_exec("sleep", "600", stdout=pipe, stderr=stdout)
    await asyncio.sleep(0.002)  # let it exec
    start = time.perf_counter()
    os.kill(a.pid, signal.SIGKILL)
    await a.communicate()
    reaped = time.perf_counter()
    b = await asyncio.create_subprocess_exec("true", stdout=pipe, stderr=stdout)
    spawned = time.perf_counter()
    await b.communicate()
    return reaped - start, spawned - start


async def bench_kill_to_slot_free(cfg: Config, workdir: Path) -> Json:
    rounds = cfg.kill_rounds
    path = new_db(workdir, "kill")
    a_end_event: list[float] = []
    a_end_seen: list[float] = []
    b_claim_event: list[float] = []
    b_start_seen: list[float] = []
    progress(f"kill_to_slot_free: {rounds} rounds through a pool (max_parallel=1, FULL)")
    async with TaskPool(
        path, max_parallel=1, poll_interval_s=1.0, shutdown_drain_s=1.0, kill_grace_s=1.0
    ) as pool:
        for _ in range(rounds):
            a = await pool.submit(["sleep", "600"])
            b = await pool.submit(["true"])

            async def a_pid(a: int = a) -> int | None:
                info = await pool.get(a)
                if info.is_terminal:
                    raise RuntimeError(f"task {a} ended before it was killed: {info.reason}")
                return info.pid

            pid = await poll_until(a_pid, interval_s=0.001, what=f"task {a}'s pid")
            watcher = RowWatcher(path, a, b)
            watcher.start()
            t0 = time.time()
            os.kill(pid, signal.SIGKILL)
            await watcher.join()
            b_info = await pool.wait(b, timeout_s=SAFETY_TIMEOUT_S)
            if b_info.status is not Status.SUCCEEDED:
                raise RuntimeError(f"task {b} did not succeed: {b_info.reason}")
            if watcher.a_terminal_at is None or watcher.b_started_at is None:
                raise RuntimeError("the row watcher timed out")
            a_events, b_events = await pool.events(a), await pool.events(b)
            a_end = next(e.at for e in a_events if e.to_status.is_terminal)
            b_claim = next(e.at for e in b_events if e.to_status is Status.RUNNING)
            a_end_event.append(a_end - t0)
            a_end_seen.append(watcher.a_terminal_at - t0)
            b_claim_event.append(b_claim - t0)
            b_start_seen.append(watcher.b_started_at - t0)

    progress(f"kill_to_slot_free: {rounds} rounds with bare asyncio")
    bare = [await bare_kill_round() for _ in range(rounds)]
    pool_terminal = summary_ms(a_end_event)
    pool_next = summary_ms(b_start_seen)
    return {
        "rounds": rounds,
        "what": (
            "t0 = time.time() just before os.kill(A's recorded pid, SIGKILL). (i) A terminal:"
            " the .at of A's terminal event (taken inside the finishing transaction, just before"
            " its commit); 'visible' = first 1 ms poll of the tasks row, from another connection"
            " and thread, that sees it. (ii) B started: B's pid recorded in its tasks row as"
            " seen by the same poll (B's claim event .at shown too). Baseline: bare asyncio,"
            " SIGKILL a `sleep 600` child, time until communicate() returns (reaped) and until"
            " the next `true` has been spawned."
        ),
        "target_p99_ms": 100,
        "a_terminal": pool_terminal,
        "a_terminal_visible": summary_ms(a_end_seen),
        "b_claimed": summary_ms(b_claim_event),
        "b_started": pool_next,
        "meets_target": pool_terminal["p99_ms"] < 100 and pool_next["p99_ms"] < 100,
        "baseline_reaped": summary_ms([r[0] for r in bare]),
        "baseline_next_spawned": summary_ms([r[1] for r in bare]),
    }


# -- first start with a backlog ------------------------------------------------------------


def fill_backlog(path: Path, n: int) -> float:
    """Insert n waiting `true` tasks into a migrated store, in one transaction with direct
    SQL (the rows SQLiteStore.submit writes, minus task_locks rows, which tasks without
    locks do not have; the schema's trigger logs each 'submitted' event). Returns seconds
    taken."""
    start = time.perf_counter()
    conn = connect_raw(path)
    try:
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO tasks (id, status, argv, project, locks, submitted_at, reason,"
            " changed_at) VALUES (?, 'waiting', '[\"true\"]', 'default', '[]', ?, 'submitted', ?)",
            ((i, now, now) for i in range(1, n + 1)),
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return time.perf_counter() - start


async def backlog_child(path: Path) -> Json:
    """In a fresh process: boot a pool on `path`, wait for task 1's process, report."""
    me = psutil.Process()
    peak = [me.memory_info().rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            time.sleep(0.001)

    rss_before = me.memory_info().rss
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sampler = threading.Thread(target=sample, name="rss sampler", daemon=True)
    sampler.start()
    boot = time.time()
    async with TaskPool(path, max_parallel=4, shutdown_drain_s=5.0) as pool:
        entered = time.time()

        async def first_pid() -> float | None:
            info = await pool.get(1)
            return time.time() if info.pid is not None or info.is_terminal else None

        pid_seen = await poll_until(first_pid, interval_s=0.001, what="task 1's process")
        stop.set()
        sampler.join()
        maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        first_running = next(e.at for e in await pool.events(1) if e.to_status is Status.RUNNING)
    return {
        "boot_to_entered_s": entered - boot,
        "boot_to_first_running_event_s": first_running - boot,
        "boot_to_first_pid_seen_s": pid_seen - boot,
        "rss_before_mb": rss_before / 2**20,
        "rss_peak_growth_mb": (peak[0] - rss_before) / 2**20,
        "maxrss_growth_mb": (maxrss_after - maxrss_before) / 1024,  # ru_maxrss is KiB on Linux
    }


async def run_backlog_child(template: Path, workdir: Path, label: str) -> Json:
    """Copy the prepared database and measure a pool booting on it in a fresh process."""
    db = new_db(workdir, f"backlog-run-{label}")
    shutil.copyfile(template, db)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        SCRIPT,
        "--backlog-child",
        str(db),
        stdout=asyncio.subprocess.PIPE,
    )
    stdout, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"backlog child exited with {proc.returncode}")
    result: Json = json.loads(stdout)
    return result


def _median_of(runs: list[Json], key: str, scale: float = 1.0, digits: int = 1) -> float:
    return round(float(statistics.median(r[key] for r in runs)) * scale, digits)


async def bench_first_start_with_backlog(cfg: Config, workdir: Path) -> Json:
    out: Json = {
        "what": (
            "Each measurement is a fresh Python process (imports done before timing) booting"
            " `async with TaskPool(db, max_parallel=4)` on a copy of a prepared database whose"
            " N waiting tasks were inserted with direct SQL (tasks + events rows, one"
            " transaction, WAL checkpointed). boot_to_first_running_ms: entering `async with`"
            " to the .at of task 1's 'running' (claim) event; boot_to_first_pid_ms: to a 1 ms"
            " poll seeing task 1's pid recorded (its process started). rss_peak_growth_mb:"
            " peak RSS (sampled every 1 ms) minus RSS just before entering, until that pid is"
            " seen; maxrss_growth_mb: the same from getrusage ru_maxrss. Medians of"
            f" {cfg.backlog_repeats} run(s); the {cfg.backlog_small}-task backlog is the"
            " baseline."
        ),
        "target_first_start_ms": 1000,
        "backlogs": {},
    }
    for n in (cfg.backlog_small, cfg.backlog_big):
        template = new_db(workdir, f"backlog-{n}")
        progress(f"first_start_with_backlog: inserting {n} waiting tasks")
        schema = SQLiteStore(template)
        await schema.open()  # creates and migrates the schema
        await schema.close()
        insert_s = await asyncio.to_thread(fill_backlog, template, n)
        runs = []
        for i in range(cfg.backlog_repeats):
            progress(f"first_start_with_backlog: boot with {n} waiting, run {i + 1}")
            runs.append(await run_backlog_child(template, workdir, f"{n}-{i}"))
        out["backlogs"][str(n)] = {
            "insert_s": round(insert_s, 3),
            "boot_to_entered_ms": _median_of(runs, "boot_to_entered_s", 1000),
            "boot_to_first_running_ms": _median_of(runs, "boot_to_first_running_event_s", 1000),
            "boot_to_first_pid_ms": _median_of(runs, "boot_to_first_pid_seen_s", 1000),
            "rss_before_mb": _median_of(runs, "rss_before_mb", digits=2),
            "rss_peak_growth_mb": _median_of(runs, "rss_peak_growth_mb", digits=2),
            "maxrss_growth_mb": _median_of(runs, "maxrss_growth_mb", digits=2),
            "db_mb": round(template.stat().st_size / 2**20, 1),
        }
    big, small = out["backlogs"][str(cfg.backlog_big)], out["backlogs"][str(cfg.backlog_small)]
    out["rss_growth_big_minus_small_mb"] = round(
        big["rss_peak_growth_mb"] - small["rss_peak_growth_mb"], 2
    )
    out["meets_target"] = (
        big["boot_to_first_pid_ms"] < 1000 and out["rss_growth_big_minus_small_mb"] < 5
    )
    return out


# -- postgres ----------------------------------------------------------------------------


async def pg_server_info(admin_dsn: str) -> Json:
    """The server's version and the settings that decide what a commit costs."""
    import asyncpg

    try:
        conn = await asyncpg.connect(admin_dsn)
    except (OSError, asyncpg.PostgresError) as exc:
        raise RuntimeError(
            f"the postgres section needs a PostgreSQL server (--pg-dsn): {exc!r}"
        ) from exc
    try:
        info: Json = {"server_version": await conn.fetchval("SHOW server_version")}
        for setting in ("fsync", "synchronous_commit", "wal_sync_method"):
            info[setting] = await conn.fetchval(f"SHOW {setting}")
        return info
    finally:
        await conn.close()


async def pg_raw_commit_loop(dsn: str, n: int) -> float:
    """Seconds for `n` transactions of one INSERT each, on one asyncpg connection."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE scratch (id BIGSERIAL PRIMARY KEY, v TEXT NOT NULL)")
        start = time.perf_counter()
        for i in range(n):
            async with conn.transaction():
                await conn.execute("INSERT INTO scratch (v) VALUES ($1)", f"row {i}")
        return time.perf_counter() - start
    finally:
        await conn.close()


async def pg_store_submits(dsn: str, n: int, *, concurrent: bool) -> float:
    """Seconds for `n` PostgresStore.submit calls, awaited one by one or all at once."""
    from taskpool.stores.postgres import PostgresStore

    spec = TaskSpec.build(["true"])
    store = PostgresStore(dsn)
    await store.open()  # creates the schema, untimed
    try:
        start = time.perf_counter()
        if concurrent:
            await asyncio.gather(*(store.submit(spec) for _ in range(n)))
        else:
            for _ in range(n):
                await store.submit(spec)
        return time.perf_counter() - start
    finally:
        await store.close()


async def bench_pg_store_commit(cfg: Config) -> Json:
    n, conc_n = cfg.commit_loop_n, cfg.submit_concurrent_n
    progress(f"postgres store_commit: raw asyncpg loop of {n} INSERT transactions")
    async with fresh_pg_database(cfg.pg_dsn) as dsn:
        raw_s = await pg_raw_commit_loop(dsn, n)
    progress(f"postgres store_commit: {n} sequential PostgresStore.submit")
    async with fresh_pg_database(cfg.pg_dsn) as dsn:
        seq_s = await pg_store_submits(dsn, n, concurrent=False)
    progress(f"postgres store_commit: {conc_n} concurrent PostgresStore.submit")
    async with fresh_pg_database(cfg.pg_dsn) as dsn:
        conc_s = await pg_store_submits(dsn, conc_n, concurrent=True)
    raw_rate, seq_rate = per_s(n, raw_s), per_s(n, seq_s)
    conc_rate = per_s(conc_n, conc_s)
    return {
        "what": (
            "raw: one asyncpg connection, `async with conn.transaction()` around one INSERT"
            " into a scratch table, in a loop (BEGIN, INSERT, COMMIT: three round trips);"
            " store_sequential: PostgresStore.submit awaited one at a time (one transaction"
            " each: task row, its event row by trigger, NOTIFY; a connection from the store's"
            " asyncpg pool); store_concurrent: that many submits started at once with"
            " asyncio.gather (no group commit: one transaction each, up to max_size=10"
            " connections, so up to 10 in flight). Each on a fresh database."
        ),
        "raw_commits_per_s": raw_rate,
        "raw_commit_ms": round(raw_s / n * 1000, 3),
        "store_sequential_submits_per_s": seq_rate,
        "store_sequential_submit_ms": round(seq_s / n * 1000, 3),
        "store_sequential_vs_raw": round(seq_rate / raw_rate, 3),
        "store_concurrent_submits_per_s": conc_rate,
        "store_concurrent_vs_raw": round(conc_rate / raw_rate, 3),
        "store_concurrent_n": conc_n,
    }


async def pg_pool_run(dsn: str, n: int, parallel: Sequence[int]) -> Json:
    """Submit n `true` tasks, then run them through one pool per entry of `parallel`
    (that entry its max_parallel), each pool with a PostgresStore of its own, all in
    this process and on the database `dsn`; return timings and claims per node."""
    import asyncpg

    from taskpool.stores.postgres import PostgresStore

    spec = TaskSpec.build(["true"])
    not_done = [Status.WAITING, Status.RUNNING]
    stores = [PostgresStore(dsn) for _ in parallel]
    node_ids: list[str] = []
    try:
        for store in stores:
            await store.open()
        start = time.perf_counter()
        await asyncio.gather(*(stores[0].submit(spec) for _ in range(n)))
        submit_s = time.perf_counter() - start

        boot = time.time()
        async with AsyncExitStack() as stack:
            pools = [
                await stack.enter_async_context(TaskPool(store, max_parallel=p))
                for store, p in zip(stores, parallel, strict=True)
            ]
            node_ids = [pool.node_id for pool in pools]

            async def all_done() -> bool | None:
                return True if not await pools[0].list_tasks(statuses=not_done, limit=1) else None

            await poll_until(all_done, interval_s=0.01, what="all tasks terminal")
            seen_done = time.time()
    finally:
        for store in stores:
            await store.close()

    conn = await asyncpg.connect(dsn)
    try:
        first_claim: float = await conn.fetchval(
            "SELECT MIN(at) FROM taskpool_events WHERE to_status = 'running'"
        )
        last_end: float = await conn.fetchval(
            "SELECT MAX(at) FROM taskpool_events WHERE to_status = ANY($1::text[])",
            list(TERMINAL),
        )
        succeeded: int = await conn.fetchval(
            "SELECT COUNT(*) FROM taskpool_tasks WHERE status = 'succeeded'"
        )
        claims = dict(
            await conn.fetch(
                "SELECT node_id, COUNT(*) FROM taskpool_events WHERE to_status = 'running'"
                " GROUP BY node_id"
            )
        )
    finally:
        await conn.close()
    if succeeded != n:
        raise RuntimeError(f"only {succeeded} of {n} tasks succeeded")
    return {
        "submit_s": submit_s,
        "boot_to_first_claim_s": first_claim - boot,
        "run_s": last_end - first_claim,
        "wall_s": seen_done - boot,
        "claims_per_node": [int(claims.get(node_id, 0)) for node_id in node_ids],
        "node_ids": node_ids,
    }


async def bench_pg_throughput(cfg: Config) -> tuple[Json, float]:
    """The `throughput` part; also returns the best baseline rate, for `two_nodes`."""
    n, c, reps = cfg.pg_tasks, PG_CONCURRENCY, cfg.pg_repeats
    base_rates: list[float] = []
    runs: list[Json] = []
    for rep in range(reps):
        progress(f"postgres throughput #{rep + 1}: bare asyncio baseline, {n} x true at {c}")
        base_rates.append(per_s(n, await bare_asyncio_run(n, c)))
        progress(f"postgres throughput #{rep + 1}: pool on PostgresStore, {n} x true at {c}")
        async with fresh_pg_database(cfg.pg_dsn) as dsn:
            runs.append(await pg_pool_run(dsn, n, [c]))
        progress(
            f"postgres throughput #{rep + 1}: pool {per_s(n, runs[-1]['run_s'])}/s,"
            f" baseline {base_rates[-1]}/s"
        )
    pool_rates = [per_s(n, r["run_s"]) for r in runs]
    out: Json = {
        "tasks": n,
        "concurrency": c,
        "repeats": reps,
        "what": (
            "As the sqlite `throughput` section, with TaskPool(PostgresStore(dsn),"
            f" max_parallel={c}) on a fresh database per pool run: tasks submitted first"
            " (concurrently), pool_tasks_per_s = tasks / (last terminal event .at - first"
            " 'running' event .at) from taskpool_events (.at is the server's clock),"
            " pool_wall_tasks_per_s = tasks / (entering `async with TaskPool` to a 10 ms"
            " list_tasks poll finding nothing waiting or running). baseline = the bare asyncio"
            f" loop (create_subprocess_exec('true') + communicate(), Semaphore({c})). Runs"
            " alternate baseline, pool; rates are best-of, ratio = best pool / best baseline,"
            " paired_ratios = each pool run / the baseline run just before it."
        ),
        "submit_s": round(min(r["submit_s"] for r in runs), 3),
        "submits_per_s": max(per_s(n, r["submit_s"]) for r in runs),
        "boot_to_first_claim_ms": round(min(r["boot_to_first_claim_s"] for r in runs) * 1e3, 1),
        "pool_tasks_per_s": max(pool_rates),
        "pool_wall_tasks_per_s": max(per_s(n, r["wall_s"]) for r in runs),
        "baseline_tasks_per_s": max(base_rates),
        "ratio": round(max(pool_rates) / max(base_rates), 3),
        "all_pool_tasks_per_s": pool_rates,
        "all_baseline_tasks_per_s": base_rates,
        "paired_ratios": [round(p / b, 3) for p, b in zip(pool_rates, base_rates, strict=True)],
    }
    return out, max(base_rates)


async def bench_pg_two_nodes(cfg: Config, one_pool_rate: float, baseline_rate: float) -> Json:
    n, p = cfg.pg_tasks, PG_NODE_PARALLEL
    progress(f"postgres two_nodes: {n} x true through two pools (max_parallel={p} each)")
    async with fresh_pg_database(cfg.pg_dsn) as dsn:
        run = await pg_pool_run(dsn, n, [p, p])
    rate = per_s(n, run["run_s"])
    per_node: list[int] = run["claims_per_node"]
    if sum(per_node) != n:
        raise RuntimeError(f"claim events per node {per_node} do not add up to {n}")
    progress(f"postgres two_nodes: {rate}/s, tasks per node {per_node}")
    return {
        "tasks": n,
        "nodes": 2,
        "max_parallel_per_node": p,
        "what": (
            f"The same {n} tasks (submitted first) through two TaskPools in this process, each"
            f" with its own PostgresStore on one fresh database, max_parallel={p} each (so"
            f" {2 * p} slots, as the single pool). tasks_per_s as pool_tasks_per_s of"
            " `throughput` (first claim to last terminal, from the events table); wall_tasks_per_s"
            " from entering the first pool; tasks_per_node = 'running' (claim) events per"
            " node_id, in the order the pools were entered (the first boots a few ms earlier)."
            " vs_one_pool = tasks_per_s / best single-pool rate of `throughput`; vs_baseline ="
            f" tasks_per_s / its best bare asyncio rate at {2 * p}."
        ),
        "tasks_per_s": rate,
        "wall_tasks_per_s": per_s(n, run["wall_s"]),
        "tasks_per_node": per_node,
        "vs_one_pool": round(rate / one_pool_rate, 3),
        "vs_baseline": round(rate / baseline_rate, 3),
    }


async def bench_postgres(cfg: Config, workdir: Path) -> Json:
    del workdir  # everything lives in throwaway databases on the server
    out: Json = {"server": await pg_server_info(cfg.pg_dsn)}
    out["store_commit"] = await bench_pg_store_commit(cfg)
    out["throughput"], baseline_rate = await bench_pg_throughput(cfg)
    out["two_nodes"] = await bench_pg_two_nodes(
        cfg, out["throughput"]["pool_tasks_per_s"], baseline_rate
    )
    return out


# -- main --------------------------------------------------------------------------------


BENCHES: dict[str, Callable[[Config, Path], Awaitable[Json]]] = {
    "store_commit": bench_store_commit,
    "throughput": bench_throughput,
    "kill_to_slot_free": bench_kill_to_slot_free,
    "first_start_with_backlog": bench_first_start_with_backlog,
    "containment": bench_containment,
    "postgres": bench_postgres,
    "backlog": scale.bench_backlog,
    "blocked_ahead": scale.bench_blocked_ahead,
    "waiters": scale.bench_waiters,
    "submit_many": scale.bench_submit_many,
    "nodes": pg_compare.bench_nodes,
    "pgqueuer": pg_compare.bench_pgqueuer,
    "cancel": cancel_latency.bench_cancel,
}


async def run_all(cfg: Config, only: str | None) -> Json:
    result: Json = {
        "meta": {
            "quick": cfg.quick,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "sqlite": sqlite3.sqlite_version,
            "workdir": cfg.workdir or tempfile.gettempdir(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        }
    }
    started = time.perf_counter()
    for name in SECTIONS:
        if only is not None and name != only:
            continue
        with tempfile.TemporaryDirectory(prefix=f"taskpool-bench-{name}-", dir=cfg.workdir) as d:
            section_start = time.perf_counter()
            result[name] = await BENCHES[name](cfg, Path(d))
            result[name]["section_s"] = round(time.perf_counter() - section_start, 1)
    result["meta"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["meta"]["total_s"] = round(time.perf_counter() - started, 1)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller runs (about a minute)")
    parser.add_argument("--only", choices=SECTIONS, help="run one section")
    parser.add_argument("--concurrency", type=int, default=4, help="C for throughput (4)")
    parser.add_argument("--dir", help="where temporary databases go (default: system temp)")
    parser.add_argument(
        "--pg-dsn",
        default=DEFAULT_PG_DSN,
        help="PostgreSQL server for the postgres section: a DSN of a database to connect to"
        " for CREATE/DROP DATABASE (default: $TASKPOOL_BENCH_PG_DSN, else the local server)",
    )
    parser.add_argument(
        "--stores",
        default="sqlite,postgres",
        help="the stores the scale sections (backlog, blocked_ahead, waiters, submit_many)"
        " measure, comma-separated (default: sqlite,postgres)",
    )
    parser.add_argument("--backlog-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.backlog_child:
        print(json.dumps(asyncio.run(backlog_child(Path(args.backlog_child)))))
        return 0
    cfg = dataclasses.replace(
        Config.make(
            quick=args.quick, concurrency=args.concurrency, workdir=args.dir, pg_dsn=args.pg_dsn
        ),
        stores=tuple(args.stores.split(",")),
    )
    result = asyncio.run(run_all(cfg, args.only))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
