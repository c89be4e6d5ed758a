"""No secret at rest, nothing readable by others, nothing stored unchecked (both backends).

Tasks run as real processes under a real pool; what is at rest is read back from the
database itself (SQLite's file bytes, PostgreSQL's rows as text).
"""

from __future__ import annotations

import os
import sqlite3
import stat
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from taskpool import InvalidTask, PostgresStore, SQLiteStore, Status, StoreError, TaskSpec
from taskpool._models import INT32_MAX, INT32_MIN
from taskpool.stores.postgres import migrations as postgres_migrations
from taskpool.stores.sqlite import migrations as sqlite_migrations
from taskpool.testing import MemoryStore
from tests.helpers import fast_pool, open_store
from tests.postgres import admin_dsn, dsn_for

_DUMP_TABLES = ("taskpool_tasks", "taskpool_events", "taskpool_output", "taskpool_attempts")


async def _everything_stored(database: str) -> bytes:
    """Every byte the database holds for taskpool (SQLite: the files; PostgreSQL: rows)."""
    if not database.startswith("postgresql://"):
        return b"".join(
            Path(f"{database}{suffix}").read_bytes()
            for suffix in ("", "-wal")
            if Path(f"{database}{suffix}").exists()
        )
    conn = await asyncpg.connect(database)
    try:
        parts = [
            await conn.fetchval(f"SELECT coalesce(string_agg(t::text, ' '), '') FROM {table} t")
            for table in _DUMP_TABLES
        ]
    finally:
        await conn.close()
    return " ".join(parts).encode()


