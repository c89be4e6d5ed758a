"""An ASGI app served for real: uvicorn on a free port of 127.0.0.1, in this event loop."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import uvicorn

from tests.helpers import SAFETY_TIMEOUT_S


@asynccontextmanager
async def served(app: Any) -> AsyncIterator[str]:
    """Serve `app` (its lifespan too) and yield its base URL; stop it on leaving."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(SAFETY_TIMEOUT_S):
            while not server.started:
                if server.should_exit:
                    raise RuntimeError("uvicorn did not start")
                await anyio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
