"""The PostgreSQL sections of bench.py that compare: taskpool against PgQueuer and a
bare spawn loop (`pgqueuer`), and one database shared by 1, 2, 4, 8 nodes (`nodes`).

Each node of `nodes` is a separate Python process (this file run with `--node`):
on a 2-core machine one process would put every node on one event loop and one
core, which measures the event loop rather than the database. The database's own
CPU is the sum of the CPU time of the PostgreSQL backend processes serving the
benchmark's database (found by their process title, sampled every 50 ms);
the server's shared background processes (WAL writer, checkpointer) are not in it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
from bench_common import (
    SAFETY_TIMEOUT_S,
    Config,
    Json,
    bare_asyncio_run,
    contained_asyncio_run,
    fresh_pg_database,
    per_s,
    progress,
    summary_ms,
)
from scale import PostgresProbe, Probe, probe_of, submit_bulk, true_specs

from taskpool import TaskPool

#: The workload of `pgqueuer`: N tasks (`true`) at this concurrency.
COMPARE_CONCURRENCY = 8
#: How often a run's probe counts the ended tasks: its count scans the measured rows and
#: takes CPU from the system measured (rates come from the tasks' events, not from it).
PROBE_INTERVAL_S = 0.1
#: Slots of each node in `nodes`.
NODE_SLOTS = 4
SCRIPT = str(Path(__file__).resolve())


# -- the database's CPU ------------------------------------------------------------------


class BackendCpu:
    """Samples the CPU time of every PostgreSQL backend serving `database` until stopped;
    `cpu_s` is what they used since `start` (a backend that existed before counts from
    its first sample, a new one from zero). The benchmark's own connections (its
    probe, its lock sampler) are `exclude`d: their polling is not the system's work."""

    def __init__(self, database: str) -> None:
        self._marker = f" {database} "
        self._excluded: set[int] = set()
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None

    def _sample(self, *, first: bool) -> None:
        for proc in psutil.process_iter(["name", "cmdline"]):
            try:
                title = " ".join(proc.info["cmdline"] or ()) + " "
                if not title.startswith("postgres: ") or self._marker not in title:
                    continue
                times = proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            used = times.user + times.system
            if first:
                self._first[proc.pid] = used
            self._first.setdefault(proc.pid, 0.0)
            self._last[proc.pid] = used

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            self._sample(first=False)

    def exclude(self, backend_pid: int) -> None:
        self._excluded.add(backend_pid)

    def start(self) -> None:
        self._sample(first=True)
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> float:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._sample(first=False)
        return sum(
            self._last[pid] - self._first[pid] for pid in self._last if pid not in self._excluded
        )

    @staticmethod
    def database_of(dsn: str) -> str:
        return dsn.partition("?")[0].rpartition("/")[2]


# -- pgqueuer --------------------------------------------------------------------------------


async def taskpool_run(dsn: str, n: int) -> Json:
    """n tasks submitted first, then a TaskPool of COMPARE_CONCURRENCY slots on `dsn`."""
    ids, _ = await submit_bulk(dsn, true_specs(n))
    cpu = BackendCpu(BackendCpu.database_of(dsn))
    async with probe_of(dsn) as probe:
        cpu.exclude(await pg_probe(probe).backend_pid())
        cpu.start()
        boot = time.perf_counter()
        async with TaskPool(dsn, max_parallel=COMPARE_CONCURRENCY):
            deadline = time.monotonic() + SAFETY_TIMEOUT_S * 5
            while await probe.terminal(ids[0], ids[-1]) < n:
                if time.monotonic() > deadline:
                    raise TimeoutError("the taskpool run did not end in time")
                await asyncio.sleep(PROBE_INTERVAL_S)
            wall_s = time.perf_counter() - boot
        db_cpu_s = await cpu.stop()
        if await probe.succeeded(ids[0], ids[-1]) != n:
            raise RuntimeError("not every taskpool task succeeded")
        first, last = await probe.span(ids[0], ids[-1])
    return {"run_s": last - first, "wall_s": wall_s, "db_cpu_s": db_cpu_s}


