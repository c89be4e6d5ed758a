"""What the command line prints is the operator's to trust: a task's output, argv and
names never drive the terminal; the commands answer alike (a missing task, a task not
finished, a retry); and a `--log-format json` worker writes nothing but JSON lines on
stderr, through an outage of its database too. Every command runs as a real process."""

from __future__ import annotations

import errno
import json
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio

from taskpool import Limits, NodeInfo, Status, TaskSpec
from taskpool._models import Outcome, OutcomeKind
from tests.helpers import eventually, no_attempt_processes, open_store
from tests.pg_cluster import private_cluster

ROOT = Path(__file__).resolve().parents[2]
TASKPOOL = [sys.executable, "-m", "taskpool"]

#: A task's output that would erase the operator's previous line, set the terminal's
#: title, hide text behind a carriage return, and colour what follows.
HOSTILE = "ok\n\x1b[1A\x1b[2Kforged\n\x1b]0;pwned\x07ERROR\rfine \n\x1b[31mred\x1b[0m\n"
NEUTRAL = "ok\n\\x1b[1A\\x1b[2Kforged\n\\x1b]0;pwned\\x07ERROR\nfine \nred\n"


def run(
    database: str, *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TASKPOOL, "--db", database, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


async def _finished_with_output(database: str, text: str, argv: list[str]) -> int:
    """A task that ran and printed `text` exactly (written through the store)."""
    async with open_store(database) as store:
        await store.submit(TaskSpec.build(argv))
        now = time.time()
        await store.register_node(NodeInfo("n", "h", 1, now, now, now, None, 1))
        [claim] = await store.claim("n", Limits(max_parallel=1), lease_ttl_s=60)
        await store.append_output(claim.task.id, claim.fence, [text])
        await store.finish(claim.task.id, claim.fence, Outcome(OutcomeKind.EXITED, "ok", 0))
        return claim.task.id


def _on_a_terminal(args: list[str]) -> str:
    """What `args` writes on a pseudo-terminal (its newlines as the terminal gets them)."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(args, cwd=ROOT, stdout=terminal, stderr=subprocess.PIPE)
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            break  # EIO: every writer is gone
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    return b"".join(chunks).decode().replace("\r\n", "\n")


async def test_logs_show_control_sequences_instead_of_obeying_them(database: str) -> None:
    """`logs` and `logs -f` print the sequences as text (colours dropped into a pipe,
    kept on a terminal, then reset); `--raw` prints the output as stored."""
    task = await _finished_with_output(database, HOSTILE, ["sh", "-c", "hostile"])
    assert ok(run(database, "logs", str(task))) == NEUTRAL
    assert ok(run(database, "logs", "-f", str(task))) == NEUTRAL
    raw = subprocess.run(
        [*TASKPOOL, "--db", database, "logs", "--raw", str(task)],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert raw.stdout.decode() == HOSTILE  # bytes: text mode would turn \r into \n
    on_terminal = _on_a_terminal([*TASKPOOL, "--db", database, "logs", str(task)])
    assert on_terminal == NEUTRAL.replace("red\n", "\x1b[31mred\x1b[0m\n")
    assert "\x1b]" not in on_terminal
    assert "\x1b[1A" not in on_terminal


async def test_ls_and_show_escape_argv_and_names(tmp_path: Path) -> None:
    """A task named and commanded to drive the terminal shows as one escaped line in
    `ls`, and escaped in `show`; JSON keeps the exact values."""
    db = str(tmp_path / "t.db")
    project = "infra\x1b]0;pwned\x07"
    argv = ["printf", "\x1b[2J\nrm -rf /\u202e"]
    task = json.loads(ok(run(db, "--json", "submit", "--project", project, "--", *argv)))["id"]
    listed = ok(run(db, "ls"))
    assert listed.count("\n") == 1
    assert "\x1b" not in listed
    assert "\\x1b]0;pwned\\x07" in listed
    shown = ok(run(db, "show", str(task)))
    assert "\x1b" not in shown
    assert "\u202e" not in shown
    assert "command: printf '\\x1b[2J\\nrm -rf /\\u202e'" in shown
    exact = json.loads(ok(run(db, "--json", "show", str(task))))["task"]["spec"]
    assert (exact["project"], exact["argv"]) == (project, argv)


async def test_a_missing_task_is_missing_to_every_command(tmp_path: Path) -> None:
    """`logs 9999` and `logs -f 9999` say so and exit 1, as `show` does."""
    db = str(tmp_path / "t.db")
    ok(run(db, "submit", "--", "true"))  # the database exists
    for command in (["logs", "9999"], ["logs", "-f", "9999"], ["show", "9999"]):
        result = run(db, *command)
        assert result.returncode == 1, command
        assert "TaskNotFound: no task 9999" in result.stderr
        assert result.stdout == ""


async def test_show_never_says_none_and_a_retry_says_what_it_retries(tmp_path: Path) -> None:
    """A task that never ran shows no `exit code: None`; its retry's events (and
    reason, until it runs) name the task it retries."""
    db = str(tmp_path / "t.db")
    task = json.loads(ok(run(db, "--json", "submit", "--", "true")))["id"]
    assert "exit code: -" in ok(run(db, "show", str(task)))
    assert json.loads(ok(run(db, "--json", "cancel", str(task))))["status"] == "cancelled"
    again = json.loads(ok(run(db, "--json", "retry", str(task))))["id"]
    shown = ok(run(db, "show", str(again)))
    assert "None" not in shown
    assert f"- -> waiting: retry of task {task}" in shown
    events = json.loads(ok(run(db, "--json", "show", str(again))))["events"]
    assert [(e["to_status"], e["reason"]) for e in events] == [("waiting", f"retry of task {task}")]


async def test_a_relative_cwd_is_the_submitters(tmp_path: Path) -> None:
    """`--cwd build` from /x means /x/build, whatever the worker's own directory."""
    db = str(tmp_path / "t.db")
    (tmp_path / "build").mkdir()
    task = json.loads(ok(run(db, "--json", "submit", "--cwd", "build", "--", "pwd", cwd=tmp_path)))
    spec = json.loads(ok(run(db, "--json", "show", str(task["id"]))))["task"]["spec"]
    assert spec["cwd"] == str(tmp_path / "build")
    env = {**os.environ, "TASKPOOL_SUBMIT_CWD": "build"}  # the variable too
    task = json.loads(ok(run(db, "--json", "submit", "--", "pwd", cwd=tmp_path, env=env)))
    spec = json.loads(ok(run(db, "--json", "show", str(task["id"]))))["task"]["spec"]
    assert spec["cwd"] == str(tmp_path / "build")


