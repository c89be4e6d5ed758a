"""Finding and killing an orphaned attempt's processes (boot-time reconciliation)."""

from __future__ import annotations

import os
import subprocess
import uuid

import psutil

from taskpool._procs import ATTEMPT_ENV, Leftover, attempt_marker, kill_leftovers, parse_marker

#: Two stores of this test's own: same task ids and fences, different identities.
OURS, THEIRS = uuid.uuid4().hex, uuid.uuid4().hex


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
    marker = attempt_marker(OURS, 901, 1)
    orphan, escaped = _spawn(marker), _spawn(marker)
    other = _spawn(attempt_marker(OURS, 902, 1))
    try:
        report = kill_leftovers([Leftover(None, None, marker)])
        assert sorted(report[marker]) == sorted(
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
    marker = attempt_marker(OURS, 903, 2)
    leader = _spawn(marker)
    try:
        started = psutil.Process(leader.pid).create_time()
        report = kill_leftovers([Leftover(leader.pid, started, marker)])
        assert report == {marker: [f"process group {leader.pid}"]}
        assert _dead(leader)
    finally:
        leader.kill()
        leader.wait()


def test_another_stores_attempt_with_the_same_task_and_fence_is_left_alone() -> None:
    """Task 1 fence 1 exists in every store: reconciliation of ours never touches the
    process of another store's task 1 fence 1."""
    ours, theirs = _spawn(attempt_marker(OURS, 1, 1)), _spawn(attempt_marker(THEIRS, 1, 1))
    try:
        report = kill_leftovers([Leftover(None, None, attempt_marker(OURS, 1, 1))])
        assert report == {attempt_marker(OURS, 1, 1): [f"pid {ours.pid} (sleep)"]}
        assert _dead(ours)
        assert theirs.poll() is None
    finally:
        for proc in (ours, theirs):
            proc.kill()
            proc.wait()


def test_markers_round_trip_and_foreign_values_are_not_markers() -> None:
    """A marker parses back to its parts; old-style or foreign values parse to None."""
    assert parse_marker(attempt_marker(OURS, 7, 3)) == (OURS, 7, 3)
    for value in ("1:1", "", "x:y:z", ":1:1", "a:1:1:1"):
        assert parse_marker(value) is None
