"""The HTTP example (examples/asgi_app.py) served for real by uvicorn, in both shapes:
a pool in the app's lifespan, and a client only with its worker in another process.
Also what it refuses: no token, a cross-origin or `text/plain` post (which must run
nothing), bad and oversized bodies."""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import anyio
import httpx

from examples.asgi_app import MAX_BODY_BYTES, build
from taskpool import Client, Status
from tests.acceptance.test_client_alone import worker_process
from tests.browser.serving import served
from tests.helpers import eventually, no_attempt_processes

TOKEN = "example-token-for-the-tests-0123"
AUTH = {"authorization": f"Bearer {TOKEN}"}


async def status_of(web: httpx.AsyncClient, task_id: int, wanted: str) -> Any:
    async def check() -> Any:
        task = (await web.get(f"/tasks/{task_id}", headers=AUTH)).json()
        return task if task["status"] == wanted else None

    return await eventually(check)


async def test_asgi_app_runs_tasks_for_its_lifetime(tmp_path: Path) -> None:
    """The pool starts and stops with the served app's lifespan; HTTP submits, reads,
    cancels; the dashboard is mounted and asks for the same token."""
    app = build(str(tmp_path / "web.db"), token=TOKEN)
    async with served(app) as base, httpx.AsyncClient(base_url=base) as web:
        created = await web.post("/tasks", json={"argv": ["echo", "web"]}, headers=AUTH)
        assert created.status_code == 201, created.text
        task_id = created.json()["id"]
        assert (await status_of(web, task_id, "succeeded"))["reason"] == "exited with code 0"
        output = await web.get(f"/tasks/{task_id}/output", headers=AUTH)
        assert output.json() == {"output": "web\n"}

        sleeper = (await web.post("/tasks", json={"argv": ["sleep", "600"]}, headers=AUTH)).json()
        await status_of(web, sleeper["id"], "running")
        stopped = await web.post(
            f"/tasks/{sleeper['id']}/cancel", json={"force": True}, headers=AUTH
        )
        assert stopped.status_code == 200
        assert (await status_of(web, sleeper["id"], "cancelled"))["exit_code"] == -9
        bad = await web.post("/tasks", json={"argv": "not a list"}, headers=AUTH)
        assert bad.status_code == 400
        assert (await web.get("/tasks/999", headers=AUTH)).status_code == 404

        dashboard = await web.get("/dashboard/")
        assert dashboard.status_code == 303
        assert dashboard.headers["location"].startswith("/dashboard/login?next=")
        page = await web.get("/dashboard/", headers=AUTH)
        assert page.status_code == 200
        assert f'href="/dashboard/tasks/{task_id}"' in page.text
        assert (await web.get("/dashboard/static/dashboard.js")).status_code == 200
    assert await no_attempt_processes()


async def test_what_the_example_refuses_runs_nothing(tmp_path: Path) -> None:
    """A page of another site can post `text/plain` (or a form) without the browser
    asking first: refused, as is its Origin, a missing token, a bad or oversized
    body; none of it stores a task, so nothing runs."""
    db = str(tmp_path / "web.db")
    async with served(build(db, token=TOKEN)) as base, httpx.AsyncClient(base_url=base) as web:
        command = b'{"argv": ["touch", "' + str(tmp_path / "pwned").encode() + b'"]}'
        refused = [
            (403, {"content-type": "text/plain", "origin": "http://evil.test", **AUTH}, command),
            (
                403,
                {"content-type": "application/json", "origin": "http://evil.test", **AUTH},
                command,
            ),
            (415, {"content-type": "text/plain", **AUTH}, command),
            (415, {"content-type": "application/x-www-form-urlencoded", **AUTH}, b"argv=touch"),
            (401, {"content-type": "application/json"}, command),
            (401, {"content-type": "application/json", "authorization": "Bearer wrong"}, command),
            (400, {"content-type": "application/json", **AUTH}, b'{"argv": ["x"'),
            (400, {"content-type": "application/json", **AUTH}, b'["touch", "x"]'),
            (400, {"content-type": "application/json", **AUTH}, b"\xff\xfe"),
            (400, {"content-type": "application/json", **AUTH}, b'{"argv": ["x"], "env": {}}'),
            (
                400,
                {"content-type": "application/json", **AUTH},
                b'{"argv": ["x"], "priority": true}',
            ),
        ]
        for status, headers, body in refused:
            response = await web.post("/tasks", content=body, headers=headers)
            assert response.status_code == status, (headers, body, response.text)
            assert "error" in response.json()
        big = b'{"argv": ["echo", "' + b"x" * MAX_BODY_BYTES + b'"]}'
        too_big = await web.post(
            "/tasks", content=big, headers={"content-type": "application/json", **AUTH}
        )
        assert too_big.status_code == 413
    async with Client(db) as client:
        assert await client.list_tasks() == []
    assert not (tmp_path / "pwned").exists()


