"""The dashboard over HTTP (in-process ASGI, a real SQLite store): who may look and
act, which requests may act, what bad requests get, and that markup from tasks is
shown as text."""

from __future__ import annotations

import functools
import json
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.requests import Request

from taskpool import Client, Status
from taskpool.web import app_from_env, create_app, serve_async
from tests.browser.serving import served
from tests.helpers import eventually

TOKEN = "a-long-enough-token-for-tests"
HOST = "http://dash.test"
JSON = {"content-type": "application/json"}


@asynccontextmanager
async def opened(db: Path) -> AsyncIterator[Client]:
    """A client entered in the test's own task (its task group must leave there too)."""
    async with Client(db) as client:
        yield client


def http(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=HOST)


def csrf_of(page: str) -> str:
    found = re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">', page)
    assert found, page
    return found[1]


async def signed_in(web: httpx.AsyncClient) -> str:
    """Sign in through the form; the CSRF token the pages then carry."""
    response = await web.post("/login", data={"token": TOKEN, "next": "/"})
    assert response.status_code == 303, response.text
    assert "taskpool_session" in response.headers["set-cookie"]
    assert "httponly" in response.headers["set-cookie"].lower()
    assert "samesite=strict" in response.headers["set-cookie"].lower()
    return csrf_of((await web.get("/")).text)


async def test_without_auth_the_dashboard_is_read_only(db: Path) -> None:
    async with opened(db) as client:
        task_id = await client.submit(["sleep", "600"])
        async with http(create_app(client)) as web:
            page = await web.get("/")
            assert page.status_code == 200
            assert "read-only" in page.text
            assert 'data-action="cancel"' not in page.text
            task_page = await web.get(f"/tasks/{task_id}")
            assert 'data-action="cancel"' not in task_page.text
            refused = await web.post(
                f"/api/tasks/{task_id}/cancel",
                json={},
                headers={"x-csrf-token": csrf_of(page.text), "origin": HOST},
            )
            assert refused.status_code == 403
            assert "read-only" in refused.json()["error"]
        assert (await client.get(task_id)).status is Status.WAITING


async def test_a_token_guards_every_page_and_a_bearer_may_act(db: Path) -> None:
    async with opened(db) as client:
        task_id = await client.submit(["sleep", "600"])
        async with http(create_app(client, token=TOKEN)) as web:
            page = await web.get(f"/tasks/{task_id}")
            assert page.status_code == 303
            assert page.headers["location"] == f"/login?next=%2Ftasks%2F{task_id}"
            assert (await web.get("/static/dashboard.css")).status_code == 200  # the login page's
            wrong = await web.get("/", headers={"authorization": "Bearer wrong-token-wrong-token"})
            assert wrong.status_code == 303
            assert (await web.post(f"/api/tasks/{task_id}/cancel", json={})).status_code == 401
            bearer = {"authorization": f"Bearer {TOKEN}"}
            assert (await web.get("/", headers=bearer)).status_code == 200
            done = await web.post(f"/api/tasks/{task_id}/cancel", json={}, headers=bearer)
            assert done.status_code == 200, done.text
            assert done.json()["task"]["status"] == "cancelled"
        assert (await client.get(task_id)).status is Status.CANCELLED


async def test_signing_in_with_the_form_and_acting_needs_the_csrf_token(db: Path) -> None:
    async with opened(db) as client:
        first, second = await client.submit(["sleep", "600"]), await client.submit(["true"])
        async with http(create_app(client, token=TOKEN)) as web:
            failed = await web.post("/login", data={"token": "nope", "next": "/"})
            assert failed.status_code == 303
            assert "failed=1" in failed.headers["location"]
            escaped = await web.post("/login", data={"token": TOKEN, "next": "//evil.test/"})
            assert escaped.headers["location"] == "/"  # never sent to another site
            csrf = await signed_in(web)
            no_csrf = await web.post(f"/api/tasks/{first}/cancel", json={})
            assert no_csrf.status_code == 403
            assert "CSRF" in no_csrf.json()["error"]
            wrong = await web.post(
                f"/api/tasks/{first}/cancel", json={}, headers={"x-csrf-token": "0" * 64}
            )
            assert wrong.status_code == 403
            assert (await client.get(first)).status is Status.WAITING
            ok = await web.post(
                f"/api/tasks/{first}/cancel",
                json={"force": True},
                headers={"x-csrf-token": csrf, "origin": HOST, "sec-fetch-site": "same-origin"},
            )
            assert ok.status_code == 200, ok.text
            retried = await web.post(
                f"/api/tasks/{first}/retry", json={}, headers={"x-csrf-token": csrf}
            )
            assert retried.status_code == 201
            assert (await client.get(retried.json()["id"])).spec.argv == ("sleep", "600")
            not_finished = await web.post(
                f"/api/tasks/{second}/retry", json={}, headers={"x-csrf-token": csrf}
            )
            assert not_finished.status_code == 409
            out = await web.post("/logout", json={}, headers={"x-csrf-token": csrf})
            assert out.status_code == 200
            web.cookies.clear()
            assert (await web.get("/")).status_code == 303
        assert (await client.get(first)).status is Status.CANCELLED


