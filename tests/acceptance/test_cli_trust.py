"""The command line keeps secrets: it stores only what is named, shows no env value
unless asked, prints no password, and never creates a database by reading one.
Every command runs as a real process; the worker runs real tasks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import anyio
import asyncpg
import pytest

from taskpool import Status
from tests.helpers import eventually, no_attempt_processes, open_store
from tests.postgres import fresh_postgres_database

ROOT = Path(__file__).resolve().parents[2]


def run_cli(
    *args: str, env: dict[str, str] | None = None, db: str | None = None
) -> subprocess.CompletedProcess[str]:
    prefix = ["--db", db] if db is not None else []
    return subprocess.run(
        [sys.executable, "-m", "taskpool", *prefix, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_submit_env_stores_exactly_what_is_named_and_shows_no_value(database: str) -> None:
    """`--env X=1` stores X alone (not the submitter's tokens); show and ls mask its value
    in text and JSON unless --show-env; `--pass-env` stores the name only."""
    secret = f"tok-{uuid.uuid4().hex}"
    submitter = {**os.environ, "SUBMITTERS_TOKEN": secret, "API_TOKEN": secret}
    task = json.loads(
        ok(
            run_cli(
                "--json",
                "submit",
                "--env",
                "X=value-1",
                "--pass-env",
                "API_TOKEN",
                "--",
                "true",
                db=database,
                env=submitter,
            )
        )
    )["id"]
    async with open_store(database) as store:
        spec = (await store.get(task)).spec
    assert spec.env == {"X": "value-1"}
    assert spec.pass_env == frozenset({"API_TOKEN"})
    assert spec.inherit_env is True

    shown = json.loads(ok(run_cli("--json", "show", str(task), db=database)))
    assert shown["task"]["spec"]["env"] == {"X": "***"}
    assert shown["task"]["spec"]["pass_env"] == ["API_TOKEN"]
    listed = json.loads(ok(run_cli("--json", "ls", db=database)))
    assert listed[0]["spec"]["env"] == {"X": "***"}
    text = ok(run_cli("show", str(task), db=database))
    assert "env: X=***  pass-env: API_TOKEN" in text
    for output in (json.dumps(shown), json.dumps(listed), text):
        assert "value-1" not in output
        assert secret not in output

    asked = json.loads(ok(run_cli("--json", "--show-env", "show", str(task), db=database)))
    assert asked["task"]["spec"]["env"] == {"X": "value-1"}
    assert "env: X=value-1" in ok(run_cli("--show-env", "show", str(task), db=database))


def _pg_url_with_password(dsn: str, password: str) -> str:
    """The same database with a password in the URL (the local server's trust auth ignores it)."""
    scheme, _, rest = dsn.partition("://")
    userinfo, _, hostpart = rest.partition("@")
    return f"{scheme}://{userinfo}:{password}@{hostpart}"


async def test_a_worker_prints_no_password_and_hands_none_to_its_tasks() -> None:
    """A worker given its DSN (with a password) in TASKPOOL_DB, and PGPASSWORD, prints the
    DSN redacted; its task sees neither, but does get the variable it named with --pass-env."""
    async with fresh_postgres_database() as plain:
        dsn = _pg_url_with_password(plain, "hunter2")
        worker_env = {
            **os.environ,
            "TASKPOOL_DB": dsn,
            "PGPASSWORD": "hunter2",
            "API_TOKEN": "from-the-worker",
        }
        script = (
            "env | grep -v '^API_TOKEN=' | grep -E '^(TASKPOOL_|PG)' ; "
            'printf "token=%s\\n" "$API_TOKEN"'
        )
        task = json.loads(
            ok(
                run_cli(
                    "--json",
                    "submit",
                    "--pass-env",
                    "API_TOKEN",
                    "--",
                    "sh",
                    "-c",
                    script,
                    db=plain,
                )
            )
        )["id"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "taskpool", "worker", "--log-format", "json"],
            cwd=ROOT,
            env=worker_env,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:

            async def finished() -> bool:
                async with open_store(plain) as store:
                    return (await store.get(task)).is_terminal

            await eventually(finished)
            proc.send_signal(signal.SIGTERM)
            _, stderr = await anyio.to_thread.run_sync(lambda: proc.communicate(timeout=60))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, stderr
        assert "hunter2" not in stderr
        assert f"on {_pg_url_with_password(plain, '***')}" in stderr
        output = ok(run_cli("logs", str(task), db=plain))
        assert output.splitlines()[-1] == "token=from-the-worker"
        own = [line.split("=")[0] for line in output.splitlines()[:-1]]
        assert own == ["TASKPOOL_ATTEMPT"], output
        async with open_store(plain) as store:
            assert (await store.get(task)).status is Status.SUCCEEDED
    assert await no_attempt_processes()


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://taskpool:hunter2@127.0.0.1:1/app",  # refused
        "postgresql://taskpool:hunter2@127.0.0.1:notaport/app",  # malformed
        "postgresql://127.0.0.1:1/app?user=taskpool&password=hunter2",
    ],
)
def test_a_cli_error_never_prints_the_password(dsn: str) -> None:
    """A command that cannot reach its database exits 1 naming it, password masked."""
    result = run_cli("ls", db=dsn)
    assert result.returncode == 1
    assert "taskpool: error:" in result.stderr
    assert "hunter2" not in result.stderr
    assert "***" in result.stderr


@pytest.mark.parametrize(
    "command",
    [["ls"], ["show", "1"], ["logs", "1"], ["nodes"], ["stale"], ["cancel", "1"], ["retry", "1"]],
)
def test_a_read_command_never_creates_a_database(tmp_path: Path, command: list[str]) -> None:
    """A mistyped --db is a clear error and exit 1, not a new empty file in a new directory."""
    typo = tmp_path / "tpyo" / "tasks.db"
    result = run_cli(*command, db=str(typo))
    assert result.returncode == 1
    assert f"no taskpool database at {str(typo)!r}" in result.stderr
    assert not (tmp_path / "tpyo").exists()


async def test_a_read_command_never_creates_taskpool_tables_in_a_postgres_database() -> None:
    """`ls` against a database holding no taskpool tables fails and leaves it untouched."""
    async with fresh_postgres_database() as dsn:
        result = await anyio.to_thread.run_sync(lambda: run_cli("ls", db=dsn))
        assert result.returncode == 1
        assert "holds no taskpool tables" in result.stderr
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT to_regclass('taskpool_schema_version')") is None
        finally:
            await conn.close()


def test_submit_creates_private_files(tmp_path: Path) -> None:
    """`submit` may create the database: 0600 files in 0700 directories, even under umask 022."""
    path = tmp_path / "fresh" / "tasks.db"
    result = subprocess.run(
        [
            "sh",
            "-c",
            'umask 022 && exec "$0" -m taskpool --db "$1" submit -- true',
            sys.executable,
            str(path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert oct(os.stat(path.parent).st_mode & 0o777) == "0o700"
    for suffix in ("-wal", "-shm"):
        extra = Path(f"{path}{suffix}")
        if extra.exists():  # a clean close may have removed them
            assert oct(os.stat(extra).st_mode & 0o777) == "0o600"
