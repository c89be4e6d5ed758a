from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.helpers import attempt_processes


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A fresh SQLite file for one test."""
    return tmp_path / "tasks.db"


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
