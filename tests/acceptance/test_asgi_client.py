"""The HTTP example in its submit-and-watch shape: a Client in the app, the worker in
another process."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import anyio

from examples.asgi_app import App
from tests.acceptance.test_client_alone import worker_process
from tests.acceptance.test_examples import Client as Http
from tests.helpers import eventually, no_attempt_processes


async def test_asgi_app_without_a_worker_submits_for_a_worker_process(database: str) -> None:
    """App(worker=False) holds a Client, runs nothing itself; a worker process runs what
    it submits over HTTP, and the app reads the result and output back."""
    app = App(database, worker=False)
    http = Http(app)
    to_app, app_inbox = anyio.create_memory_object_stream[MutableMapping[str, Any]](4)
    app_outbox, from_app = anyio.create_memory_object_stream[MutableMapping[str, Any]](4)
    async with anyio.create_task_group() as tg, to_app, from_app, app_inbox, app_outbox:
        tg.start_soon(app, {"type": "lifespan"}, app_inbox.receive, app_outbox.send)
        await to_app.send({"type": "lifespan.startup"})
        assert (await from_app.receive())["type"] == "lifespan.startup.complete"
        assert type(app.tasks).__name__ == "Client"

        status, created = await http.request("POST", "/tasks", {"argv": ["echo", "far"]})
        assert status == 201
        with worker_process(database):

            async def finished() -> Any:
                _, task = await http.request("GET", f"/tasks/{created['id']}")
                return task if task["status"] == "succeeded" else None

            assert (await eventually(finished))["reason"] == "exited with code 0"
        assert await http.request("GET", f"/tasks/{created['id']}/output") == (
            200,
            {"output": "far\n"},
        )
        assert (await http.request("GET", "/tasks/999"))[0] == 404

        await to_app.send({"type": "lifespan.shutdown"})
        assert (await from_app.receive())["type"] == "lifespan.shutdown.complete"
    assert app.tasks is None
    assert await no_attempt_processes()
