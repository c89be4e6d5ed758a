"""Finding and killing an orphaned attempt's processes (boot-time reconciliation)."""

from __future__ import annotations

import os
import subprocess

import psutil

from taskpool._procs import ATTEMPT_ENV, Leftover, kill_leftovers


def _spawn(marker: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["sleep", "600"], env={**os.environ, ATTEMPT_ENV: marker}, start_new_session=True
    )


def _dead(proc: subprocess.Popen[bytes]) -> bool:
    proc.wait(timeout=10)
    return proc.returncode == -9


def test_unrecorded_processes_are_found_by_their_marker() -> None:
    """An attempt whose spawn was never recorded (the pool died first), or a process that
    escaped its group, is still found by the marker in its environment and killed; a
    process of another attempt is left alone."""
    orphan, escaped, other = _spawn("901:1"), _spawn("901:1"), _spawn("902:1")
    try:
        report = kill_leftovers([Leftover(None, None, "901:1")])
        assert sorted(report["901:1"]) == sorted(
            [f"pid {orphan.pid} (sleep)", f"pid {escaped.pid} (sleep)"]
        )
        assert _dead(orphan)
        assert _dead(escaped)
        assert other.poll() is None
    finally:
        for proc in (orphan, escaped, other):
            proc.kill()
            proc.wait()


def test_a_recorded_group_is_killed_once_and_reported_as_a_group() -> None:
    """A recorded leader (pid and start time match) dies with its group; its members are
    not reported a second time by the marker scan."""
    leader = _spawn("903:2")
    try:
        started = psutil.Process(leader.pid).create_time()
        report = kill_leftovers([Leftover(leader.pid, started, "903:2")])
        assert report == {"903:2": [f"process group {leader.pid}"]}
        assert _dead(leader)
    finally:
        leader.kill()
        leader.wait()