async def pgqueuer_run(dsn: str, n: int) -> Json:
    """n jobs enqueued first, then a PgQueuer QueueManager (drain mode, at most
    COMPARE_CONCURRENCY jobs at once) whose one entrypoint runs `true` as taskpool's
    runner and the bare loop do (asyncio subprocess, output piped and read)."""
    import asyncpg

    # Through importlib: PgQueuer is the optional `bench` extra, not installed for the
    # type check.
    pgq = importlib.import_module("pgqueuer")
    mode = importlib.import_module("pgqueuer.types").QueueExecutionMode

    setup = await asyncpg.connect(dsn)
    try:
        queries = pgq.Queries(pgq.AsyncpgDriver(setup))
        await queries.install()
        await queries.enqueue(["true"] * n, [None] * n, [0] * n)
    finally:
        await setup.close()

    cpu = BackendCpu(BackendCpu.database_of(dsn))
    cpu.start()
    ran: list[tuple[float, float]] = []
    boot = time.perf_counter()
    conn = await asyncpg.connect(dsn)
    try:
        manager = pgq.QueueManager(pgq.Queries(pgq.AsyncpgDriver(conn)))

        async def run_true(job: Any) -> None:
            started = time.time()
            proc = await asyncio.create_subprocess_exec(
                "true", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
            await proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"true exited with {proc.returncode}")
            ran.append((started, time.time()))

        manager.entrypoint("true")(run_true)

        await asyncio.wait_for(
            manager.run(
                mode=mode.drain,
                batch_size=COMPARE_CONCURRENCY // 2,
                max_concurrent_tasks=COMPARE_CONCURRENCY,
            ),
            SAFETY_TIMEOUT_S * 5,
        )
        wall_s = time.perf_counter() - boot
    finally:
        await conn.close()
    db_cpu_s = await cpu.stop()
    if len(ran) != n:
        raise RuntimeError(f"PgQueuer ran {len(ran)} of {n} jobs")
    return {
        "run_s": max(end for _, end in ran) - min(start for start, _ in ran),
        "wall_s": wall_s,
        "db_cpu_s": db_cpu_s,
    }


async def bench_pgqueuer(cfg: Config, workdir: Path) -> Json:
    del workdir
    n, c = cfg.compare_tasks, COMPARE_CONCURRENCY
    runs: dict[str, list[Json]] = {"bare": [], "contained": [], "taskpool": [], "pgqueuer": []}
    for rep in range(cfg.compare_repeats):
        progress(f"pgqueuer #{rep + 1}: bare loop, {n} x true at {c}")
        bare_s = await bare_asyncio_run(n, c)
        runs["bare"].append({"run_s": bare_s, "wall_s": bare_s, "db_cpu_s": 0.0})
        progress(f"pgqueuer #{rep + 1}: the bare loop with a cgroup per run")
        contained_s = await contained_asyncio_run(n, c)
        runs["contained"].append({"run_s": contained_s, "wall_s": contained_s, "db_cpu_s": 0.0})
        progress(f"pgqueuer #{rep + 1}: taskpool on PostgreSQL")
        async with fresh_pg_database(cfg.pg_dsn) as dsn:
            runs["taskpool"].append(await taskpool_run(dsn, n))
        progress(f"pgqueuer #{rep + 1}: PgQueuer")
        async with fresh_pg_database(cfg.pg_dsn) as dsn:
            runs["pgqueuer"].append(await pgqueuer_run(dsn, n))
        progress(
            f"pgqueuer #{rep + 1}: "
            + ", ".join(f"{k} {per_s(n, v[-1]['run_s'])}/s" for k, v in runs.items())
        )
    rate = {k: max(per_s(n, r["run_s"]) for r in v) for k, v in runs.items()}
    wall = {k: max(per_s(n, r["wall_s"]) for r in v) for k, v in runs.items()}
    cpu_ms = {
        k: round(min(r["db_cpu_s"] for r in v) / n * 1e3, 3)
        for k, v in runs.items()
        if k in ("taskpool", "pgqueuer")
    }
    return {
        "what": (
            f"{n} tasks running `true` at concurrency {c}, interleaved per repeat: the bare"
            " asyncio loop (Semaphore); contained = the bare loop with taskpool's own"
            " containment around each run and nothing else (a cgroup made, joined by the"
            " /bin/sh wrapper before exec, removed after; no database, no pool); taskpool ="
            " TaskPool(dsn, max_parallel=8) on a fresh database, tasks submitted first,"
            " tasks_per_s = tasks / (last terminal - first"
            " 'running' event); PgQueuer = QueueManager.run(drain, max_concurrent_tasks=8,"
            " batch_size=4) on a fresh database, jobs enqueued first, its entrypoint runs"
            " `true` as the bare loop does, tasks_per_s = jobs / (last job's end - first"
            " job's start). wall_tasks_per_s: from starting the worker to all done."
            " db_cpu_ms_per_task: CPU of the database's backend processes over the worker's"
            f" life / tasks. Best of {cfg.compare_repeats} repeat(s)."
        ),
        "pgqueuer_version": importlib.import_module("pgqueuer").__version__,
        "tasks": n,
        "concurrency": c,
        "tasks_per_s": rate,
        "wall_tasks_per_s": wall,
        "taskpool_vs_pgqueuer": round(rate["taskpool"] / rate["pgqueuer"], 3),
        "taskpool_vs_bare": round(rate["taskpool"] / rate["bare"], 3),
        "pgqueuer_vs_bare": round(rate["pgqueuer"] / rate["bare"], 3),
        # The floor: what a cgroup per attempt alone allows, with no database at all.
        "contained_vs_pgqueuer": round(rate["contained"] / rate["pgqueuer"], 3),
        "contained_vs_bare": round(rate["contained"] / rate["bare"], 3),
        "taskpool_vs_contained": round(rate["taskpool"] / rate["contained"], 3),
        "targets": {"taskpool_vs_pgqueuer": 1.2, "taskpool_vs_bare": 0.5, "db_cpu_ms": 0.5},
        "db_cpu_ms_per_task": cpu_ms,
        "all_tasks_per_s": {k: [per_s(n, r["run_s"]) for r in v] for k, v in runs.items()},
    }