async def test_asgi_app_without_a_worker_submits_for_a_worker_process(database: str) -> None:
    """build(worker=False) holds a Client, runs nothing itself; a worker process runs
    what it submits over HTTP, and the app reads the result and output back."""
    app = build(database, token=TOKEN, worker=False)
    async with served(app) as base, httpx.AsyncClient(base_url=base) as web:
        created = await web.post("/tasks", json={"argv": ["echo", "far"]}, headers=AUTH)
        assert created.status_code == 201
        task_id = created.json()["id"]
        with worker_process(database):
            assert (await status_of(web, task_id, "succeeded"))["reason"] == "exited with code 0"
        output = await web.get(f"/tasks/{task_id}/output", headers=AUTH)
        assert output.json() == {"output": "far\n"}
        assert (await web.get("/tasks/999", headers=AUTH)).status_code == 404
    async with Client(database) as client:
        assert (await client.get(task_id)).status is Status.SUCCEEDED
    assert await no_attempt_processes()


async def test_the_http_example_stops_reading_at_its_body_limit(tmp_path: Path) -> None:
    """Moved from test_cli_trust.py with the example's rework: 413 past the body limit
    without reading on (counted at the ASGI level), 400 to bodies that are not JSON
    objects and to an argv over taskpool's own limit; none stores anything."""
    db = str(tmp_path / "web.db")
    app = build(db, token=TOKEN)
    headers = [
        (b"content-type", b"application/json"),
        (b"authorization", AUTH["authorization"].encode()),
    ]

    async def post(chunks: list[bytes]) -> tuple[int, Any, int]:
        sent: list[MutableMapping[str, Any]] = []
        read = 0

        async def receive() -> dict[str, Any]:
            nonlocal read
            read += 1
            if read > len(chunks):  # after the body: the server waits for a disconnect
                await anyio.sleep_forever()
            return {
                "type": "http.request",
                "body": chunks[read - 1],
                "more_body": read < len(chunks),
            }

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/tasks",
            "raw_path": b"/tasks",
            "root_path": "",
            "query_string": b"",
            "headers": headers,
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }
        await app(scope, receive, send)
        return sent[0]["status"], json.loads(sent[1]["body"]), read

    to_app, app_inbox = anyio.create_memory_object_stream[MutableMapping[str, Any]](4)
    app_outbox, from_app = anyio.create_memory_object_stream[MutableMapping[str, Any]](4)
    async with anyio.create_task_group() as tg, to_app, from_app, app_inbox, app_outbox:
        tg.start_soon(app, {"type": "lifespan"}, app_inbox.receive, app_outbox.send)
        await to_app.send({"type": "lifespan.startup"})
        assert (await from_app.receive())["type"] == "lifespan.startup.complete"

        chunk = b"x" * (1024 * 1024)
        status, body, read = await post([chunk] * 100)  # 100 MB offered
        assert status == 413
        assert str(MAX_BODY_BYTES) in body["error"]
        assert read == MAX_BODY_BYTES // len(chunk) + 1  # it stopped reading at the limit
        huge_argv = json.dumps({"argv": ["echo", "x" * (MAX_BODY_BYTES // 2)]}).encode()
        status, body, _ = await post([huge_argv])  # under the body limit, over argv's
        assert status == 400
        assert "MAX_ARGV_BYTES" in body["error"]
        for malformed in (b"{not json", b"\xff\xfe\x00", b"[1, 2]", b'"argv"', b'{"argv": null}'):
            status, body, _ = await post([malformed])
            assert status == 400, (malformed, body)

        await to_app.send({"type": "lifespan.shutdown"})
        assert (await from_app.receive())["type"] == "lifespan.shutdown.complete"
    async with Client(db) as client:
        assert await client.list_tasks() == []
