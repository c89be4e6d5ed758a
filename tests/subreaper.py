"""Keep every process the test run starts inside the pytest process's descendant tree.

The suite judges "processes left behind" and must judge only its own: a host may run
taskpool in production, or a second copy of the suite, and their attempt processes
carry the same environment marker as ours. The pytest process becomes a child
subreaper (Linux `PR_SET_CHILD_SUBREAPER`), so a process that our pools start and
that double-forks or calls `setsid` is reparented to pytest, not to init: "ours" is
exactly "a descendant of this process".

A subreaper inherits init's duty of reaping those orphans. A zombie may be reaped
only if nobody else will wait for it: every child that this process forks goes
through `subprocess.Popen` (the runner, anyio, the tests; nothing here uses
`os.fork` or multiprocessing), and some code owns each such Popen and will wait for
it (the runner waits with `os.waitpid(pid)`). So Popen spawns are recorded, and the
reaper thread reaps only zombie children that no unwaited Popen names: orphans
handed to us, such as a killed `setsid` grandchild or a stopped PostgreSQL server
that `pg_ctl` had daemonized. Reaping them promptly also keeps the host's view what
it is in production, where init reaps them at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import psutil

from taskpool._procs import child_pids

_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>

#: How often orphaned zombies are reaped; init does it at once, this is close enough.
REAP_INTERVAL_S = 0.05


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants; False where the OS
    has no such thing (the suite still runs, but escaped processes are not judged)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(errno)}")
    return True


_HAS_PROC_CHILDREN = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def descendant_pids(pid: int) -> list[int]:
    """Every descendant of `pid`, zombies included."""
    if not _HAS_PROC_CHILDREN:  # pragma: no cover - kernels without CONFIG_PROC_CHILDREN
        with contextlib.suppress(psutil.NoSuchProcess):
            return [p.pid for p in psutil.Process(pid).children(recursive=True)]
        return []
    found: list[int] = []
    stack = [pid]
    while stack:
        children = child_pids(stack.pop())
        found.extend(children)
        stack.extend(children)
    return found


def is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False  # gone already
    return stat[stat.rfind(")") + 2 :].startswith("Z")


def orphans_to_reap(children: list[int], waited_for: set[int]) -> list[int]:
    """Decide which zombie children are ours to reap: those nobody else will wait for."""
    return [pid for pid in children if pid not in waited_for and is_zombie(pid)]


class Reaper:
    """Records Popen spawns; a thread reaps zombie children that no Popen will wait for."""

    def __init__(self) -> None:
        # Held across a whole spawn, so a child that exits at once is recorded before
        # the reaper can see it as an unknown zombie. Reentrant: a signal handler may
        # spawn while the interrupted code is spawning.
        self._lock = threading.RLock()
        self._spawned: weakref.WeakSet[subprocess.Popen[Any]] = weakref.WeakSet()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._original: Callable[..., None] | None = None

    def start(self) -> None:
        original = subprocess.Popen._execute_child  # type: ignore[attr-defined]
        lock, spawned = self._lock, self._spawned

        def execute_child(popen: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> None:
            with lock:
                try:
                    original(popen, *args, **kwargs)
                finally:
                    if getattr(popen, "pid", None) is not None:
                        spawned.add(popen)

        self._original = original
        subprocess.Popen._execute_child = execute_child  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._serve, name="tests-subreaper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._original is not None:
            subprocess.Popen._execute_child = self._original  # type: ignore[attr-defined]

    def reap_once(self) -> list[int]:
        """Reap the orphaned zombies there are now; return their pids."""
        reaped = []
        with self._lock:
            waited_for = {p.pid for p in list(self._spawned) if p.returncode is None}
            for pid in orphans_to_reap(child_pids(os.getpid()), waited_for):
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        reaped.append(pid)
        return reaped

    def _serve(self) -> None:
        while not self._stop.wait(REAP_INTERVAL_S):
            self.reap_once()
