"""`taskpool web`: the dashboard served alone on a store, by the real CLI over real HTTP."""

from __future__ import annotations

import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.acceptance.test_cli import ROOT, cli
from tests.helpers import SAFETY_TIMEOUT_S

TOKEN = "a-token-of-enough-length"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _serve(database: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "taskpool", "--db", database, "web", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_listening(port: int, proc: subprocess.Popen[str]) -> None:
    """Until the server accepts connections (or has exited: then fail with its stderr)."""
    deadline = time.monotonic() + SAFETY_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("taskpool web never listened")


def _first_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    ready = select.select([proc.stdout], [], [], SAFETY_TIMEOUT_S)[0]
    assert ready, "taskpool web said nothing"
    return proc.stdout.readline()


def test_web_serves_the_dashboard_on_the_store_and_stops_on_sigint(database: str) -> None:
    """The tasks page lists a submitted task; without the token it asks for it and
    refuses actions; SIGINT stops the server cleanly."""
    submitted = cli(database, "submit", "--project", "reports", "--", "echo", "hi")
    task_id = int(submitted.stdout.split()[-1])
    port = _free_port()
    proc = _serve(database, "--port", str(port), "--token", TOKEN)
    try:
        assert "taskpool dashboard on http://127.0.0.1:" in _first_line(proc)
        _wait_listening(port, proc)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=SAFETY_TIMEOUT_S) as http:
            page = http.get("/", headers={"Authorization": f"Bearer {TOKEN}"})
            assert page.status_code == 200
            assert f"#{task_id}" in page.text
            assert "reports" in page.text
            anonymous = http.get("/", follow_redirects=False)
            assert anonymous.status_code in (200, 303, 401)
            assert f"#{task_id}" not in anonymous.text  # a sign-in form, not the tasks
            refused = http.post(f"/api/tasks/{task_id}/cancel", json={})
            assert refused.status_code in (401, 403)
        proc.send_signal(signal.SIGINT)
        # Stopped as an interrupted program does (uvicorn re-raises the signal after its
        # orderly shutdown: 128 + SIGINT), with no traceback.
        assert proc.wait(timeout=SAFETY_TIMEOUT_S) in (0, 128 + signal.SIGINT)
        assert proc.stderr is not None
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert cli(database, "show", str(task_id)).returncode == 0  # nothing was cancelled
    assert "cancel" not in cli(database, "show", str(task_id)).stdout.split("events:")[0]


def test_web_refuses_a_short_token_in_its_own_terms(tmp_path: Path) -> None:
    result = cli(str(tmp_path / "t.db"), "web", "--token", "short", check=False)
    assert result.returncode == 2
    assert "--token must be at least 16 characters" in result.stderr
