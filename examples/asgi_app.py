"""taskpool in an ASGI web app, in either of its two shapes. Plain ASGI, no framework.

- **Both in one process** (the default): a pool is entered in the ASGI lifespan, so
  it runs tasks exactly as long as the app: it starts with the server, shuts down
  gracefully with it, and if it crashes the lifespan fails and the server exits
  (crash, never hang) for its supervisor to restart it. The routes use the pool's
  client API.
- **Submit and watch only** (`TASKPOOL_WORKER=0`): the app holds a `Client` and runs
  nothing; workers run elsewhere (`taskpool --db ... worker`) on the same store, so
  web processes and workers scale, restart and deploy apart.

    pip install uvicorn && uvicorn examples.asgi_app:app
    curl -XPOST localhost:8000/tasks -d '{"argv": ["sh", "-c", "echo hi"]}'
    curl localhost:8000/tasks/1
    curl localhost:8000/tasks/1/output
    curl -XPOST localhost:8000/tasks/1/cancel

TASKPOOL_DB names the store (default: taskpool-web.db).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from taskpool import Client, InvalidTask, TaskInfo, TaskNotFound, TaskPool

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: A submit body larger than this is refused with 413 before it is read further: a
#: task's own limits (taskpool's MAX_ARGV_BYTES, MAX_ENV_BYTES) fit well within it.
MAX_BODY_BYTES = 1024 * 1024

SUBMIT_OPTIONS = {
    "cwd",
    "project",
    "template",
    "locks",
    "priority",
    "timeout_s",
    "stall_timeout_s",
    "max_attempts",
    "retry_backoff_s",
}


class App:
    """The web app. `worker=True` runs a pool in the app's lifespan; `worker=False`
    only submits and watches, through a `Client`, for workers running elsewhere."""

    def __init__(self, db: str, *, worker: bool = True) -> None:
        self.db = db
        self.worker = worker
        # Both offer the same client API; the pool also runs what is submitted.
        self.tasks: TaskPool | Client | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
        elif scope["type"] == "http":
            status, body = await self.route(scope, receive)
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": json.dumps(body).encode()})

    async def lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        try:
            async with TaskPool(self.db) if self.worker else Client(self.db) as tasks:
                self.tasks = tasks
                await send({"type": "lifespan.startup.complete"})
                await receive()  # lifespan.shutdown: leaving the block drains a pool
        except BaseException as exc:
            self.tasks = None
            await send({"type": "lifespan.shutdown.failed", "message": repr(exc)})
            raise
        self.tasks = None
        await send({"type": "lifespan.shutdown.complete"})

    async def route(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        tasks = self.tasks
        if tasks is None:
            return 503, {"error": "the task store is not open"}
        method, path = scope["method"], scope["path"]
        try:
            if method == "POST" and path == "/tasks":
                request = json.loads(await _body(receive) or b"{}")
                if not isinstance(request, dict):
                    return 400, {"error": "the body must be a JSON object"}
                options = {k: v for k, v in request.items() if k in SUBMIT_OPTIONS}
                argv: Any = request.get("argv")  # checked by submit: InvalidTask if not a list
                return 201, {"id": await tasks.submit(argv, **options)}
            if match := re.fullmatch(r"/tasks/(\d+)(/output|/cancel)?", path):
                task_id, action = int(match[1]), match[2]
                if method == "GET" and action is None:
                    return 200, _task(await tasks.get(task_id))
                if method == "GET" and action == "/output":
                    return 200, {"output": await tasks.output(task_id)}
                if method == "POST" and action == "/cancel":
                    return 200, _task(await tasks.cancel(task_id))
        except BodyTooLarge as exc:
            return 413, {"error": str(exc)}
        except (InvalidTask, ValueError, TypeError) as exc:  # bad JSON, bad UTF-8, bad task
            return 400, {"error": str(exc)}
        except TaskNotFound as exc:
            return 404, {"error": str(exc)}
        return 404, {"error": f"no route for {method} {path}"}


class BodyTooLarge(Exception):
    pass


async def _body(receive: Receive) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:  # stop reading: memory stays bounded whatever is sent
            raise BodyTooLarge(f"request body over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _task(info: TaskInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "status": info.status.value,
        "reason": info.reason,
        "exit_code": info.exit_code,
        "argv": list(info.spec.argv),
    }


app = App(
    os.environ.get("TASKPOOL_DB", "taskpool-web.db"),
    worker=os.environ.get("TASKPOOL_WORKER", "1") != "0",
)
