"""A Client with no worker in its process: a `taskpool worker` in another process runs
what it submits, and the client's wait and follow see the tasks end."""

from __future__ import annotations

import itertools
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest

from taskpool import Client, Status, TaskPool, TaskSpec, _client
from tests.acceptance.test_cli import worker
from tests.helpers import SAFETY_TIMEOUT_S, containment_mode, eventually, no_attempt_processes
from tests.postgres import fresh_postgres_database

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def worker_process(database: str) -> Iterator[subprocess.Popen[str]]:
    """`taskpool worker` on `database`, in a process of its own; stopped with SIGTERM
    (an orderly stop, exit 0) when the block ends."""
    options = ("--lease-ttl", "3", "--shutdown-drain", "0", "--kill-grace", "0.5")
    with worker(database, *options, "--containment", containment_mode()) as proc:
        yield proc
        proc.send_signal(signal.SIGTERM)
        assert proc.stderr is not None
        assert proc.wait(timeout=SAFETY_TIMEOUT_S) == 0, proc.stderr.read()


async def test_a_client_alone_submits_and_a_worker_process_runs_it(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no TaskPool in the test process (entering one would fail the test): the
    client submits (one and a batch), a worker process runs them, follow streams the
    output until the end, wait returns the final states, and a cancel from the client
    stops a running task there."""

    async def no_pool_here(self: TaskPool) -> TaskPool:
        raise AssertionError("a TaskPool was entered in the client's process")

    monkeypatch.setattr(TaskPool, "__aenter__", no_pool_here)
    async with Client(database) as client:
        task = await client.submit(["sh", "-c", "echo one; sleep 0.2; echo two"])
        batch = await client.submit_many([TaskSpec.build(["sh", "-c", "exit 3"])] * 3)
        sleeper = await client.submit(["sleep", "600"])
        with worker_process(database):
            assert "".join([text async for text in client.follow(task)]) == "one\ntwo\n"
            assert (await client.wait(task)).status is Status.SUCCEEDED
            for task_id in batch:
                failed = await client.wait(task_id)
                assert (failed.status, failed.exit_code) == (Status.FAILED, 3)

            async def started() -> bool:
                return (await client.get(sleeper)).pid is not None

            await eventually(started)
            await client.cancel(sleeper)
            cancelled = await client.wait(sleeper)
            assert cancelled.status is Status.CANCELLED
            assert cancelled.reason == "cancelled by request; process group sent SIGTERM"
            assert [n.stopped_at for n in await client.nodes()] == [None]
        assert (await client.nodes())[0].stopped_at is not None
    assert await no_attempt_processes()


async def test_a_waiting_client_on_postgres_is_woken_by_notify(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With polling backed off to an hour, a client's wait and follow on PostgreSQL
    still return when a worker process ends the task: LISTEN/NOTIFY woke them."""

    def hour(first_s: float, max_s: float) -> Iterator[float]:
        return itertools.repeat(3600.0)

    monkeypatch.setattr(_client, "poll_delays", hour)
    go = tmp_path / "go"
    script = f"while [ ! -e {go} ]; do sleep 0.01; done; echo done"
    async with fresh_postgres_database() as dsn, Client(dsn) as client:
        task = await client.submit(["sh", "-c", script])
        with worker_process(dsn), anyio.fail_after(SAFETY_TIMEOUT_S):
            async with anyio.create_task_group() as tg:
                seen: list[str] = []
                ended: list[Status] = []

                async def follow() -> None:
                    seen.extend([text async for text in client.follow(task)])

                async def wait() -> None:
                    ended.append((await client.wait(task)).status)

                tg.start_soon(follow)
                tg.start_soon(wait)

                async def started() -> bool:
                    return (await client.get(task)).pid is not None

                await eventually(started)  # the waiters have read it running: now end it
                go.touch()
            assert (seen, ended) == (["done\n"], [Status.SUCCEEDED])