# -- nodes ------------------------------------------------------------------------------------


async def node_main(dsn: str, slots: int) -> None:
    """One node (`--node`): a TaskPool on `dsn` until stdin closes; its claim calls timed
    client side. Prints `ready`, then one JSON line of latencies when done."""
    latencies: dict[str, list[float]] = {"claim": [], "finish_and_claim": []}
    pool = TaskPool(dsn, max_parallel=slots)
    for name, samples in latencies.items():
        call = getattr(pool.store, name)

        async def timed(
            *args: Any, _call: Any = call, _samples: list[float] = samples, **kwargs: Any
        ) -> Any:
            started = time.perf_counter()
            try:
                return await _call(*args, **kwargs)
            finally:
                _samples.append(time.perf_counter() - started)

        setattr(pool.store, name, timed)
    async with pool:
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    print(json.dumps({k: v for k, v in latencies.items()}), flush=True)


async def start_node(dsn: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        SCRIPT,
        "--node",
        dsn,
        "--slots",
        str(NODE_SLOTS),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), SAFETY_TIMEOUT_S)
    if line.strip() != b"ready":
        raise RuntimeError(f"a node did not start: {line!r}")
    return proc


async def stop_node(proc: asyncio.subprocess.Process) -> dict[str, list[float]]:
    assert proc.stdin is not None
    proc.stdin.close()
    out, _ = await asyncio.wait_for(proc.communicate(), SAFETY_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"a node exited with {proc.returncode}")
    result: dict[str, list[float]] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def pg_probe(probe: Probe) -> PostgresProbe:
    if not isinstance(probe, PostgresProbe):
        raise TypeError("a PostgreSQL benchmark got a probe of another store")
    return probe


