"""A `taskpool worker` in a process of its own, and tasks that record their own pids.

The tests that signal a worker or pull its database away judge the outcome by the
processes a task recorded itself (psutil handles taken while they were alive, so a
reused pid is never mistaken for one of them) and by the task's process group:
never by a marker another program could carry.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType

import anyio
import anyio.to_thread
import psutil

from tests.helpers import SAFETY_TIMEOUT_S, eventually

ROOT = Path(__file__).resolve().parents[2]

#: A task whose shell records its pid (its process group's id) and its sleeping
#: child's pid in the file named by its first argument, then waits for ever.
SLEEPER = 'echo $$ >> "$0"; sleep 600 & echo $! >> "$0"; wait'


def sleeper(pidfile: Path) -> list[str]:
    """The argv of a task that records its two pids in `pidfile` and runs for 10 minutes."""
    return ["sh", "-c", SLEEPER, str(pidfile)]


class TaskProcesses:
    """The processes a sleeper task recorded: its shell (the group leader) and its sleep."""

    def __init__(self, pidfile: Path) -> None:
        shell, child = (int(line) for line in pidfile.read_text().split())
        self.pgid = shell  # the runner makes the task's first process a group leader
        self.procs = [psutil.Process(shell), psutil.Process(child)]

    def alive(self) -> list[psutil.Process]:
        """The recorded processes still alive (a zombie waiting for its reaper is dead)."""
        left = []
        for proc in self.procs:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(proc)
            except psutil.NoSuchProcess:
                continue
        return left

    def group_exists(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        return True

    async def gone(self) -> bool:
        """Wait until every recorded process and the whole group are gone (a SIGKILLed
        process takes a moment to be reaped); True then, a timeout otherwise."""

        async def check() -> bool:
            return not self.alive() and not self.group_exists()

        await eventually(check, timeout_s=10)
        return True

    def kill(self) -> None:
        """Clean up after a failed test: SIGKILL the group, if it still exists."""
        if self.group_exists():
            os.killpg(self.pgid, signal.SIGKILL)


async def recorded(pidfile: Path) -> TaskProcesses:
    """Wait until the task has recorded both of its pids, and return its processes."""

    async def check() -> bool:
        return pidfile.exists() and len(pidfile.read_text().split()) == 2

    await eventually(check)
    return TaskProcesses(pidfile)


class Worker:
    """`python -m taskpool --db DB worker ARGS...`, its stderr in a file."""

    def __init__(self, db: Path, *args: str, stderr: Path) -> None:
        self.stderr_path = stderr
        self._stderr = stderr.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "taskpool", "--db", str(db), "worker", *args],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )

    def __enter__(self) -> Worker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._stderr.close()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    async def said(self, text: str) -> None:
        """Wait until the worker has written `text` to its stderr."""

        async def check() -> bool:
            assert self.proc.poll() is None or text in self.stderr, self.stderr
            return text in self.stderr

        await eventually(check)

    def send(self, signum: int) -> None:
        self.proc.send_signal(signum)

    async def exit_code(self) -> int:
        """Wait for the worker to exit (a safety timeout: a hang fails the test)."""
        return await anyio.to_thread.run_sync(lambda: self.proc.wait(timeout=SAFETY_TIMEOUT_S))
