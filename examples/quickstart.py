"""Embed a taskpool in an asyncio program and watch it handle the bad cases.

Runs real subprocesses on the embedded SQLite store: one that succeeds, one that
crashes, one that hangs (timeout), one that goes silent (stall), one that does
not exist, one that fails and is retried, and two that share a non-parallel
template. Prints what happened to each, with the reasons taskpool recorded.

    python examples/quickstart.py [path/to/tasks.db]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import anyio

from taskpool import TaskPool


async def main(db: Path) -> None:
    async with TaskPool(db, max_parallel=4, kill_grace_s=1.0, poll_interval_s=0.2) as pool:
        print(f"pool node {pool.node_id} on {db}\n")
        tasks = {
            "succeeds": await pool.submit(["sh", "-c", "echo hello from $$; uname -s"]),
            "crashes (SIGSEGV)": await pool.submit(
                ["sh", "-c", "echo about to crash; kill -SEGV $$"]
            ),
            "hangs (timeout 1 s)": await pool.submit(["sleep", "600"], timeout_s=1.0),
            "goes silent (stall 1 s)": await pool.submit(
                ["sh", "-c", "echo working; sleep 600"], stall_timeout_s=1.0
            ),
            "does not exist": await pool.submit(["no-such-program"]),
            "fails, retried twice": await pool.submit(
                ["sh", "-c", "echo trying; exit 2"], max_attempts=3, retry_backoff_s=0.2
            ),
            "deploy #1 (non-parallel)": await pool.submit(
                ["sh", "-c", "echo deploying; sleep 0.5"], template="deploy"
            ),
            "deploy #2 (waits for #1)": await pool.submit(
                ["sh", "-c", "echo deploying again"], template="deploy"
            ),
        }
        for label, task_id in tasks.items():
            info = await pool.wait(task_id, timeout_s=60)
            output = (await pool.output(task_id)).strip().replace("\n", " | ")
            print(f"#{task_id} {label}")
            print(f"    {info.status.value}: {info.reason}")
            if output:
                print(f"    output: {output}")
        print("\nevents of the retried task:")
        for event in await pool.events(tasks["fails, retried twice"]):
            print(f"    {event.from_status or '-'} -> {event.to_status}: {event.reason}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        anyio.run(main, Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            anyio.run(main, Path(tmp) / "tasks.db")
