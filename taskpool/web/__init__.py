"""taskpool's web dashboard: an ASGI app to mount in your own app or serve alone.

Needs the `web` extra (Starlette; uvicorn to serve it alone). Two ways to run it:

- **mounted** in a Starlette or FastAPI app, over a `Client` (or `TaskPool`) that the
  host opens in its own lifespan, behind the host's own auth::

      client = Client("tasks.db")
      dashboard = create_app(client, auth=lambda request: is_operator(request))
      app = Starlette(routes=[Mount("/ops", app=dashboard)], lifespan=...)  # enters client

- **standalone**: `serve(store, host, port, token=...)` (what `taskpool web` runs),
  or `uvicorn --factory taskpool.web:app_from_env` with `TASKPOOL_DB` and
  `TASKPOOL_WEB_TOKEN` set; `standalone_app(store, ...)` opens its own client in the
  app's lifespan.

It is read-only unless an auth callback or a token is given; see `_security` for what
a state-changing request must carry.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

try:
    from starlette.applications import Starlette
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
    raise ModuleNotFoundError(
        "taskpool.web needs the 'web' extra: pip install -e '.[web]' (Starlette, uvicorn)",
        name=exc.name,
    ) from exc

from .._client import Client
from .._store import Store
from ._ansi import AnsiRenderer, render
from ._app import MAX_BODY_BYTES, AuthCallback, Dashboard, TaskSource, build_app

__all__ = [
    "AnsiRenderer",
    "AuthCallback",
    "TaskSource",
    "app_from_env",
    "create_app",
    "render",
    "serve",
    "serve_async",
    "standalone_app",
]

TOKEN_ENV = "TASKPOOL_WEB_TOKEN"


def create_app(
    tasks: TaskSource,
    *,
    auth: AuthCallback | None = None,
    token: str | None = None,
    secret: bytes | None = None,
    title: str = "taskpool",
    max_body_bytes: int = MAX_BODY_BYTES,
    stale_after_s: float = 60.0,
    **starlette_options: Any,
) -> Starlette:
    """The dashboard over `tasks` (a `Client` or `TaskPool` the caller opens and closes).

    `auth(request)` (may be async) says whether this request comes from an operator:
    one may look and act, anyone else is refused (403). `token` (16 characters or
    more) asks for itself on every page (a sign-in form sets a session cookie; API
    callers send `Authorization: Bearer <token>`). With neither, the dashboard is
    read-only and open to whoever reaches it. `secret` keys the session cookies and
    CSRF tokens (random per app by default: give the same one to every process behind
    a load balancer). Extra keyword arguments go to `Starlette` (e.g. `lifespan`).
    """
    dashboard = Dashboard(
        tasks,
        auth=auth,
        token=token,
        secret=secret,
        title=title,
        max_body_bytes=max_body_bytes,
        stale_after_s=stale_after_s,
    )
    return build_app(dashboard, **starlette_options)


def standalone_app(store: Store | str | os.PathLike[str], **options: Any) -> Starlette:
    """The dashboard with a `Client` of its own on `store`, opened in the app's lifespan
    (so only when served as the root app: a mounted app's lifespan never runs)."""
    client = Client(store, create=False)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with client:
            yield

    return create_app(client, lifespan=lifespan, **options)


def app_from_env() -> Starlette:
    """For `uvicorn --factory taskpool.web:app_from_env`: the store is `TASKPOOL_DB`,
    the token `TASKPOOL_WEB_TOKEN` (read-only without one)."""
    db = os.environ.get("TASKPOOL_DB")
    if not db:
        raise RuntimeError("set TASKPOOL_DB to the store's path or postgresql:// URL")
    return standalone_app(db, token=os.environ.get(TOKEN_ENV) or None)


async def serve_async(
    store: Store | str | os.PathLike[str] | Starlette,
    host: str = "127.0.0.1",
    port: int = 8080,
    **options: Any,
) -> None:
    """Serve the dashboard with uvicorn in the running event loop (asyncio) until
    cancelled or interrupted. `store` may also be an app `create_app` made.

    Cancelled, it stops the server as a signal would (`should_exit`), and returns once
    the server has shut down (its listening socket closed, the app's lifespan ended):
    uvicorn cancelled half-way through `serve` would leave both behind."""
    import anyio
    import uvicorn

    app = store if isinstance(store, Starlette) else standalone_app(store, **options)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    stopped = anyio.Event()

    async def run() -> None:
        try:
            with anyio.CancelScope(shield=True):  # stopped by should_exit only
                await server.serve()
        finally:
            stopped.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        try:
            await stopped.wait()
        finally:
            server.should_exit = True


def serve(
    store: Store | str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = 8080,
    **options: Any,
) -> None:
    """Serve the dashboard on `store` until interrupted (blocking). Options are those
    of `create_app` (`token=`, `auth=`, `title=`, ...)."""
    import anyio

    anyio.run(lambda: serve_async(store, host, port, **options))
