"""A server-sent event stream as an ASGI response, ended cleanly either way.

The live log must stop following the task as soon as the browser goes away (its
store reads and notifications cost something), and must not be closed by a proxy
while the task is quiet. Starlette's `StreamingResponse` iterates an async
generator, which cannot hold a task group across its `yield`s; here the producer is
a plain coroutine that sends, cancelled when the connection ends.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.responses import Response

from .._errors import StoreError, TaskNotFound

#: A comment on an idle stream this often keeps proxies from closing it.
KEEPALIVE_S = 15.0


def sse(event: str, data: object) -> str:
    """One event; `data` as JSON, which never has a raw newline to end the line."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


class EventStream(Response):
    """A server-sent event stream written by `produce`, with a comment every
    `KEEPALIVE_S` so that proxies keep an idle stream open; it ends when `produce`
    returns or the browser goes away (then `produce` is cancelled, whatever it awaits)."""

    def __init__(
        self, produce: Callable[[Callable[[str], Awaitable[None]]], Awaitable[None]]
    ) -> None:
        # As StreamingResponse does: no body, so no Content-Length header.
        self.status_code = 200
        self.media_type = "text/event-stream"
        self.background = None
        self.init_headers({"cache-control": "no-store", "x-accel-buffering": "no"})
        self.produce = produce

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        lock = anyio.Lock()  # one message at a time from the producer and the keepalive
        gone = False

        async def send_text(text: str) -> None:
            nonlocal gone
            async with lock:
                if gone:
                    return
                try:
                    await send(
                        {"type": "http.response.body", "body": text.encode(), "more_body": True}
                    )
                except OSError:  # the connection broke under a send: the browser is gone
                    gone = True
                    tg.cancel_scope.cancel()

        async def keepalive() -> None:
            while True:
                await anyio.sleep(KEEPALIVE_S)
                await send_text(": keepalive\n\n")

        async def until_disconnect() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            tg.cancel_scope.cancel()

        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async with anyio.create_task_group() as tg:
            tg.start_soon(until_disconnect)
            tg.start_soon(keepalive)
            await send_text(": stream\n\n")
            try:
                await self.produce(send_text)
            except (StoreError, TaskNotFound) as exc:  # after the start: say it in the stream
                await send_text(sse("failure", str(exc)))
            tg.cancel_scope.cancel()
        if not gone:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