def _json_lines(stderr: str) -> list[dict[str, object]]:
    """Every line of `stderr`, each of which must be one JSON object."""
    records = []
    for line in stderr.splitlines():
        record = json.loads(line)  # fails the test on any plain line
        assert isinstance(record, dict), line
        records.append(record)
    return records


async def test_a_json_worker_writes_only_json_even_through_an_outage() -> None:
    """The worker's own lines, the pool's records, the driver's warnings while its
    database is down, and the crash that ends it: each a JSON object on one line."""
    with private_cluster() as cluster:
        task = json.loads(ok(run(cluster.dsn, "--json", "submit", "--", "sleep", "600")))["id"]
        env = {**os.environ, "TASKPOOL_STORE_OUTAGE_TOLERANCE_S": "1"}
        proc = subprocess.Popen(
            [*TASKPOOL, "--db", cluster.dsn, "worker", "--lease-ttl", "3", "--log-format", "json"],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:

            async def running() -> bool:
                async with open_store(cluster.dsn) as store:
                    return (await store.get(task)).status is Status.RUNNING

            await eventually(running)
            await anyio.to_thread.run_sync(cluster.stop)
            _, stderr = await anyio.to_thread.run_sync(lambda: proc.communicate(timeout=60))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 1
    records = _json_lines(stderr)
    messages = [str(r["message"]) for r in records]
    assert any(m.startswith("taskpool worker: node ") for m in messages)
    assert any("PoolCrashed" in m and "caused by StoreUnavailable" in m for m in messages)
    assert records[-1]["level"] == "error"
    assert await no_attempt_processes()


async def test_a_json_worker_says_its_signals_in_json(tmp_path: Path) -> None:
    """Start, a task, SIGTERM and the orderly stop: JSON lines only, exit 0."""
    db = str(tmp_path / "t.db")
    task = json.loads(ok(run(db, "--json", "submit", "--", "sh", "-c", "echo hi")))["id"]
    proc = subprocess.Popen(
        [*TASKPOOL, "--db", db, "worker", "--log-format", "json"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        async def done() -> bool:
            async with open_store(db) as store:
                return (await store.get(task)).status is Status.SUCCEEDED

        await eventually(done)
        proc.send_signal(signal.SIGTERM)
        _, stderr = await anyio.to_thread.run_sync(lambda: proc.communicate(timeout=60))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    messages = [str(r["message"]) for r in _json_lines(stderr)]
    assert any(m.startswith("taskpool worker: SIGTERM, shutting down") for m in messages)
    assert any(m.startswith("taskpool worker: node ") for m in messages)


def test_uncaught_exceptions_and_the_guard_log_json_too(tmp_path: Path) -> None:
    """What no logger wrote: an exception nobody caught, in the main thread or
    another, and the node's guard process (told by TASKPOOL_LOG_FORMAT)."""
    crash = (
        "import threading; from taskpool.cli._worker import _configure_logging;"
        " _configure_logging('json');"
        " t = threading.Thread(target=lambda: 1 / 0); t.start(); t.join();"
        " raise RuntimeError('boom')"
    )
    result = subprocess.run(
        [sys.executable, "-c", crash], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    records = _json_lines(result.stderr)
    assert [r["level"] for r in records] == ["critical", "critical"]
    assert "ZeroDivisionError" in str(records[0]["exception"])
    assert "RuntimeError: boom" in str(records[1]["exception"])
    guard = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            str(ROOT / "taskpool" / "_guard_process.py"),
            "--pool-pid",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TASKPOOL_LOG_FORMAT": "json"},
    )
    [record] = _json_lines(guard.stderr)
    assert "the pool process is gone already" in str(record["message"])
