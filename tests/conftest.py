from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest

from tests.helpers import attempt_processes
from tests.postgres import fresh_postgres_database


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


@pytest.fixture(autouse=True)
def _no_process_left_behind() -> Iterator[None]:
    """Every test must leave no attempt process alive; one that does fails (and is cleaned)."""
    yield
    left = attempt_processes()
    if not left:
        return
    _, alive = psutil.wait_procs(left, timeout=5)
    for proc in alive:
        proc.kill()
    assert not alive, f"processes left behind: {[(p.pid, p.name()) for p in alive]}"
