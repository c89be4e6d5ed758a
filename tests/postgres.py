"""Throwaway PostgreSQL databases for tests.

They live on the server named by TASKPOOL_TEST_PG_DSN (an admin DSN, trust auth) if
it is set; else on a server of the test session's own, started on first use and
removed when the session ends (tests/pg_cluster.py). Once started, its DSN is put in
TASKPOOL_TEST_PG_DSN, so every process the tests start sees the same server. The
suite never depends on a server it did not start or was not told about.

PostgreSQL support is not optional: a test that needs a database fails loudly when
no server can be had; it is never skipped.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager

import anyio.to_thread
import asyncpg

from tests import pg_cluster

DSN_ENV = "TASKPOOL_TEST_PG_DSN"

#: A throwaway server need not survive a crash; the suite opens many pools at once.
SESSION_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
}

_lock = threading.Lock()
_session: pg_cluster.Cluster | None = None
_session_stack = ExitStack()


def admin_dsn() -> str:
    """The DSN of the server to create test databases on (starting ours if needed)."""
    global _session
    with _lock:
        named = os.environ.get(DSN_ENV)
        if named:
            return named
        _session = _session_stack.enter_context(pg_cluster.private_cluster(SESSION_SETTINGS))
        os.environ[DSN_ENV] = _session.dsn
        return _session.dsn


def stop_session_server() -> None:
    """Stop and remove the session's own server, if one was started."""
    global _session
    with _lock:
        if _session is not None and os.environ.get(DSN_ENV) == _session.dsn:
            del os.environ[DSN_ENV]
        _session = None
        _session_stack.close()


def dsn_for(database: str, admin: str | None = None) -> str:
    base, _, _ = (admin or admin_dsn()).rpartition("/")
    return f"{base}/{database}"


@asynccontextmanager
async def fresh_postgres_database(admin: str | None = None) -> AsyncIterator[str]:
    """Create an empty database, yield its DSN, drop it (and its connections) after."""
    admin = admin or await anyio.to_thread.run_sync(admin_dsn)  # may start the server
    name = f"taskpool_test_{uuid.uuid4().hex[:16]}"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield dsn_for(name, admin)
        finally:
            await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await conn.close()
