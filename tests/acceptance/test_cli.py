"""The operator's command line, run as a real process against both backends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio

from taskpool import Limits, NodeInfo, Status, TaskSpec
from tests.helpers import eventually, no_attempt_processes, open_store
from tests.pg_cluster import private_cluster

ROOT = Path(__file__).resolve().parents[2]


def cli(
    database: str, *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`taskpool --db database args...` run to its end (with `env` added to this
    process's environment)."""
    result = subprocess.run(
        [sys.executable, "-m", "taskpool", "--db", database, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=None if env is None else {**os.environ, **env},
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def cli_json(database: str, *args: str) -> Any:
    return json.loads(cli(database, "--json", *args).stdout)


@contextmanager
def worker(
    database: str, *args: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    """A running `taskpool worker` (with `env` added to this process's environment)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskpool", "--db", database, "worker", *args],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env=None if env is None else {**os.environ, **env},
    )
    try:
        assert proc.stderr is not None
        for _ in range(20):  # log records may come first
            line = proc.stderr.readline()
            if "taskpool worker: node" in line or not line:
                break
        assert "taskpool worker: node" in line, line
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


async def _status(database: str, task_id: int) -> Status:
    async with open_store(database) as store:
        return (await store.get(task_id)).status


async def test_submit_run_inspect_and_retry(database: str) -> None:
    """submit, a worker runs it, then ls, show, logs, retry and nodes tell the story."""
    task = cli_json(database, "submit", "--project", "ops", "--", "sh", "-c", "echo out; exit 3")
    task_id = task["id"]
    with worker(database, "--max-parallel", "2") as proc:

        async def finished() -> bool:
            return await _status(database, task_id) is Status.FAILED

        await eventually(finished)
        listed = cli_json(database, "ls", "--project", "ops")
        assert [(t["id"], t["status"], t["reason"]) for t in listed] == [
            (task_id, "failed", "exited with code 3")
        ]
        shown = cli_json(database, "show", str(task_id))
        assert [e["to_status"] for e in shown["events"]] == ["waiting", "running", "failed"]
        assert cli(database, "logs", str(task_id)).stdout == "out\n"
        retried = cli_json(database, "retry", str(task_id))
        assert retried["retry_of"] == task_id

        async def retried_too() -> bool:
            return await _status(database, retried["id"]) is Status.FAILED

        await eventually(retried_too)
        (node,) = cli_json(database, "nodes")
        assert node["stopped_at"] is None
        assert cli(database, "stale").stdout.strip() == "nothing stale"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


async def test_follow_cancel_and_graceful_worker_stop(database: str) -> None:
    """logs -f streams until the end; cancel stops a running task; SIGTERM on the
    worker hands a running task back to waiting and exits 0."""
    with worker(database, "--shutdown-drain", "0", "--kill-grace", "1") as proc:
        chatty = cli_json(
            database, "submit", "--", "sh", "-c", "for i in 1 2 3; do echo $i; sleep 0.2; done"
        )["id"]
        assert cli(database, "logs", "-f", str(chatty)).stdout == "1\n2\n3\n"
        assert await _status(database, chatty) is Status.SUCCEEDED
        sleeper = cli_json(database, "submit", "--", "sleep", "600")["id"]

        async def sleeping() -> bool:
            return await _status(database, sleeper) is Status.RUNNING

        await eventually(sleeping)
        cancelled = cli_json(database, "cancel", str(sleeper))
        assert cancelled["cancel_requested"] == "graceful"

        async def stopped() -> bool:
            return await _status(database, sleeper) is Status.CANCELLED

        await eventually(stopped)
        held = cli_json(database, "submit", "--", "sleep", "600")["id"]

        async def held_running() -> bool:
            return await _status(database, held) is Status.RUNNING

        await eventually(held_running)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert await _status(database, held) is Status.WAITING
    assert await no_attempt_processes()


async def test_errors_print_their_cause_and_exit_non_zero(database: str) -> None:
    """A bad request exits 1 with a clear message; bad usage exits 2."""
    cli(database, "submit", "--", "true")  # the database exists: `show` never creates one
    missing = cli(database, "show", "99", check=False)
    assert missing.returncode == 1
    assert "taskpool: error: TaskNotFound: no task 99" in missing.stderr
    empty = cli(database, "submit", check=False)
    assert empty.returncode == 1
    assert "argv must not be empty" in empty.stderr
    assert cli(database, "frobnicate", check=False).returncode == 2


async def test_a_worker_whose_database_vanishes_exits_non_zero() -> None:
    """Crash, never hang: the worker's database stops; past the tolerance the worker kills
    its children and exits 1 with the cause, for its supervisor to restart it."""
    with private_cluster() as cluster:
        task = cli_json(cluster.dsn, "submit", "--", "sleep", "600")["id"]
        env = {**os.environ, "TASKPOOL_STORE_OUTAGE_TOLERANCE_S": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "taskpool", "--db", cluster.dsn, "worker", "--lease-ttl", "3"],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:

            async def running() -> bool:
                return await _status(cluster.dsn, task) is Status.RUNNING

            await eventually(running)
            await anyio.to_thread.run_sync(cluster.stop)
            _, stderr = await anyio.to_thread.run_sync(lambda: proc.communicate(timeout=60))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 1
        assert "PoolCrashed" in stderr
        assert "caused by StoreUnavailable" in stderr
    assert await no_attempt_processes()


async def test_stale_reports_expired_leases_and_silent_nodes(database: str) -> None:
    """`stale` names a running task whose lease ran out and a node that went quiet."""
    async with open_store(database) as store:
        now = time.time()
        await store.register_node(
            NodeInfo("quiet-node", "h", 1, now, now - 600, now - 600, None, 1)
        )
        task = await store.submit(TaskSpec.build(["true"]))
        await store.claim("quiet-node", Limits(), lease_ttl_s=0.01)
    await anyio.sleep(0.05)
    report = cli_json(database, "stale", "--older-than", "60")
    assert [t["id"] for t in report["expired_leases"]] == [task]
    assert [n["id"] for n in report["silent_nodes"]] == ["quiet-node"]
    text = cli(database, "stale").stdout
    assert f"task {task}: lease expired" in text
    assert "node quiet-node (h:1): no heartbeat for" in text
    busy = cli(database, "retry", str(task), check=False)
    assert busy.returncode == 1
    assert "only a finished task is retried" in busy.stderr
