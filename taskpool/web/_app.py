"""The dashboard as a Starlette app: routes, access, the live log stream.

Everything it reads or changes goes through the client API (`Client`, or a
`TaskPool`, which offers the same methods): it never touches a store itself.
Decisions (who may act, which request may act, what a page shows) live in
`_security`, `_views` and `_pages`; this module gathers facts and applies them.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlencode

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .._client import StaleReport
from .._errors import InvalidTask, StoreError, TaskNotFound
from .._explain import WaitReason, describe
from .._models import CancelMode, NodeInfo, Status, TaskEvent, TaskInfo
from .._scheduler import ScheduleNotFound
from .._schedules import Schedule, ScheduledBy, ScheduleError
from . import _pages as pages
from ._ansi import AnsiRenderer
from ._security import (
    CSRF_HEADER,
    SESSION_COOKIE,
    ActionFacts,
    Refusal,
    bearer,
    derive,
    media_type,
    parse_json_object,
    refuse_action,
    safe_next,
    same_origin,
    session_value,
    token_matches,
)
from ._stream import EventStream, sse
from ._views import (
    SCAN_LIMIT,
    TaskFilter,
    fetch_limit,
    page_of,
    queue_depths,
)

STATIC = Path(__file__).with_name("static")
#: Bodies of the dashboard's own requests are a few bytes; anything near this is not one.
MAX_BODY_BYTES = 16 * 1024
_TASK_ID = re.compile(r"[0-9]{1,18}")  # within BIGINT: a longer number is no task

AuthCallback = Callable[[Request], bool | Awaitable[bool]]


class TaskSource(Protocol):
    """The client API the dashboard uses: a `Client` or a `TaskPool`."""

    async def get(self, task_id: int) -> TaskInfo: ...
    async def list_tasks(
        self,
        *,
        statuses: Sequence[Status] | None = None,
        project: str | None = None,
        limit: int = 100,
    ) -> list[TaskInfo]: ...
    async def events(self, task_id: int) -> list[TaskEvent]: ...
    async def nodes(self, *, alive: bool | None = None) -> list[NodeInfo]: ...
    async def stale(self, *, older_than_s: float = 60.0) -> StaleReport: ...
    async def why_many(self, tasks: Iterable[TaskInfo]) -> dict[int, list[WaitReason]]: ...
    async def cancel(
        self, task_id: int, mode: CancelMode | str = CancelMode.GRACEFUL, *, force: bool = False
    ) -> TaskInfo: ...
    async def retry(self, task_id: int) -> int: ...
    def follow(self, task_id: int) -> AsyncIterator[str]: ...
    async def list_schedules(self) -> list[Schedule]: ...
    async def pause_schedule(self, name: str) -> Schedule: ...
    async def resume_schedule(self, name: str) -> Schedule: ...
    async def scheduled_by(self, task_ids: Iterable[int]) -> dict[int, ScheduledBy]: ...
    async def latest_schedule_runs(
        self, names: Iterable[str], n: int = 5
    ) -> dict[str, list[tuple[int, Status]]]: ...


@dataclass(frozen=True, slots=True)
class Access:
    view: bool
    act: bool
    by_bearer: bool = False
    session: str = ""  # the session cookie's value when signed in with the token


class Dashboard:
    """The routes' shared state: the client, the access settings, the secret."""

    def __init__(
        self,
        tasks: TaskSource,
        *,
        auth: AuthCallback | None,
        token: str | None,
        secret: bytes | None,
        title: str,
        max_body_bytes: int,
        stale_after_s: float,
    ) -> None:
        if token is not None and len(token) < 16:
            raise ValueError("a dashboard token must be at least 16 characters")
        self.tasks = tasks
        self.auth = auth
        self.token = token
        self.secret = secret or secrets.token_bytes(32)
        self.title = title
        self.max_body_bytes = max_body_bytes
        self.stale_after_s = stale_after_s

    # -- access ------------------------------------------------------------
    async def access(self, request: Request) -> Access:
        if self.token is None and self.auth is None:
            return Access(view=True, act=False)
        if self.token is not None:
            if token_matches(bearer(request.headers.get("authorization")), self.token):
                return Access(view=True, act=True, by_bearer=True)
            cookie = request.cookies.get(SESSION_COOKIE)
            expected = session_value(self.secret, self.token)
            if cookie is not None and token_matches(cookie, expected):
                return Access(view=True, act=True, session=cookie)
        if self.auth is not None:
            allowed = self.auth(request)
            if inspect.isawaitable(allowed):
                allowed = await allowed
            if allowed:
                return Access(view=True, act=True)
        return Access(view=False, act=False)

    def csrf(self, access: Access) -> str:
        return derive(self.secret, "csrf", access.session)

    def frame(self, request: Request, access: Access) -> pages.Frame:
        return pages.Frame(
            base=request.scope.get("root_path", "").rstrip("/"),
            csrf=self.csrf(access),
            can_act=access.act,
            login=bool(access.session),
            title=self.title,
            now=time.time(),
        )

    async def viewer(self, request: Request) -> tuple[Access, pages.Frame]:
        """The access of someone allowed to look, or the way to sign in."""
        access = await self.access(request)
        if not access.view:
            base = request.scope.get("root_path", "").rstrip("/")
            if self.token is not None and request.method == "GET":
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                raise _Redirect(f"{base}/login?{urlencode({'next': target})}")
            raise HTTPException(403, "not allowed: the host's auth refused this request")
        return access, self.frame(request, access)

    # -- pages -----------------------------------------------------------------
    async def tasks_page(self, request: Request) -> Response:
        _, frame = await self.viewer(request)
        f = TaskFilter.from_query(request.query_params)
        limit = fetch_limit(f)
        found = await self.tasks.list_tasks(
            statuses=[f.status] if f.status else None, project=f.project, limit=limit
        )
        page = page_of(found, f, fetched=len(found), limit=limit)
        scheduled = await self.tasks.scheduled_by(t.id for t in page.tasks)
        return HTMLResponse(pages.tasks_page(frame, f, page, scheduled))

    async def task_page(self, request: Request) -> Response:
        _, frame = await self.viewer(request)
        state = await self._task_state(request)
        return HTMLResponse(pages.task_page(frame, state))

    async def _task_state(self, request: Request) -> pages.TaskState:
        task = await self.tasks.get(task_id(request))
        events = await self.tasks.events(task.id)
        why = await self._why(task) if task.status is Status.WAITING else None
        scheduled = (await self.tasks.scheduled_by([task.id])).get(task.id)
        return pages.TaskState(task, events, why, scheduled)

    async def _why(self, task: TaskInfo) -> str:
        return describe((await self.tasks.why_many([task]))[task.id])

    async def nodes_page(self, request: Request) -> Response:
        _, frame = await self.viewer(request)
        nodes = await self.tasks.nodes()
        running = await self.tasks.list_tasks(statuses=[Status.RUNNING], limit=SCAN_LIMIT)
        return HTMLResponse(pages.nodes_page(frame, nodes, running))

    async def waiting_page(self, request: Request) -> Response:
        _, frame = await self.viewer(request)
        stale = await self.tasks.stale(older_than_s=self.stale_after_s)
        waiting = await self.tasks.list_tasks(statuses=[Status.WAITING], limit=500)
        why = await self.tasks.why_many(waiting)
        reasons = {t.id: describe(why.get(t.id, [])) for t in waiting}
        scheduled = await self.tasks.scheduled_by(t.id for t in [*waiting, *stale.expired_leases])
        return HTMLResponse(pages.waiting_page(frame, stale, waiting, reasons, scheduled))

    async def schedules_page(self, request: Request) -> Response:
        _, frame = await self.viewer(request)
        try:
            schedules = await self.tasks.list_schedules()
        except ScheduleError as exc:  # a store that keeps no schedules (none shipped)
            return HTMLResponse(pages.schedules_page(frame, [], {}, str(exc)))
        runs = await self.tasks.latest_schedule_runs(
            (s.name for s in schedules), pages.SCHEDULE_RUNS_SHOWN
        )
        return HTMLResponse(pages.schedules_page(frame, schedules, runs))

    async def queues_page(self, request: Request) -> Response:
        _, frame = await self.viewer(request)
        # Counted here from the client's lists (the store has no count query yet).
        waiting = await self.tasks.list_tasks(statuses=[Status.WAITING], limit=SCAN_LIMIT)
        running = await self.tasks.list_tasks(statuses=[Status.RUNNING], limit=SCAN_LIMIT)
        depths = queue_depths(waiting, running, now=time.time())
        full = len(waiting) >= SCAN_LIMIT or len(running) >= SCAN_LIMIT
        return HTMLResponse(pages.queues_page(frame, depths, full))

    async def log_stream(self, request: Request) -> Response:
        _, frame = await self.viewer(request)
        task = await self.tasks.get(task_id(request))

        async def events(send: Callable[[str], Awaitable[None]]) -> None:
            """The task's output as server-sent events: `chunk` (HTML to append),
            then `end` with the task's final state."""
            renderer = AnsiRenderer()
            async for text in self.tasks.follow(task.id):
                if shown := renderer.feed(text):
                    await send(sse("chunk", shown))
            if tail := renderer.finish():
                await send(sse("chunk", tail))
            final = await self._task_state(request)
            now = dataclasses.replace(frame, now=time.time())
            details = pages.task_details(now, final)
            await send(
                sse(
                    "end",
                    {
                        "status": final.task.status.value,
                        "badge": pages.badge(final.task.status),
                        "html": details,
                        "actions": pages.action_buttons(frame, final.task),
                    },
                )
            )

        return EventStream(events)

    # -- actions ---------------------------------------------------------------
    async def act(
        self, request: Request, allowed: dict[str, type]
    ) -> tuple[Access, dict[str, Any]]:
        """Check a state-changing request and return its body; raise on refusal."""
        access = await self.access(request)
        if not access.view:
            status = 401 if self.token is not None else 403
            raise _Refused(Refusal(status, "sign in or send the token to act"))
        if not access.act:
            raise _Refused(Refusal(403, "the dashboard is read-only (no auth or token configured)"))
        refusal = refuse_action(
            ActionFacts(
                content_type=request.headers.get("content-type"),
                origin=request.headers.get("origin"),
                own_origin=f"{request.url.scheme}://{request.url.netloc}",
                sec_fetch_site=request.headers.get("sec-fetch-site"),
                csrf_header=request.headers.get(CSRF_HEADER),
                expected_csrf=self.csrf(access),
                by_bearer=access.by_bearer,
                content_length=request.headers.get("content-length"),
                max_body_bytes=self.max_body_bytes,
            )
        )
        if refusal is not None:
            raise _Refused(refusal)
        body = parse_json_object(await self._body(request), allowed)
        if isinstance(body, Refusal):
            raise _Refused(body)
        return access, body

    async def _body(self, request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:  # stop reading: memory stays bounded
                raise _Refused(Refusal(413, f"request body over {self.max_body_bytes} bytes"))
            chunks.append(chunk)
        return b"".join(chunks)

    async def cancel(self, request: Request) -> Response:
        _, body = await self.act(request, {"force": bool})
        info = await self.tasks.cancel(task_id(request), force=body.get("force", False))
        return JSONResponse({"task": _task_json(info)})

    async def retry(self, request: Request) -> Response:
        await self.act(request, {})
        try:
            new_id = await self.tasks.retry(task_id(request))
        except InvalidTask as exc:
            raise _Refused(Refusal(409, str(exc))) from None
        return JSONResponse({"id": new_id}, status_code=201)

    async def pause_schedule(self, request: Request) -> Response:
        await self.act(request, {})
        changed = await self.tasks.pause_schedule(request.path_params["name"])
        return JSONResponse({"schedule": _schedule_json(changed)})

    async def resume_schedule(self, request: Request) -> Response:
        await self.act(request, {})
        changed = await self.tasks.resume_schedule(request.path_params["name"])
        return JSONResponse({"schedule": _schedule_json(changed)})

    async def task_json(self, request: Request) -> Response:
        await self.viewer(request)
        return JSONResponse({"task": _task_json(await self.tasks.get(task_id(request)))})

    # -- signing in with the token ------------------------------------------------
    async def login_form(self, request: Request) -> Response:
        if self.token is None:
            raise HTTPException(404, "this dashboard has no token to sign in with")
        access = await self.access(request)
        frame = self.frame(request, access)
        nxt = safe_next(request.query_params.get("next"), frame.base)
        return HTMLResponse(pages.login_page(frame, nxt, request.query_params.get("failed") == "1"))

    async def login(self, request: Request) -> Response:
        if self.token is None:
            raise HTTPException(404, "this dashboard has no token to sign in with")
        origin = request.headers.get("origin")
        if origin is not None and not same_origin(
            origin, f"{request.url.scheme}://{request.url.netloc}"
        ):
            raise HTTPException(403, "cross-origin sign-in refused")
        if media_type(request.headers.get("content-type")) != "application/x-www-form-urlencoded":
            raise HTTPException(415, "sign in with the form")
        form = parse_qs((await self._body(request)).decode("utf-8", "replace"))
        base = request.scope.get("root_path", "").rstrip("/")
        nxt = safe_next(form.get("next", [""])[0], base)
        if not token_matches(form.get("token", [""])[0], self.token):
            return RedirectResponse(f"{base}/login?{urlencode({'next': nxt, 'failed': '1'})}", 303)
        response = RedirectResponse(nxt, 303)
        response.set_cookie(
            SESSION_COOKIE,
            session_value(self.secret, self.token),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path=base or "/",
        )
        return response

    async def logout(self, request: Request) -> Response:
        await self.act(request, {})
        response = JSONResponse({"signed_out": True})
        base = request.scope.get("root_path", "").rstrip("/")
        response.delete_cookie(SESSION_COOKIE, path=base or "/")
        return response


class _Refused(Exception):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


class _Redirect(Exception):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url


def task_id(request: Request) -> int:
    raw = request.path_params["task_id"]
    if not _TASK_ID.fullmatch(raw):
        raise TaskNotFound(f"no task {raw[:40]!r}")
    return int(raw)


def _task_json(info: TaskInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "status": info.status.value,
        "reason": info.reason,
        "exit_code": info.exit_code,
        "argv": list(info.spec.argv),
        "project": info.spec.project,
        "cancel_requested": info.cancel_requested.value if info.cancel_requested else None,
    }


def _schedule_json(schedule: Schedule) -> dict[str, Any]:
    return {
        "name": schedule.name,
        "paused": schedule.paused,
        "next_fire_at": schedule.next_fire_at,
        "last_fire_at": schedule.last_fire_at,
    }


def _wants_json(request: Request) -> bool:
    return "/api/" in request.url.path or request.method != "GET"


def build_app(dashboard: Dashboard, **starlette_options: Any) -> Starlette:
    d = dashboard

    def reply(request: Request, status: int, message: str) -> Response:
        if _wants_json(request):
            return JSONResponse({"error": message}, status_code=status)
        frame = pages.Frame(
            base=request.scope.get("root_path", "").rstrip("/"),
            csrf="",
            can_act=False,
            login=False,
            title=d.title,
        )
        return HTMLResponse(pages.error_page(frame, status, message), status_code=status)

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, _Refused)
        return reply(request, exc.refusal.status, exc.refusal.message)

    async def redirect(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, _Redirect)
        return RedirectResponse(exc.url, 303)

    async def not_found(request: Request, exc: Exception) -> Response:
        return reply(request, 404, str(exc))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return reply(request, exc.status_code, str(exc.detail))

    async def store_error(request: Request, exc: Exception) -> Response:
        return reply(request, 503, f"the task store is unavailable: {exc}")

    routes = [
        Route("/", d.tasks_page, methods=["GET"]),
        Route("/tasks/{task_id}", d.task_page, methods=["GET"]),
        Route("/tasks/{task_id}/log", d.log_stream, methods=["GET"]),
        Route("/nodes", d.nodes_page, methods=["GET"]),
        Route("/waiting", d.waiting_page, methods=["GET"]),
        Route("/queues", d.queues_page, methods=["GET"]),
        Route("/schedules", d.schedules_page, methods=["GET"]),
        Route("/api/tasks/{task_id}", d.task_json, methods=["GET"]),
        Route("/api/tasks/{task_id}/cancel", d.cancel, methods=["POST"]),
        Route("/api/tasks/{task_id}/retry", d.retry, methods=["POST"]),
        # `path`: a schedule's name may hold a slash (the page sends it URL-encoded).
        Route("/api/schedules/{name:path}/pause", d.pause_schedule, methods=["POST"]),
        Route("/api/schedules/{name:path}/resume", d.resume_schedule, methods=["POST"]),
        Route("/login", d.login_form, methods=["GET"]),
        Route("/login", d.login, methods=["POST"]),
        Route("/logout", d.logout, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={
            _Refused: refused,
            _Redirect: redirect,
            TaskNotFound: not_found,
            ScheduleNotFound: not_found,
            HTTPException: http_error,
            StoreError: store_error,
        },
        **starlette_options,
    )
