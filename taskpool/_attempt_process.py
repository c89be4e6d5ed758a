"""One attempt's process: its environment, its spawn, and its leader held unreaped
until the runner chooses to reap it, so that its pid (its process group's id) stays
the attempt's for as long as the group is signalled.

Exit is awaited on a pidfd (Linux >= 5.3), not through asyncio's child watcher:
no thread per child, no global watcher to install in the host program, and the
same code runs on every anyio backend. What the process does while it runs (output,
timeouts, stop requests) is the runner's (_runner.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import anyio
import psutil

from . import _procs
from ._containment import Box
from ._models import LIBPQ_ENV_PREFIX, TASKPOOL_ENV_PREFIX, is_taskpool_variable

#: Give up waiting for a SIGKILLed leader after this long (a process in
#: uninterruptible sleep); the pool must not hang on it.
KILL_WAIT_S = 10.0
HAS_PIDFD = hasattr(os, "pidfd_open")
_TASKPOOL_PREFIXES = (TASKPOOL_ENV_PREFIX.encode(), LIBPQ_ENV_PREFIX.encode())


class AttemptWatcher(Protocol):
    """Someone outside the runner that keeps an eye on the attempt (the node's guard):
    told the leader's pid once it is spawned, and told before the leader is reaped
    (while its pid cannot be reused) that it exited; answers then how it killed the
    attempt, if it did."""

    def started(self, pid: int) -> None: ...

    def exited(self) -> str | None: ...


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by {_signal_name(-code)}"
    return f"exited with code {code}"


def task_environment(
    worker_env: Mapping[bytes, bytes],
    *,
    env: Mapping[str, str] | None,
    pass_env: frozenset[str],
    inherit_env: bool,
    marker: str,
) -> dict[bytes, bytes]:
    """The environment an attempt's process gets (pure): the worker's own minus
    taskpool's variables (its settings and database credentials must never reach a
    task), then the worker's values of `pass_env` (a name it lacks stays unset), then
    the task's `env`, then the attempt marker, which nothing may override."""
    # Bytes keys and values: Popen passes them through without re-encoding each one.
    child: dict[bytes, bytes] = {}
    if inherit_env:
        child = {k: v for k, v in worker_env.items() if not k.startswith(_TASKPOOL_PREFIXES)}
    for name in pass_env:
        key = os.fsencode(name)
        if key in worker_env and not is_taskpool_variable(name):
            child[key] = worker_env[key]
    for name, value in (env or {}).items():
        child[os.fsencode(name)] = os.fsencode(value)
    child[_procs.ATTEMPT_ENV.encode()] = marker.encode()
    return child


def spawn(
    argv: Sequence[str],
    cwd: str | None,
    env: dict[bytes, bytes],
    box: Box,
    *,
    gate: int | None = None,
) -> subprocess.Popen[bytes]:
    """Start the task in its box; a gated box's wrapper reads `gate` (its stdin) and
    runs the task only once the runner opens it."""
    return subprocess.Popen(
        box.wrap(list(argv)),  # a cgroup box joins its cgroup first, then execs
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL if gate is None else gate,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # own session and process group: killpg reaches grandchildren
        close_fds=True,
        preexec_fn=box.preexec(),  # rlimits only, and only when asked for
    )


def unstartable(argv: Sequence[str], cwd: str | None, env: Mapping[bytes, bytes]) -> str | None:
    """Why the program cannot be executed, as exec would say, or None. Checked before a
    spawn through a wrapper (which would only report it as an exit code)."""
    program = argv[0]
    if "/" in program:
        path: str | None = os.path.join(cwd or ".", program)
    else:
        search = os.fsdecode(env.get(b"PATH", os.fsencode(os.defpath)))
        path = shutil.which(program, mode=os.F_OK, path=search)
    if path is None or not os.path.exists(path):
        return f"could not start {program!r}: No such file or directory"
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        return f"could not start {program!r}: Permission denied"
    return None