async def lock_waiters(dsn: str, stop: asyncio.Event, cpu: BackendCpu) -> list[int]:
    """Every 20 ms, how many of the database's backends wait on a lock (its own
    backend's CPU excluded from `cpu`)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    cpu.exclude(await conn.fetchval("SELECT pg_backend_pid()"))
    samples: list[int] = []
    try:
        while not stop.is_set():
            samples.append(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
            await asyncio.sleep(0.02)
    finally:
        await conn.close()
    return samples


async def nodes_run(dsn: str, nodes: int, n: int) -> Json:
    """`nodes` node processes up and idle, then n tasks submitted in one batch."""
    procs = [await start_node(dsn) for _ in range(nodes)]
    latencies: list[dict[str, list[float]]] = []
    try:
        stop = asyncio.Event()
        cpu = BackendCpu(BackendCpu.database_of(dsn))
        sampler = asyncio.ensure_future(lock_waiters(dsn, stop, cpu))
        cpu.start()
        ids, _ = await submit_bulk(dsn, true_specs(n))
        async with probe_of(dsn) as probe:
            cpu.exclude(await pg_probe(probe).backend_pid())
            deadline = time.monotonic() + SAFETY_TIMEOUT_S * 5
            while await probe.terminal(ids[0], ids[-1]) < n:
                if time.monotonic() > deadline:
                    raise TimeoutError("the nodes did not run every task in time")
                await asyncio.sleep(PROBE_INTERVAL_S)
            db_cpu_s = await cpu.stop()
            stop.set()
            waiting_on_locks = await sampler
            if await probe.succeeded(ids[0], ids[-1]) != n:
                raise RuntimeError("not every task succeeded")
            first, last = await probe.span(ids[0], ids[-1])
    finally:
        for proc in procs:
            latencies.append(await stop_node(proc))
    claims = [s for node in latencies for s in node["claim"]]
    finish_and_claim = [s for node in latencies for s in node["finish_and_claim"]]
    return {
        "tasks_per_s": per_s(n, last - first),
        "db_cpu_ms_per_task": round(db_cpu_s / n * 1e3, 3),
        "claim_ms": summary_ms(claims) if claims else None,
        "finish_and_claim_ms": summary_ms(finish_and_claim) if finish_and_claim else None,
        "backends_waiting_on_a_lock_mean": round(
            sum(waiting_on_locks) / max(1, len(waiting_on_locks)), 2
        ),
        "backends_waiting_on_a_lock_max": max(waiting_on_locks, default=0),
    }


async def bench_nodes(cfg: Config, workdir: Path) -> Json:
    del workdir
    n = cfg.node_tasks
    runs: dict[int, list[Json]] = {k: [] for k in cfg.node_counts}
    for rep in range(cfg.compare_repeats):
        for nodes in cfg.node_counts:
            progress(f"nodes #{rep + 1}: {nodes} node process(es) of {NODE_SLOTS} slots, {n} tasks")
            async with fresh_pg_database(cfg.pg_dsn) as dsn:
                runs[nodes].append(await nodes_run(dsn, nodes, n))
            progress(f"nodes #{rep + 1}: {nodes}: {runs[nodes][-1]['tasks_per_s']}/s")
    best = {k: max(v, key=lambda r: float(r["tasks_per_s"])) for k, v in runs.items()}
    one = float(best[cfg.node_counts[0]]["tasks_per_s"])
    return {
        "what": (
            f"1, 2, 4, 8 nodes (TaskPool(dsn, max_parallel={NODE_SLOTS}), each a separate"
            " Python process) on one fresh database per run, all up and idle before"
            f" {n} `true` tasks are submitted in one submit_many; tasks_per_s = tasks /"
            " (last terminal - first 'running' event); ratio = to 1 node. claim_ms /"
            " finish_and_claim_ms: each store call's latency measured in the nodes"
            " (client side: round trips, waiting for locks and the claim itself);"
            " backends_waiting_on_a_lock: pg_stat_activity sampled every 20 ms;"
            f" db_cpu_ms_per_task as in `pgqueuer`. Best of {cfg.compare_repeats} run(s)."
        ),
        "tasks": n,
        "slots_per_node": NODE_SLOTS,
        "target_ratio_4_nodes": 1.0,
        "nodes": {str(k): v for k, v in best.items()},
        "ratio_to_one_node": {
            str(k): round(float(v["tasks_per_s"]) / one, 3) for k, v in best.items()
        },
        "all_tasks_per_s": {str(k): [r["tasks_per_s"] for r in v] for k, v in runs.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one node of bench.py's `nodes` section")
    parser.add_argument("--node", required=True, help="the database's DSN")
    parser.add_argument("--slots", type=int, default=NODE_SLOTS)
    args = parser.parse_args(argv)
    asyncio.run(node_main(args.node, args.slots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