async def test_a_secret_reaches_its_task_but_never_the_database(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass_env secret is in the task's environment and nowhere at rest; the worker's
    TASKPOOL_* and PG* variables (its DSN and password) never reach any task."""
    secret = f"tok-{uuid.uuid4().hex}"
    monkeypatch.setenv("API_TOKEN", secret)
    monkeypatch.setenv("TASKPOOL_DB", "postgresql://taskpool:hunter2@db.internal/app")
    monkeypatch.setenv("TASKPOOL_MAX_PARALLEL", "4")
    monkeypatch.setenv("PGPASSWORD", "hunter2")
    monkeypatch.setenv("INHERITED_SETTING", "kept")
    show_token = 'printf %s "$API_TOKEN" | od -An -tx1 | tr -d " \\n"'
    async with fast_pool(database) as pool:
        passed = await pool.submit(["sh", "-c", show_token], pass_env=["API_TOKEN"])
        inherited = await pool.submit(["sh", "-c", "env | grep -v '^API_TOKEN='"], env={"X": "1"})
        clean = await pool.submit(
            ["/bin/sh", "-c", "env | sed 's/^API_TOKEN=.*/API_TOKEN=passed/'"],
            env={"X": "1"},
            pass_env=["API_TOKEN", "UNSET_ON_WORKER"],
            inherit_env=False,
        )
        for task in (passed, inherited, clean):
            assert (await pool.wait(task)).status is Status.SUCCEEDED
        assert await pool.output(passed) == secret.encode().hex()
        lines = (await pool.output(inherited)).splitlines()
        clean_env = dict(line.split("=", 1) for line in (await pool.output(clean)).splitlines())
        stored = await pool.get(passed)
    assert "INHERITED_SETTING=kept" in lines
    assert "X=1" in lines
    own = [line for line in lines if line.startswith(("TASKPOOL_", "PG"))]
    assert [line.split("=")[0] for line in own] == ["TASKPOOL_ATTEMPT"]
    assert not any("hunter2" in line for line in lines)
    shells_own = {"PWD", "OLDPWD", "SHLVL", "_"}  # what sh adds to any environment
    assert set(clean_env) - shells_own == {"X", "API_TOKEN", "TASKPOOL_ATTEMPT"}
    assert clean_env["API_TOKEN"] == "passed"
    assert (stored.spec.env, stored.spec.pass_env) == (None, frozenset({"API_TOKEN"}))
    at_rest = await _everything_stored(database)
    assert b"API_TOKEN" in at_rest  # the name is stored ...
    assert secret.encode() not in at_rest  # ... its value is not
    assert b"hunter2" not in at_rest


async def test_bad_or_oversized_submits_store_nothing(database: str) -> None:
    """Overflowing integers, wrong types and a 100 MB argv are InvalidTask naming the field
    or limit, at the pool and at the store itself (a spec made by hand); nothing is stored."""
    huge = "x" * (100 * 1024 * 1024)
    async with fast_pool(database) as pool:
        cases: list[tuple[Any, dict[str, Any], str]] = [
            (["true"], {"max_attempts": 10**30}, "max_attempts"),
            (["true"], {"priority": 10**30}, "priority"),
            (None, {}, "argv"),
            (123, {}, "argv"),
            (["echo", huge], {}, "MAX_ARGV_BYTES"),
        ]
        for argv, options, field in cases:
            with pytest.raises(InvalidTask, match=field):
                await pool.submit(argv, **options)
        for spec, field in [
            (TaskSpec(argv=("true",), max_attempts=10**30), "max_attempts"),
            (TaskSpec(argv=("true",), priority=10**30), "priority"),
            (TaskSpec(argv=("echo", huge)), "MAX_ARGV_BYTES"),
            (TaskSpec(argv=("true",), env={"TASKPOOL_DB": "x"}), "reserved"),
        ]:
            with pytest.raises(InvalidTask, match=field):
                await pool.store.submit(spec)
        assert await pool.list_tasks() == []
    del huge
    async with open_store(database) as store:
        assert await store.list_tasks() == []


# --- a valid spec round-trips through every store -----------------------------------

_TEXT = st.text(st.characters(exclude_characters="\x00", codec="utf-8"), max_size=12)
_NAMES = st.text(
    st.characters(exclude_characters="\x00=", codec="utf-8"), min_size=1, max_size=8
).filter(lambda n: not n.startswith(("TASKPOOL_", "PG")))
_SECONDS = st.floats(min_value=1e-9, max_value=1e12)


@st.composite
def valid_specs(draw: st.DrawFn) -> TaskSpec:
    env = draw(st.none() | st.dictionaries(_NAMES, _TEXT, max_size=4))
    try:
        return TaskSpec.build(
            draw(st.lists(_TEXT, min_size=1, max_size=5)),
            cwd=draw(st.none() | _TEXT),
            env=env,
            pass_env=draw(
                st.frozensets(_NAMES, max_size=3).filter(lambda p: not p & set(env or ()))
            ),
            inherit_env=draw(st.booleans()),
            project=draw(_TEXT.filter(bool)),
            template=draw(st.none() | _TEXT.filter(bool)),
            template_parallel=draw(st.booleans()),
            locks=draw(st.lists(_TEXT.filter(bool), max_size=3)),
            priority=draw(st.integers(INT32_MIN, INT32_MAX)),
            not_before=draw(st.none() | st.floats(-1e12, 1e12)),
            timeout_s=draw(st.none() | _SECONDS),
            stall_timeout_s=draw(st.none() | _SECONDS),
            max_attempts=draw(st.integers(1, INT32_MAX)),
            retry_backoff_s=draw(st.floats(0, 1e12)),
        )
    except InvalidTask:
        assume(False)
        raise


@pytest.fixture(scope="module")
def roundtrip_postgres() -> Iterator[str]:
    """One database for every example of the round-trip property (each reads back its own ids)."""
    name = f"taskpool_test_{uuid.uuid4().hex[:16]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(admin_dsn())
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    anyio.run(admin, f'CREATE DATABASE "{name}"')
    try:
        yield dsn_for(name)
    finally:
        anyio.run(admin, f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "memory"])
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(specs=st.lists(valid_specs(), min_size=1, max_size=6))
def test_a_valid_spec_round_trips_through_every_store(
    backend: str, specs: list[TaskSpec], roundtrip_postgres: str
) -> None:
    """submit then get gives back exactly the spec that was built, on every backend."""

    async def run() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            store = {
                "sqlite": lambda: SQLiteStore(Path(tmp) / "t.db"),
                "postgres": lambda: PostgresStore(roundtrip_postgres, max_size=2),
                "memory": MemoryStore,
            }[backend]()
            async with store:
                ids = [await store.submit(spec) for spec in specs]
                got = [(await store.get(task_id)).spec for task_id in ids]
        assert got == specs

    anyio.run(run)


# --- schema versions ------------------------------------------------------------------


async def test_a_newer_schema_is_refused_at_open(database: str) -> None:
    """A database migrated by a newer taskpool is a clear StoreError at open, both backends."""
    async with open_store(database):
        pass
    if database.startswith("postgresql://"):
        known = postgres_migrations()[-1][0]
        conn = await asyncpg.connect(database)
        try:
            await conn.execute(
                "INSERT INTO taskpool_schema_version (version, applied_at) VALUES ($1, 0)",
                known + 5,
            )
        finally:
            await conn.close()
    else:
        known = sqlite_migrations()[-1][0]
        with sqlite3.connect(database) as conn:
            conn.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (?, 0)", (known + 5,)
            )
        conn.close()
    store = open_store(database)
    with pytest.raises(StoreError) as excinfo:
        await store.open()
    assert str(excinfo.value) == (
        f"schema version {known + 5} is newer than this taskpool supports ({known});"
        " upgrade taskpool to use this database"
    )


# --- files ----------------------------------------------------------------------------


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The common permissive umask (022), so modes show what taskpool asked for."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.usefixtures("open_umask")
async def test_sqlite_files_are_private_to_their_owner(tmp_path: Path) -> None:
    """The database, its -wal and -shm are 0600 and the directories taskpool made 0700."""
    path = tmp_path / "new" / "nested" / "tasks.db"
    async with SQLiteStore(path) as store:
        await store.submit(TaskSpec.build(["true"]))
        files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
        assert all(f.exists() for f in files)
        assert {f.name: oct(_mode(f)) for f in files} == {f.name: "0o600" for f in files}
    assert oct(_mode(tmp_path / "new")) == "0o700"
    assert oct(_mode(tmp_path / "new" / "nested")) == "0o700"


@pytest.mark.usefixtures("open_umask")
async def test_a_pool_creates_its_sqlite_files_private(tmp_path: Path) -> None:
    """`TaskPool("path")` creates the same private files while running tasks."""
    path = tmp_path / "pool" / "tasks.db"
    async with fast_pool(str(path)) as pool:
        assert (await pool.wait(await pool.submit(["true"]))).status is Status.SUCCEEDED
        for f in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            assert oct(_mode(f)) == "0o600", f
    assert oct(_mode(path.parent)) == "0o700"


async def test_an_sqlite_store_that_may_not_create_never_does(tmp_path: Path) -> None:
    """`create=False` on a missing file is a StoreError naming it; no file or directory appears."""
    path = tmp_path / "typo" / "tasks.db"
    with pytest.raises(StoreError, match=r"no taskpool database at .*typo/tasks\.db"):
        await SQLiteStore(path, create=False).open()
    assert not (tmp_path / "typo").exists()
    async with SQLiteStore(tmp_path / "real.db") as store:
        task = await store.submit(TaskSpec.build(["true"]))
    async with SQLiteStore(tmp_path / "real.db", create=False) as store:
        assert (await store.get(task)).spec.argv == ("true",)


async def test_a_postgres_store_that_may_not_create_leaves_a_foreign_database_alone() -> None:
    """`create=False` on a database without taskpool's tables is a StoreError; none are made."""
    from tests.postgres import fresh_postgres_database

    async with fresh_postgres_database() as dsn:
        with pytest.raises(StoreError, match="holds no taskpool tables"):
            await PostgresStore(dsn, create=False).open()
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT to_regclass('taskpool_tasks')") is None
            assert await conn.fetchval("SELECT to_regclass('taskpool_schema_version')") is None
        finally:
            await conn.close()


# --- redaction at the PostgreSQL boundary ---------------------------------------------


def _chain(exc: BaseException) -> str:
    texts: list[str] = []
    current: BaseException | None = exc
    while current is not None:
        texts += [str(current), repr(current)]
        current = current.__cause__ or current.__context__
    return "\n".join(texts)


async def test_postgres_store_never_shows_its_password() -> None:
    """repr and the errors of a failed open (refused, malformed) mask the DSN's password."""
    refused = PostgresStore("postgresql://taskpool:hunter2@127.0.0.1:1/app")
    assert "hunter2" not in repr(refused)
    assert "taskpool:***@127.0.0.1:1/app" in repr(refused)
    with pytest.raises(StoreError) as excinfo:
        await refused.open()
    assert "hunter2" not in _chain(excinfo.value)
    assert "postgresql://taskpool:***@127.0.0.1:1/app" in str(excinfo.value)
    with pytest.raises(StoreError) as excinfo:
        await PostgresStore("postgresql://taskpool:hunter2@127.0.0.1:notaport/app").open()
    assert "hunter2" not in _chain(excinfo.value)


async def test_a_driver_error_that_echoes_the_dsn_is_scrubbed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A driver exception quoting the DSN (or the bare password) is redacted, cause included."""
    dsn = "postgresql://taskpool:p%40ss-hunter2@127.0.0.1:5432/app"

    async def echoing_create_pool(given: str, **_: Any) -> None:
        raise asyncpg.InterfaceError(f"cannot use {given!r}: password p@ss-hunter2 rejected")

    monkeypatch.setattr(asyncpg, "create_pool", echoing_create_pool)
    with pytest.raises(StoreError) as excinfo:
        await PostgresStore(dsn).open()
    assert "hunter2" not in _chain(excinfo.value)
    assert isinstance(excinfo.value.__cause__, asyncpg.InterfaceError)
