"""taskpool embedded in a Starlette app: a small JSON API and the dashboard mounted.

- **Both in one process** (the default): a `TaskPool` is entered in the app's
  lifespan, so it runs tasks exactly as long as the app: it starts with the server,
  shuts down gracefully with it, and if it crashes the lifespan fails and the server
  exits (crash, never hang) for its supervisor to restart it.
- **Submit and watch only** (`TASKPOOL_WORKER=0`): the app holds a `Client` and runs
  nothing; workers run elsewhere (`taskpool --db ... worker`) on the same store.

Every route but the dashboard's sign-in asks for the token (`Authorization: Bearer`;
`TASKPOOL_WEB_TOKEN`, or a random one printed at start). Requests that change
something must be `application/json` (415 otherwise: a cross-site page can send
`text/plain` or a form without the browser asking first, never JSON), at most
`MAX_BODY_BYTES` (413), a JSON object of known fields (400); an `Origin` of another
site is refused (403). Nothing runs before all of that has passed.

    pip install -e '.[web]'
    TASKPOOL_WEB_TOKEN=change-me-to-a-long-secret uvicorn examples.asgi_app:app
    curl -H 'Authorization: Bearer change-me-to-a-long-secret' \\
         -H 'Content-Type: application/json' -d '{"argv": ["echo", "hi"]}' localhost:8000/tasks
    curl -H 'Authorization: Bearer change-me-to-a-long-secret' localhost:8000/tasks/1/output
    open http://localhost:8000/dashboard/   (sign in with the same token)

TASKPOOL_DB names the store (default: taskpool-web.db).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from taskpool import Client, InvalidTask, TaskInfo, TaskNotFound, TaskPool
from taskpool.web import create_app

#: A submit body larger than this is refused with 413 before it is read further: a
#: task's own limits (taskpool's MAX_ARGV_BYTES, MAX_ENV_BYTES) fit well within it.
MAX_BODY_BYTES = 1024 * 1024

SUBMIT_OPTIONS: dict[str, tuple[type, ...]] = {
    "argv": (list,),
    "cwd": (str,),
    "project": (str,),
    "template": (str,),
    "locks": (list,),
    "priority": (int,),
    "timeout_s": (int, float),
    "stall_timeout_s": (int, float),
    "max_attempts": (int,),
    "retry_backoff_s": (int, float),
}


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def build(db: str, *, token: str, worker: bool = True) -> Starlette:
    """The app on `db`: a pool in its lifespan (`worker=True`) or a client only."""
    tasks: TaskPool | Client = TaskPool(db) if worker else Client(db)

    def authorized(request: Request) -> None:
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise Refused(401, "send Authorization: Bearer <token>")

    async def json_body(request: Request, allowed: dict[str, tuple[type, ...]]) -> dict[str, Any]:
        """The checks every state-changing request passes before anything happens."""
        authorized(request)
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
            raise Refused(403, "cross-origin request refused")
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise Refused(415, "the body must be application/json")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            raise Refused(413 if length.isdigit() else 400, "bad or too large Content-Length")
        raw, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:  # stop reading: memory stays bounded whatever is sent
                raise Refused(413, f"request body over {MAX_BODY_BYTES} bytes")
            raw.append(chunk)
        try:
            body = json.loads(b"".join(raw) or b"{}")
        except ValueError as exc:  # bad JSON or bad UTF-8
            raise Refused(400, f"the body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise Refused(400, "the body must be a JSON object")
        for key, value in body.items():
            kinds = allowed.get(key)
            is_bool = isinstance(value, bool)  # a bool is an int to isinstance
            if kinds is None or not isinstance(value, kinds) or (is_bool and bool not in kinds):
                raise Refused(400, f"unknown field or wrong type: {key!r}")
        return body

    def task_id(request: Request) -> int:
        raw = request.path_params["task_id"]
        if not raw.isdigit() or len(raw) > 18:
            raise TaskNotFound(f"no task {raw[:40]!r}")
        return int(raw)

    async def submit(request: Request) -> Response:
        body = await json_body(request, SUBMIT_OPTIONS)
        argv = body.pop("argv", None)
        return JSONResponse({"id": await tasks.submit(argv, **body)}, status_code=201)

    async def show(request: Request) -> Response:
        authorized(request)
        return JSONResponse(_task(await tasks.get(task_id(request))))

    async def output(request: Request) -> Response:
        authorized(request)
        return JSONResponse({"output": await tasks.output(task_id(request))})

    async def cancel(request: Request) -> Response:
        body = await json_body(request, {"force": (bool,)})
        info = await tasks.cancel(task_id(request), force=body.get("force") is True)
        return JSONResponse(_task(info))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with tasks:  # a pool drains and stops when the server does
            yield

    def error(status: int) -> Callable[[Request, Exception], Awaitable[Response]]:
        async def handler(request: Request, exc: Exception) -> Response:
            code = exc.status if isinstance(exc, Refused) else status
            return JSONResponse({"error": str(exc)}, status_code=code)

        return handler

    return Starlette(
        routes=[
            Route("/tasks", submit, methods=["POST"]),
            Route("/tasks/{task_id}", show, methods=["GET"]),
            Route("/tasks/{task_id}/output", output, methods=["GET"]),
            Route("/tasks/{task_id}/cancel", cancel, methods=["POST"]),
            # The dashboard, over the same pool or client; its pages ask for the token.
            Mount("/dashboard", app=create_app(tasks, token=token, title="taskpool example")),
        ],
        lifespan=lifespan,
        exception_handlers={
            Refused: error(400),
            InvalidTask: error(400),
            TaskNotFound: error(404),
        },
    )


def _task(info: TaskInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "status": info.status.value,
        "reason": info.reason,
        "exit_code": info.exit_code,
        "argv": list(info.spec.argv),
    }


def _token() -> str:
    token = os.environ.get("TASKPOOL_WEB_TOKEN")
    if not token:
        token = secrets.token_urlsafe(24)
        print(f"taskpool example: no TASKPOOL_WEB_TOKEN, using {token}", file=sys.stderr)
    return token


_app: Starlette | None = None


def __getattr__(name: str) -> Starlette:
    """`app`, for `uvicorn examples.asgi_app:app`, made on first use: importing the
    module (as the tests do, for `build`) opens nothing and prints nothing."""
    global _app
    if name != "app":
        raise AttributeError(name)
    if _app is None:
        _app = build(
            os.environ.get("TASKPOOL_DB", "taskpool-web.db"),
            token=_token(),
            worker=os.environ.get("TASKPOOL_WORKER", "1") != "0",
        )
    return _app
