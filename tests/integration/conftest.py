"""Fixtures the integration tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from taskpool import Store
from taskpool.testing import MemoryStore
from tests.helpers import open_store
from tests.postgres import fresh_postgres_database


@pytest.fixture(params=["sqlite", "postgres", "memory"])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An open store of each of the three backends, on an empty database."""
    if request.param == "memory":
        async with MemoryStore() as memory:
            yield memory
    elif request.param == "sqlite":
        async with open_store(str(tmp_path / "tasks.db")) as store:
            yield store
    else:
        async with fresh_postgres_database() as dsn, open_store(dsn) as store:
            yield store
