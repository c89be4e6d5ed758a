"""Hydration at boot: a pool process killed with SIGKILL (or frozen with SIGSTOP) loses
nothing; the next pool kills its leftovers, settles its attempts, then runs the rest."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import psutil
import pytest

from taskpool import Limits, NodeInfo, Status, TaskInfo, TaskSpec
from tests.helpers import (
    eventually,
    fast_pool,
    has_exited,
    killed_leftover_matches,
    no_attempt_processes,
    open_store,
)

ROOT = Path(__file__).resolve().parents[2]

#: Every case runs in both containment modes: a cgroup per attempt, and process groups.
pytestmark = pytest.mark.usefixtures("both_containments", "without_guard")


@contextmanager
def pool_process(db: Path | str, *args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run a pool in a child process; yield it and its node id once it serves."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.acceptance.pool_process", str(db), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[:1] == ["ready"], f"pool process did not start: {line}"
        yield proc, line[1]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


async def _submit_all(database: str, specs: list[TaskSpec]) -> list[int]:
    async with open_store(database) as store:
        return [await store.submit(spec) for spec in specs]


async def _pid_of(database: str, task_id: int) -> int:
    async def check() -> int | None:
        async with open_store(database) as store:
            info = await store.get(task_id)
        return info.pid if info.status is Status.RUNNING else None

    return await eventually(check)


@pytest.mark.parametrize("max_attempts", [1, 2])
async def test_sigkilled_pool_is_reconciled_at_the_next_boot(
    database: str, tmp_path: Path, max_attempts: int
) -> None:
    """Five tasks, max parallel 1, pool SIGKILLed mid-run: the leftover sleep is killed,
    the attempt is settled per its policy, and the other four run."""
    marker = tmp_path / "ran-once"
    first = TaskSpec.build(
        ["sh", "-c", f"if [ -e {marker} ]; then exit 0; fi; touch {marker}; sleep 600"],
        max_attempts=max_attempts,
    )
    ids = await _submit_all(
        database, [first] + [TaskSpec.build(["echo", str(i)]) for i in range(4)]
    )
    with pool_process(database, "1") as (proc, dead_node):
        pid = await _pid_of(database, ids[0])
        leftover = psutil.Process(pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert leftover.is_running()  # the orphan survived its pool: the incident to fix
    assert leftover.status() != psutil.STATUS_ZOMBIE

    async with fast_pool(database, max_parallel=1) as pool:
        results = [await pool.wait(task_id) for task_id in ids]
        new_node = pool.node_id
        assert pool.containment is not None
        containment = pool.containment.mode
        first_events = await pool.events(ids[0])
        all_events = [e for task_id in ids for e in await pool.events(task_id)]

    assert has_exited(leftover)
    settled = next(
        e for e in first_events if e.node_id == dead_node and e.from_status is Status.RUNNING
    )
    prefix = f"owner node {dead_node} (pid {proc.pid}) died; found at boot of node {new_node}; "
    suffix = "; no attempts left" if max_attempts == 1 else "; re-queued (attempt 2 of 2)"
    assert settled.reason.startswith(prefix)
    assert settled.reason.endswith(suffix)
    # In cgroup mode found exactly, the leader and its child, by the attempt's cgroup.
    assert killed_leftover_matches(
        settled.reason, mode=containment, task_id=ids[0], fence=1, leader=pid, processes=2
    )
    # Recovery before work: the settlement precedes every claim by the new node.
    new_claims = [
        e.id for e in all_events if e.node_id == new_node and e.to_status is Status.RUNNING
    ]
    assert settled.id < min(new_claims)
    if max_attempts == 1:
        assert results[0].status is Status.LOST
    else:
        assert results[0].status is Status.SUCCEEDED
        assert results[0].attempts_used == 2
    assert [r.status for r in results[1:]] == [Status.SUCCEEDED] * 4
    assert await no_attempt_processes()


async def test_a_recycled_pid_is_never_killed(database: str) -> None:
    """A recorded pid now used by an unrelated process (other start time) is left alone."""
    unrelated = subprocess.Popen(["sleep", "600"])
    try:
        gone = subprocess.Popen(["true"])
        gone.wait()  # a pid that belonged to the dead pool
        now = time.time()
        dead = NodeInfo("dead-node", os.uname().nodename, gone.pid, now - 50, now, now, None, 1)
        (task_id,) = await _submit_all(database, [TaskSpec.build(["sleep", "600"])])
        async with open_store(database) as store:
            await store.register_node(dead)
            (claim,) = await store.claim(dead.id, Limits(max_parallel=1), lease_ttl_s=600)
            real_start = psutil.Process(unrelated.pid).create_time()
            await store.record_spawn(task_id, claim.fence, unrelated.pid, real_start - 1000)

        async with fast_pool(database) as pool:
            info = await pool.get(task_id)
            assert info.status is Status.LOST
            assert info.reason is not None
            assert info.reason.endswith("no process was left; no attempts left")
        assert unrelated.poll() is None  # still running: not ours to kill
    finally:
        unrelated.kill()
        unrelated.wait()


async def _transaction_state(database: str) -> str | None:
    """Whether the database's other clients (here: only the frozen pool) hold a transaction
    open ("in transaction") or not ("idle"); None while a statement still runs."""
    if not database.startswith("postgresql://"):
        conn = sqlite3.connect(database, timeout=0, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")  # fails at once if another holds the write lock
            conn.execute("ROLLBACK")
            return "idle"
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            return "in transaction"
        finally:
            conn.close()
    conn_pg = await asyncpg.connect(database)
    try:
        states = [
            row["state"]
            for row in await conn_pg.fetch(
                "SELECT state FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ]
    finally:
        await conn_pg.close()
    if "active" in states:
        return None  # the server finishes it whether or not its client is frozen
    if any(state and state.startswith("idle in transaction") for state in states):
        return "in transaction"
    return "idle"


async def _freeze_running_attempt(
    proc: subprocess.Popen[str], database: str, task_id: int, node_id: str
) -> tuple[psutil.Process, int]:
    """SIGSTOP the pool process while it runs the task and holds no transaction open;
    return the attempt's leader and fence, as they are while the pool is frozen.

    A pool frozen inside a transaction keeps its row locks (PostgreSQL) or the write
    lock (SQLite), which stops every other pool from rescuing its task however long
    its lease has expired; and a pool starved of CPU before the freeze may miss its
    own lease and run the task again under a new fence. Both are likelier on a loaded
    machine and neither is what this test is about: the pool is thawed and frozen
    again until it is frozen in the state the test needs."""

    async def current() -> TaskInfo:
        async with open_store(database) as store:
            return await store.get(task_id)

    async def frozen_while_running() -> tuple[psutil.Process, int] | None:
        before = await current()
        if before.status is not Status.RUNNING or before.pid is None:
            return None
        proc.send_signal(signal.SIGSTOP)
        pool = psutil.Process(proc.pid)

        async def stopped() -> bool:  # under a tracer (strace -f), a stop is a tracing stop
            return pool.status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)

        await eventually(stopped)
        state = await eventually(lambda: _transaction_state(database))
        after = await current()
        if (
            state == "idle"
            and after.status is Status.RUNNING
            and after.owner_node == node_id
            and (after.pid, after.fence) == (before.pid, before.fence)
            and after.fence is not None
        ):
            with contextlib.suppress(psutil.NoSuchProcess):
                leader = psutil.Process(after.pid)
                if leader.status() != psutil.STATUS_ZOMBIE:
                    return leader, after.fence
        proc.send_signal(signal.SIGCONT)
        return None

    return await eventually(frozen_while_running)


async def test_frozen_pool_is_rescued_and_fenced(database: str) -> None:
    """A SIGSTOPped pool's task is rescued after its lease expires and runs elsewhere; when
    the frozen pool wakes, its stale lease is refused and it kills its own copy at once."""
    (task_id,) = await _submit_all(
        database, [TaskSpec.build(["sh", "-c", "echo start; sleep 600"], max_attempts=5)]
    )
    with pool_process(database, "1", "2.0") as (proc, frozen_node):
        old, old_fence = await _freeze_running_attempt(proc, database, task_id, frozen_node)
        async with fast_pool(database, lease_ttl_s=5.0) as pool:

            async def rescued_and_running() -> bool:
                info = await pool.get(task_id)
                return info.status is Status.RUNNING and info.owner_node == pool.node_id

            await eventually(rescued_and_running)
            events = await pool.events(task_id)
            rescue = next(
                e for e in events if e.to_status is Status.WAITING and e.fence == old_fence
            )
            assert rescue.reason.startswith(f"owner node {frozen_node} stopped heartbeating at ")
            assert old.is_running()  # nobody ran it down while its pool was frozen
            new_fence = (await pool.get(task_id)).fence
            assert new_fence is not None
            assert new_fence > old_fence

            proc.send_signal(signal.SIGCONT)  # wakes, heartbeats, learns the lease is gone

            async def old_copy_dead() -> bool:
                return has_exited(old)

            await eventually(old_copy_dead)
            info = await pool.get(task_id)
            assert info.status is Status.RUNNING  # the new owner is untouched
            assert (info.owner_node, info.fence) == (pool.node_id, new_fence)
            await pool.cancel(task_id, force=True)
            assert (await pool.wait(task_id)).status is Status.CANCELLED
    assert await no_attempt_processes()
