"""What the node's guard (taskpool/_guard_process.py) costs: one process per node.

Run: `.venv/bin/python benchmarks/guard_cost.py [--renewals N] [--sizes 10,100,1000]`.
One JSON object goes to stdout, progress to stderr.

- `start_ms`: `await Guard.start()` until the guard says it is ready (median of 5;
  a fresh Python running the module as a script with `-I -S`).
- `rss_idle_mb` / `uss_idle_mb`: the guard's resident and unique memory, nothing watched.
- per size K (K real `sleep` leaders watched, each in its own session):
  - `watch_us` / `forget_us`: pool-side wall time of one `watch` (pidfd_open, /proc
    read, sendmsg with the pidfd) and of one `forget`, mean over the K attempts.
  - `renew_us`: pool-side wall time of one `renew` of all K deadlines (the one message
    per heartbeat), mean over N; `renew_bytes`: its size. Renewals are sent in batches
    of 100, each followed by `sync()` (not timed), so the socket never backs up.
  - `guard_cpu_us_per_renew`: the guard's user+system CPU over the N renewals, per
    renewal; `guard_cpu_per_hour_ms_at_10s_heartbeat`: that at one renewal per 10 s.
  - `rss_mb` / `uss_mb`: the guard's memory while watching K attempts.
- `kill_lateness_ms`: for 20 attempts whose deadlines pass, the guard's own decision
  time minus the deadline (p50, max): how late the guard acts, CPU wake-up included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

import psutil

from taskpool._guard import Guard

Json = dict[str, Any]


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def memory(pid: int) -> Json:
    info = psutil.Process(pid).memory_full_info()
    return {"rss_mb": round(info.rss / 2**20, 2), "uss_mb": round(info.uss / 2**20, 2)}


def cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def spawn_leaders(n: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen(["sleep", "600"], start_new_session=True) for _ in range(n)]


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait()


async def measure_start(repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        guard = await Guard.start()
        times.append(time.perf_counter() - t0)
        await guard.close()
    return round(statistics.median(times) * 1000, 2)


async def measure_size(guard: Guard, size: int, renewals: int) -> Json:
    store = uuid.uuid4().hex
    procs = spawn_leaders(size)
    keys = [f"{store}:{i}:1" for i in range(1, size + 1)]
    try:
        far = time.monotonic() + 3600
        t0 = time.perf_counter()
        for key, proc in zip(keys, procs, strict=True):
            guard.watch(key, leader_pid=proc.pid, deadline=far)
        watch_s = time.perf_counter() - t0
        await guard.sync()
        cpu_before = cpu_s(guard.pid)
        renew_s = 0.0
        sent = 0
        while sent < renewals:
            for _ in range(min(100, renewals - sent)):
                deadlines = dict.fromkeys(keys, time.monotonic() + 3600)
                t0 = time.perf_counter()
                guard.renew(deadlines)
                renew_s += time.perf_counter() - t0
                sent += 1
            await guard.sync()
        guard_cpu = cpu_s(guard.pid) - cpu_before
        mem = memory(guard.pid)
        t0 = time.perf_counter()
        for key in keys:
            guard.forget(key)
        forget_s = time.perf_counter() - t0
        await guard.sync()
        renew_bytes = len(
            json.dumps(
                {"op": "renew", "deadlines": dict.fromkeys(keys, time.monotonic())},
                separators=(",", ":"),
            )
        )
    finally:
        stop(procs)
    per_renew_us = guard_cpu / renewals * 1e6
    return {
        "watched": size,
        "watch_us": round(watch_s / size * 1e6, 2),
        "forget_us": round(forget_s / size * 1e6, 2),
        "renew_us": round(renew_s / renewals * 1e6, 2),
        "renew_bytes": renew_bytes,
        "guard_cpu_us_per_renew": round(per_renew_us, 2),
        "guard_cpu_per_hour_ms_at_10s_heartbeat": round(per_renew_us * 360 / 1000, 3),
        **mem,
    }


async def measure_lateness(guard: Guard, n: int = 20) -> Json:
    store = uuid.uuid4().hex
    procs = spawn_leaders(n)
    lateness = []
    try:
        for i, proc in enumerate(procs, 1):
            key = f"{store}:{i}:1"
            guard.watch(key, leader_pid=proc.pid, deadline=time.monotonic() + 0.05)
            await asyncio.to_thread(proc.wait)
            kill = guard.forget(key)
            assert kill is not None, "the guard did not kill it"
            lateness.append((kill.at - kill.deadline) * 1000)
    finally:
        stop(procs)
    return {
        "n": n,
        "p50": round(statistics.median(lateness), 3),
        "max": round(max(lateness), 3),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--renewals", type=int, default=10_000)
    parser.add_argument("--sizes", default="10,100,1000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    result: Json = {
        "meta": {
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "renewals": args.renewals,
        }
    }
    log("start time")
    result["start_ms"] = await measure_start()
    guard = await Guard.start(stderr=subprocess.DEVNULL)  # it logs every kill
    try:
        await guard.sync()
        idle = memory(guard.pid)
        result["rss_idle_mb"], result["uss_idle_mb"] = idle["rss_mb"], idle["uss_mb"]
        result["sizes"] = []
        for size in sizes:
            log(f"{size} attempts, {args.renewals} renewals")
            result["sizes"].append(await measure_size(guard, size, args.renewals))
        log("kill lateness")
        result["kill_lateness_ms"] = await measure_lateness(guard)
    finally:
        await guard.close()
    result["meta"]["loadavg_end"] = os.getloadavg()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
