"""The examples run for real: the quickstart, terraform and ansible runs, the ASGI app."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import anyio

from examples.asgi_app import App
from tests.helpers import eventually, no_attempt_processes

ROOT = Path(__file__).resolve().parents[2]


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_quickstart_reports_every_outcome() -> None:
    """The README's first command: each bad case ends as it should, with its reason."""
    result = run_example("quickstart.py")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for line in (
        "succeeded: exited with code 0",
        "failed: killed by SIGSEGV",
        "timed_out: timed out after 1 s; process group sent SIGTERM",
        "stalled: no output for 1 s; process group sent SIGTERM",
        "failed: could not start 'no-such-program': No such file or directory",
        "output: trying | trying | trying",
        "output: deploying again",
    ):
        assert line in out, f"missing {line!r} in:\n{out}"


def test_real_terraform_and_ansible_runs() -> None:
    """terraform init and apply (one template, one state lock) and an ansible playbook."""
    result = run_example("infra_runs.py")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "== terraform apply (task 2): succeeded, exited with code 0" in out
    assert 'greeting = "hello from terraform"' in out
    assert "== ansible playbook (task 3): succeeded, exited with code 0" in out
    assert '"msg": "hello from ansible"' in out
    assert "ok=3" in out


class Client:
    """Just enough of an ASGI server to drive the app in-process."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        sent: list[dict[str, Any]] = []
        payload = json.dumps(body).encode() if body is not None else b""

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": payload, "more_body": False}

        async def send(message: Any) -> None:
            sent.append(message)

        await self.app({"type": "http", "method": method, "path": path}, receive, send)
        return sent[0]["status"], json.loads(sent[1]["body"])


async def test_asgi_app_runs_tasks_for_its_lifetime(tmp_path: Path) -> None:
    """The pool starts and stops with the app's lifespan; HTTP submits, reads, cancels."""
    app = App(str(tmp_path / "web.db"))
    client = Client(app)
    to_app, app_inbox = anyio.create_memory_object_stream[MutableMapping[str, Any]](4)
    app_outbox, from_app = anyio.create_memory_object_stream[MutableMapping[str, Any]](4)
    async with anyio.create_task_group() as tg, to_app, from_app, app_inbox, app_outbox:
        tg.start_soon(app, {"type": "lifespan"}, app_inbox.receive, app_outbox.send)
        await to_app.send({"type": "lifespan.startup"})
        assert (await from_app.receive())["type"] == "lifespan.startup.complete"

        status, created = await client.request("POST", "/tasks", {"argv": ["echo", "web"]})
        assert status == 201

        async def finished() -> Any:
            _, task = await client.request("GET", f"/tasks/{created['id']}")
            return task if task["status"] == "succeeded" else None

        task = await eventually(finished)
        assert task["reason"] == "exited with code 0"
        assert await client.request("GET", f"/tasks/{created['id']}/output") == (
            200,
            {"output": "web\n"},
        )
        _, sleeper = await client.request("POST", "/tasks", {"argv": ["sleep", "600"]})

        async def sleeping() -> bool:
            _, task = await client.request("GET", f"/tasks/{sleeper['id']}")
            return bool(task["status"] == "running")

        await eventually(sleeping)
        status, _ = await client.request("POST", f"/tasks/{sleeper['id']}/cancel")
        assert status == 200
        assert (await client.request("POST", "/tasks", {"argv": "not a list"}))[0] == 400
        assert (await client.request("GET", "/tasks/999"))[0] == 404

        await to_app.send({"type": "lifespan.shutdown"})
        assert (await from_app.receive())["type"] == "lifespan.shutdown.complete"
    assert app.tasks is None
    assert await no_attempt_processes()
