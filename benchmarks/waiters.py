"""What waiters and wake-ups cost a PostgreSQL pool: throughput with 0 and with W
concurrent `wait()` calls in the same run, and per task the claim transactions, the
NOTIFYs and the store reads.

Run (the server of `--dsn`; each run gets a fresh throwaway database in it):

    .venv/bin/python benchmarks/waiters.py --dsn postgresql://postgres@127.0.0.1:5432/postgres

N `true` tasks are submitted (one transaction), W waiters start on the first W of them
(through the first pool's `wait`, or through a separate entered `Client` with
`--via client`), then K pools of C slots start, and the clock runs from their start
to the N-th task's end. The two modes alternate for `--rounds` rounds. Claim
transactions are counted by the pools' stores (a claim loop's `claim`, a runner's
`finish_and_claim`), NOTIFYs by a LISTEN connection of the script's, reads by the
waiters' store. It imports whichever taskpool is first on the path, so the same
script measures another checkout (`PYTHONPATH=<dir holding its taskpool>`): it only
uses what both sides have. One JSON object goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Collection
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import asyncpg

import taskpool
from taskpool import Client, Limits, Status, TaskInfo, TaskPool, TaskSpec
from taskpool._models import Claim, Outcome
from taskpool.stores import node_connections
from taskpool.stores.postgres import PostgresStore


class CountingStore(PostgresStore):
    """A node's (or the waiters') store, counting claim transactions, ends and reads."""

    def __init__(self, dsn: str, max_size: int, ended: anyio.Event, n: int) -> None:
        super().__init__(dsn, max_size=max_size)
        self.calls: Counter[str] = Counter()
        self._ended, self._n = ended, n

    def _end(self) -> None:
        self.calls["ends"] += 1
        if sum(s.calls["ends"] for s in ALL_STORES) >= self._n:
            self._ended.set()

    async def claim(self, node_id: str, limits: Limits, lease_ttl_s: float) -> list[Claim]:
        claims = await super().claim(node_id, limits, lease_ttl_s)
        self.calls["claim"] += 1
        self.calls["empty_claim"] += not claims
        return claims

    async def finish_and_claim(
        self, task_id: int, fence: int, outcome: Outcome, **kwargs: Any
    ) -> list[Claim]:
        claims = await super().finish_and_claim(task_id, fence, outcome, **kwargs)
        self.calls["finish_and_claim"] += 1
        self.calls["empty_claim"] += not claims
        self._end()
        return claims

    async def finish(self, task_id: int, fence: int, outcome: Outcome) -> TaskInfo:
        info = await super().finish(task_id, fence, outcome)
        self._end()
        return info

    async def get(self, task_id: int) -> TaskInfo:
        self.calls["get"] += 1
        return await super().get(task_id)

    async def get_many(
        self, task_ids: Collection[int], *, ended_only: bool = False
    ) -> dict[int, TaskInfo]:
        self.calls["get_many"] += 1  # main has no get_many: never called there
        return await super().get_many(task_ids, ended_only=ended_only)

    async def statuses(self, task_ids: Collection[int]) -> dict[int, Status]:
        self.calls["statuses"] += 1
        return await super().statuses(task_ids)  # main has no statuses: never called there


ALL_STORES: list[CountingStore] = []


@asynccontextmanager
async def fresh_database(admin: str) -> AsyncIterator[str]:
    name = f"taskpool_bench_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        dsn = admin.rsplit("/", 1)[0] + "/" + name
        try:
            yield dsn
        finally:
            await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def one_run(args: argparse.Namespace, waiters: int) -> dict[str, Any]:
    ALL_STORES.clear()
    ended = anyio.Event()
    async with fresh_database(args.dsn) as dsn, AsyncExitStack() as stack:
        async with PostgresStore(dsn, max_size=2) as submitter:
            ids = await submitter.submit_many([TaskSpec.build(["true"])] * args.tasks)
        heard: Counter[str] = Counter()
        listening = await asyncpg.connect(dsn)
        stack.push_async_callback(listening.close)
        await listening.add_listener(
            "taskpool_work", lambda _c, _p, _ch, payload: heard.update([payload or "''"])
        )
        stores = []
        for _ in range(args.nodes):
            store = CountingStore(dsn, node_connections(args.parallel), ended, args.tasks)
            await stack.enter_async_context(store)
            ALL_STORES.append(store)
            stores.append(store)
        waiter_store = stores[0]
        if args.via == "client" and waiters:
            waiter_store = CountingStore(dsn, 10, ended, args.tasks)
            await stack.enter_async_context(waiter_store)
        tg = await stack.enter_async_context(anyio.create_task_group())
        waited: list[Status] = []
        all_waited = anyio.Event()
        if not waiters:
            all_waited.set()

        failures: Counter[str] = Counter()

        async def wait(target: Client | TaskPool, task_id: int) -> None:
            try:
                waited.append((await target.wait(task_id)).status)
            except Exception as exc:  # reported: main's waiters time out on connections
                failures[type(exc).__name__] += 1
                waited.append(Status.LOST)
            if len(waited) == waiters:
                all_waited.set()

        if args.via == "client" and waiters:
            client = await stack.enter_async_context(Client(waiter_store))
            for task_id in ids[:waiters]:
                tg.start_soon(wait, client, task_id)
        started, cpu_started = time.perf_counter(), time.process_time()
        async with AsyncExitStack() as pools:
            first = None
            for store in stores:
                pool = await pools.enter_async_context(
                    TaskPool(store, max_parallel=args.parallel, poll_interval_s=1.0)
                )
                first = first or pool
            assert first is not None
            if args.via == "pool":
                for task_id in ids[:waiters]:
                    tg.start_soon(wait, first, task_id)
            await ended.wait()
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu_started
            with anyio.fail_after(600):
                await all_waited.wait()
        calls: Counter[str] = sum((s.calls for s in stores), Counter())
        reads = waiter_store.calls
        n = args.tasks
        return {
            "waiters": waiters,
            "tasks_per_s": round(n / elapsed, 1),
            # This process's CPU (pools, waiters; not the tasks, not the server): less
            # disturbed by other load on the machine than the rate.
            "process_cpu_ms_per_task": round(cpu * 1000 / n, 2),
            "claim_transactions_per_task": round(
                (calls["claim"] + calls["finish_and_claim"]) / n, 3
            ),
            "claim_loop_claims_per_task": round(calls["claim"] / n, 3),
            "empty_claims_per_task": round(calls["empty_claim"] / n, 3),
            "notifies_per_task": {k: round(v / n, 3) for k, v in sorted(heard.items())},
            "waiter_failures": dict(failures),
            "waiter_reads_per_task": {
                "get": round(reads["get"] / n, 3),
                "statuses": round(reads["statuses"] / n, 3),
                "get_many": round(reads["get_many"] / n, 3),
            },
        }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--parallel", type=int, default=8, help="slots per node")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--waiters", type=int, default=1000)
    parser.add_argument("--via", choices=["pool", "client"], default="pool")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    runs: dict[int, list[dict[str, Any]]] = {0: [], args.waiters: []}
    for r in range(args.rounds):
        for waiters in runs:
            result = await one_run(args, waiters)
            print(f"round {r + 1}: {json.dumps(result)}", file=sys.stderr)
            runs[waiters].append(result)
    rate = {w: statistics.median(r["tasks_per_s"] for r in rs) for w, rs in runs.items()}
    cpu = {w: statistics.median(r["process_cpu_ms_per_task"] for r in rs) for w, rs in runs.items()}
    print(
        json.dumps(
            {
                "taskpool": taskpool.__file__,
                "settings": vars(args) | {"dsn": "(given)"},
                "tasks_per_s": {str(w): v for w, v in rate.items()},
                "ratio_with_waiters": round(rate[args.waiters] / rate[0], 3),
                "process_cpu_ms_per_task": {str(w): v for w, v in cpu.items()},
                "runs": {str(w): rs for w, rs in runs.items()},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    anyio.run(main)
