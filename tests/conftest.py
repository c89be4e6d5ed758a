from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, settings

from taskpool._procs import ATTEMPT_ENV
from tests import postgres
from tests.helpers import attempt_processes
from tests.postgres import fresh_postgres_database
from tests.subreaper import Reaper, become_subreaper

#: How long a process left behind may take to finish dying before the test fails.
LEFT_BEHIND_GRACE_S = 10.0

_reaper: Reaper | None = None

# On a loaded host (two copies of the suite on two cores) drawing an example can take
# seconds for reasons outside the test; slowness is never what a property checks.
# Tests that list their own suppressed health checks add `too_slow` themselves.
settings.register_profile("taskpool", suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("taskpool")


def pytest_configure(config: pytest.Config) -> None:
    """Before any test starts a process: keep every process of this run in our tree."""
    global _reaper
    # Were the suite itself run as a taskpool task, every process it starts would
    # inherit the marker and look like an attempt: ours carry only the ones we give.
    os.environ.pop(ATTEMPT_ENV, None)
    if _reaper is None and become_subreaper():
        _reaper = Reaper()
        _reaper.start()


def pytest_unconfigure(config: pytest.Config) -> None:
    global _reaper
    try:
        postgres.stop_session_server()
    finally:
        if _reaper is not None:
            _reaper.stop()
            _reaper = None


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A fresh SQLite file for one test."""
    return tmp_path / "tasks.db"


@pytest.fixture(params=["sqlite", "postgres"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database of each backend, named the way TaskPool accepts it."""
    if request.param == "sqlite":
        yield str(tmp_path / "tasks.db")
    else:
        async with fresh_postgres_database() as dsn:
            yield dsn


def _dead(proc: psutil.Process) -> bool:
    try:
        return bool(proc.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(autouse=True)
def _no_process_left_behind() -> Iterator[None]:
    """Every test must leave no attempt process of its own alive; one that does fails
    (and is killed). Processes that this run did not start are never looked at."""
    yield
    left = attempt_processes()
    if not left:
        return
    deadline = time.monotonic() + LEFT_BEHIND_GRACE_S  # a safety net for dying processes
    while time.monotonic() < deadline and not all(_dead(p) for p in left):
        time.sleep(0.05)
    alive = [p for p in left if not _dead(p)]
    names = []
    for proc in alive:
        try:
            names.append((proc.pid, proc.name(), proc.environ().get(ATTEMPT_ENV)))
            proc.kill()  # psutil checks pid and start time: never a recycled pid
        except psutil.NoSuchProcess:
            continue
    # The reaper thread reaps those handed to us; a test's own Popen reaps its child.
    assert not alive, f"processes left behind: {names}"


@pytest.fixture(params=["cgroup", "process-group"])
def both_containments(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs the test once per containment mode (in-process pools and pool processes)."""
    from tests.helpers import CONTAINMENT_ENV

    monkeypatch.setenv(CONTAINMENT_ENV, request.param)
    return str(request.param)


@pytest.fixture
def without_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pools started in processes of their own run with no guard process: the guard would
    kill a SIGKILLed pool's orphans at once (tests/acceptance/test_guard_bound.py), and
    these tests prove what is left when the guard is gone too: the next boot's (or a
    live sibling's) reconciliation."""
    monkeypatch.setenv("TASKPOOL_TEST_GUARD", "off")
