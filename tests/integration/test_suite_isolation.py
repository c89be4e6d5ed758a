"""The test suite's own hygiene: it judges and kills only processes it started, so it
can run beside production pools or another copy of itself (tests/subreaper.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil

from taskpool._procs import ATTEMPT_ENV
from tests.helpers import attempt_processes
from tests.subreaper import is_zombie

ROOT = Path(__file__).resolve().parents[2]

#: The same marker for our process and a stranger's: only the process tree tells them apart.
MARKER = f"{uuid.uuid4().hex}:7:1"


def _until(check: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Poll `check` until it holds; the timeout is a safety net, never the assertion."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{check.__name__} never held"
        time.sleep(0.01)


def _ppid(pid: int) -> int:
    return int(psutil.Process(pid).ppid())


def test_orphans_are_reaped_but_never_a_child_someone_will_wait_for() -> None:
    """An orphan handed to the pytest process (it is a subreaper) is reaped once it dies;
    a zombie child that its Popen has not waited for yet is left alone, so the Popen
    still gets its real exit status."""
    child = subprocess.Popen(["sh", "-c", "exit 7"])
    _until(lambda: is_zombie(child.pid))
    parent = subprocess.Popen(["sh", "-c", "sleep 600 & echo $!"], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    orphan = int(parent.stdout.readline())
    parent.stdout.close()
    assert parent.wait() == 0
    try:
        assert _ppid(orphan) == os.getpid()  # reparented to us, not to init
        os.kill(orphan, signal.SIGKILL)
        _until(lambda: not psutil.pid_exists(orphan))  # reaped: no zombie left
    finally:
        if psutil.pid_exists(orphan) and not is_zombie(orphan):
            os.kill(orphan, signal.SIGKILL)
    assert is_zombie(child.pid)  # the reaper passed it by
    assert child.wait() == 7


def test_a_copy_of_the_suite_fails_its_own_leftover_and_spares_a_strangers(
    tmp_path: Path,
) -> None:
    """A second copy of the suite (a pytest run in a child process) fails a test that
    leaves a marked process behind and kills it, while a process it did not start,
    carrying the very same marker, is neither reported nor touched."""
    stranger = subprocess.Popen(
        ["sleep", "600"], env={**os.environ, ATTEMPT_ENV: MARKER}, start_new_session=True
    )
    try:
        (tmp_path / "pytest.ini").write_text(
            "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
        )
        (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.conftest"]\n')
        (tmp_path / "test_inner.py").write_text(
            textwrap.dedent(
                f"""
                import os
                import subprocess

                def test_leaves_a_process_behind():
                    subprocess.Popen(
                        ["sleep", "600"],
                        env={{**os.environ, {ATTEMPT_ENV!r}: {MARKER!r}}},
                        start_new_session=True,
                    )

                def test_leaves_nothing():
                    pass
                """
            )
        )
        inner = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        out = inner.stdout + inner.stderr
        assert inner.returncode == 1, out
        assert "2 passed, 1 error" in out, out
        assert "ERROR at teardown of test_leaves_a_process_behind" in out, out
        assert "processes left behind: [(" in out, out
        assert f"({stranger.pid}," not in out, out  # never judged

        assert stranger.poll() is None  # never killed
        assert psutil.Process(stranger.pid).status() != psutil.STATUS_ZOMBIE

        def inners_process_gone() -> bool:  # it was our descendant too: we can tell
            return [p.pid for p in attempt_processes()] == [stranger.pid]

        _until(inners_process_gone)  # the inner run killed its own
    finally:
        stranger.kill()
        stranger.wait()