async def test_cross_site_and_form_like_posts_act_on_nothing(db: Path) -> None:
    """What a page of another site can send without a preflight (text/plain, a form)
    or with its Origin is refused before anything is read, whatever cookies it carries."""
    async with opened(db) as client:
        task_id = await client.submit(["sleep", "600"])
        async with http(create_app(client, token=TOKEN)) as web:
            csrf = await signed_in(web)
            path = f"/api/tasks/{task_id}/cancel"
            attempts = [
                ({"content-type": "text/plain", "origin": "http://evil.test"}, b'{"force": true}'),
                ({"content-type": "text/plain"}, b'{"force": true}'),
                ({"content-type": "application/x-www-form-urlencoded"}, b"force=true"),
                ({"content-type": "multipart/form-data; boundary=x"}, b"--x--"),
                ({**JSON, "origin": "http://evil.test", "x-csrf-token": csrf}, b"{}"),
                ({**JSON, "origin": "null", "x-csrf-token": csrf}, b"{}"),
                ({**JSON, "origin": "https://dash.test", "x-csrf-token": csrf}, b"{}"),
                ({**JSON, "sec-fetch-site": "cross-site", "x-csrf-token": csrf}, b"{}"),
                ({**JSON, "sec-fetch-site": "same-site", "x-csrf-token": csrf}, b"{}"),
            ]
            for headers, body in attempts:
                response = await web.post(path, content=body, headers=headers)
                assert response.status_code in (403, 415), (headers, response.status_code)
            plain = await web.post(path, content=b"{}", headers={"content-type": "text/plain"})
            assert plain.status_code == 415
            assert (await web.get(path)).status_code == 405
        assert (await client.get(task_id)).status is Status.WAITING
        assert [e.to_status for e in await client.events(task_id)] == [Status.WAITING]


async def test_bad_bodies_get_400_or_413_and_unknown_tasks_404(db: Path) -> None:
    async with opened(db) as client:
        task_id = await client.submit(["sleep", "600"])
        bearer = {"authorization": f"Bearer {TOKEN}"}
        async with http(create_app(client, token=TOKEN, max_body_bytes=1024)) as web:
            path = f"/api/tasks/{task_id}/cancel"
            for body in (b"{", b"[]", b'"x"', b"\xff\xfe", b'{"force": "yes"}', b'{"force": 1}'):
                response = await web.post(path, content=body, headers={**JSON, **bearer})
                assert response.status_code == 400, (body, response.text)
            unknown = await web.post(path, json={"mode": "x"}, headers=bearer)
            assert unknown.status_code == 400
            big = b'{"force": false' + b" " * 2000 + b"}"
            assert (
                await web.post(path, content=big, headers={**JSON, **bearer})
            ).status_code == 413

            async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: cut while read
                for _ in range(100):
                    yield b" " * 100

            streamed = await web.post(path, content=chunks(), headers={**JSON, **bearer})
            assert streamed.status_code == 413
            bad_length = await web.post(
                path, content=b"{}", headers={**JSON, **bearer, "content-length": "x"}
            )
            assert bad_length.status_code == 400
            assert (await client.get(task_id)).status is Status.WAITING

            for missing in ("/tasks/999", "/tasks/999/log", "/api/tasks/999", "/tasks/abc"):
                assert (await web.get(missing, headers=bearer)).status_code == 404, missing
            huge = "9" * 40
            assert (await web.get(f"/tasks/{huge}", headers=bearer)).status_code == 404
            cancel_missing = await web.post("/api/tasks/999/cancel", json={}, headers=bearer)
            assert cancel_missing.status_code == 404
            assert (await web.get("/no/such/page", headers=bearer)).status_code == 404


