"""Throwaway PostgreSQL databases for tests, on the server named by TASKPOOL_TEST_PG_DSN
(default: the local server, trust auth). A test that needs one fails loudly if the
server is down: PostgreSQL support is not optional, so its tests are never skipped."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

ADMIN_DSN = os.environ.get("TASKPOOL_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def dsn_for(database: str, admin_dsn: str = ADMIN_DSN) -> str:
    base, _, _ = admin_dsn.rpartition("/")
    return f"{base}/{database}"


@asynccontextmanager
async def fresh_postgres_database(admin_dsn: str = ADMIN_DSN) -> AsyncIterator[str]:
    """Create an empty database, yield its DSN, drop it (and its connections) after."""
    name = f"taskpool_test_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield dsn_for(name, admin_dsn)
        finally:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()