def spawn_error(argv: Sequence[str], cwd: str | None, exc: OSError) -> str:
    what = exc.strerror or str(exc)
    if cwd is not None and exc.filename == cwd:
        return f"could not start {argv[0]!r}: working directory {cwd!r}: {what}"
    return f"could not start {argv[0]!r}: {what}"


class Process:
    """A spawned leader and its group, awaited without reaping until we choose to."""

    def __init__(
        self, popen: subprocess.Popen[bytes], box: Box, watcher: AttemptWatcher | None
    ) -> None:
        self.popen = popen
        self.box = box
        self.watcher = watcher
        self.killed_by: str | None = None  # what the watcher says killed it
        self.pid = popen.pid
        self.exit_code: int | None = None
        self.exited = anyio.Event()  # the leader is dead (a zombie until reaped)
        self.known_descendants: list[psutil.Process] = []
        self._pidfd = os.pidfd_open(self.pid) if HAS_PIDFD else None

    async def wait_exited(self, on_exit: Callable[[], None] | None = None) -> None:
        """Return when the leader has died, leaving it unreaped so its pid stays ours;
        `on_exit` is called then (it wakes the runner's watchdog)."""
        if self._pidfd is not None:
            await anyio.wait_readable(self._pidfd)
        else:  # pragma: no cover - non-Linux fallback: poll without reaping
            flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
            # WNOHANG never blocks, and there is no fd to await here.
            while os.waitid(os.P_PID, self.pid, flags) is None:  # noqa: ASYNC110, ASYNC222
                await anyio.sleep(0.02)
        self.exited.set()
        if on_exit is not None:
            on_exit()

    def note_descendants(self) -> None:
        """Remember the leader's descendants, to kill those that leave the group (setsid)
        even after the leader is gone and they were reparented. psutil checks each one's
        identity before signalling, so a remembered pid that was reused is never hit."""
        if self.exit_code is None and not self.box.exact:
            known = {p.pid: p for p in self.known_descendants}
            known.update((p.pid, p) for p in _procs.descendants(self.pid))
            self.known_descendants = list(known.values())

    def signal(self, sig: signal.Signals) -> None:
        # The leader is alive or a zombie: its pid cannot have been reused yet.
        if self.exit_code is None:
            self.note_descendants()
            _procs.signal_group(self.pid, sig)

    def kill_all(self, *, scan: bool = True) -> None:
        """SIGKILL the group and every known descendant that left it.

        `scan=False` once the leader has exited: its children were reparented, so
        scanning would find nothing; the descendants noted earlier still die."""
        self.box.kill()  # a cgroup: everything in it, whatever its group or session
        if self.exit_code is not None:
            return
        if scan:
            self.note_descendants()
        _procs.signal_group(self.pid, signal.SIGKILL)
        _procs.kill_processes(self.known_descendants)

    def reap(self) -> int:
        if self.exit_code is None:
            if self.watcher is not None:  # before the pid is freed for reuse
                self.killed_by = self.watcher.exited()
            _, status = os.waitpid(self.pid, 0)
            self.exit_code = os.waitstatus_to_exitcode(status)
            self.popen.returncode = self.exit_code  # so Popen never warns or re-waits
        return self.exit_code

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        if self.popen.stdout is not None:
            self.popen.stdout.close()


async def ensure_dead(proc: Process) -> None:
    """The cleanup of every path that did not reap: kill the group, reap the leader."""
    proc.kill_all()
    with anyio.move_on_after(KILL_WAIT_S):
        await proc.wait_exited()
    await wait_empty(proc.box)
    if proc.exited.is_set():
        proc.reap()


async def wait_empty(box: Box) -> None:
    """Until the kernel says the box is empty (a cgroup's `populated 0`), bounded: a
    process in uninterruptible sleep must not hang the pool."""
    with anyio.move_on_after(KILL_WAIT_S):
        while not box.is_empty():
            box.kill()
            await anyio.sleep(0.002)