async def test_the_host_auth_callback_decides_and_may_be_async(db: Path) -> None:
    async with opened(db) as client:
        task_id = await client.submit(["sleep", "600"])

        async def operators_only(request: Request) -> bool:
            return request.headers.get("x-user") == "ops"

        async with http(create_app(client, auth=operators_only)) as web:
            assert (await web.get("/")).status_code == 403
            page = await web.get("/", headers={"x-user": "ops"})
            assert page.status_code == 200
            assert "operator" in page.text
            headers = {"x-user": "ops", "x-csrf-token": csrf_of(page.text)}
            assert (await web.post(f"/api/tasks/{task_id}/cancel", json={})).status_code == 403
            done = await web.post(f"/api/tasks/{task_id}/cancel", json={}, headers=headers)
            assert done.status_code == 200
        assert (await client.get(task_id)).status is Status.CANCELLED


async def test_markup_from_tasks_is_shown_as_text_and_the_log_streams_html(db: Path) -> None:
    async with opened(db) as client:
        evil = "<script>alert(1)</script>"
        task_id = await client.submit(["echo", evil], project="p<b>", template='t"x')
        async with http(create_app(client)) as web:
            for path in ("/", f"/tasks/{task_id}", "/waiting", "/queues"):
                page = await web.get(path)
                assert page.status_code == 200
                assert "<script>alert" not in page.text, path
                assert "p<b>" not in page.text, path
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in (await web.get("/")).text
            await client.cancel(task_id)  # ended: its log stream ends too
            stream = await web.get(f"/tasks/{task_id}/log")
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = [block for block in stream.text.split("\n\n") if block.startswith("event:")]
            assert events[-1].startswith("event: end")
            end = json.loads(events[-1].split("data: ", 1)[1])
            assert end["status"] == "cancelled"
            assert "cancelled while waiting" in end["html"]
            assert 'data-action="retry"' not in end["actions"]  # read-only: no buttons


async def test_filters_and_paging_over_the_client(db: Path) -> None:
    async with opened(db) as client:
        ids = [
            await client.submit(["echo", f"job-{n}"], project="a" if n % 2 else "b")
            for n in range(120)
        ]
        async with http(create_app(client)) as web:
            first = await web.get("/?project=a")
            assert first.text.count('<tr data-task="') == 50
            assert "Older →" in first.text
            assert "← Newer" not in first.text
            last = await web.get("/?project=a&page=2")
            assert last.text.count('<tr data-task="') == 10
            assert "Older →" not in last.text
            found = await web.get("/?q=job-7")
            shown = re.findall(r'<tr data-task="(\d+)"', found.text)
            expected = {ids[n] for n in range(120) if f"job-{n}".startswith("job-7")}
            assert {int(i) for i in shown} == expected  # job-7 and job-70 to job-79
            for junk in (
                "?status=nope",
                "?page=-1",
                "?page=99999999999",
                "?page=x",
                "?q=" + "x" * 5000,
            ):
                assert (await web.get("/" + junk)).status_code == 200


async def test_served_alone_it_opens_its_own_client(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`app_from_env` (for `uvicorn --factory`) and `serve_async` (for `taskpool web`)
    open a client of their own on the store in the app's lifespan."""
    async with opened(db) as client:
        task_id = await client.submit(["true"])
    monkeypatch.setenv("TASKPOOL_DB", str(db))
    monkeypatch.setenv("TASKPOOL_WEB_TOKEN", TOKEN)
    bearer = {"authorization": f"Bearer {TOKEN}"}
    async with served(app_from_env()) as base, httpx.AsyncClient(base_url=base) as web:
        shown = await web.get(f"/api/tasks/{task_id}", headers=bearer)
        assert shown.json()["task"]["status"] == "waiting"
        assert (await web.get("/")).status_code == 303  # the token is asked for

    with socket.socket() as probe:  # a free port for serve_async, which takes a number
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(serve_async, db, "127.0.0.1", port, token=TOKEN))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as web:

            async def answered() -> httpx.Response | None:
                try:
                    return await web.get(f"/api/tasks/{task_id}", headers=bearer)
                except httpx.ConnectError:
                    return None

            assert (await eventually(answered)).json()["task"]["id"] == task_id
        tg.cancel_scope.cancel()
