"""An in-memory store for your own tests: `TaskPool(MemoryStore())`.

It keeps the whole `Store` contract (the same suite runs against it as against
SQLite and PostgreSQL): atomic claims under the same blocking rules, fencing,
leases, rescue, events and output. It lives in one process and forgets
everything when dropped, so it is for tests only; nothing in it is durable.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import anyio

from ._errors import LeaseLost, StoreError, TaskNotFound
from ._models import (
    CancelMode,
    Claim,
    Limits,
    NodeInfo,
    Outcome,
    Status,
    TaskEvent,
    TaskInfo,
    TaskSpec,
    Transition,
    decide_finish,
    decide_handback,
    decide_orphan,
)
from ._rules import Slot, plan_claims
from ._store import Orphan, OutputChunk, Renewal, Store
from .stores._common import ended_columns, handback_reason, rescue_reason


@dataclass
class _Task:
    info: TaskInfo
    pid_started_at: float | None = None
    not_before: float = 0.0
    output: dict[int, list[str]] = field(default_factory=dict)  # fence -> chunks


class MemoryStore(Store):
    """A `Store` in plain Python objects, for tests. Not durable, one process only."""

    def __init__(self) -> None:
        self._tasks: dict[int, _Task] = {}
        self._nodes: dict[str, NodeInfo] = {}
        self._events: list[TaskEvent] = []
        self._lock = anyio.Lock()
        self._open = False
        self.store_id = uuid.uuid4().hex

    def __repr__(self) -> str:
        return f"<MemoryStore tasks={len(self._tasks)} nodes={len(self._nodes)}>"

    async def open(self) -> None:
        self._open = True

    async def close(self) -> None:
        self._open = False

    def _check(self) -> None:
        if not self._open:
            raise StoreError("the store is closed")

    def _task(self, task_id: int) -> _Task:
        self._check()
        task = self._tasks.get(task_id)
        if task is None:
            raise TaskNotFound(f"no task {task_id}")
        return task

    def _set(self, task: _Task, now: float, **changes: object) -> None:
        """Change a task, logging the event when its status or fence changes."""
        old = task.info
        new = dataclasses.replace(old, **changes)  # type: ignore[arg-type]
        task.info = new
        if new.status is not old.status or new.fence != old.fence:
            running = new.status is Status.RUNNING
            fence = new.fence if running else old.fence if old.status is Status.RUNNING else None
            self._log(
                new.id,
                now,
                fence,
                new.owner_node if running else old.owner_node,
                old.status,
                new.status,
                new.reason or "",
            )

    def _log(
        self,
        task_id: int,
        at: float,
        fence: int | None,
        node_id: str | None,
        from_status: Status | None,
        to_status: Status,
        reason: str,
    ) -> None:
        self._events.append(
            TaskEvent(
                len(self._events) + 1, task_id, at, fence, node_id, from_status, to_status, reason
            )
        )

    def _fenced(self, task_id: int, fence: int, now: float) -> _Task:
        task = self._task(task_id)
        info = task.info
        if info.status is not Status.RUNNING or info.fence != fence:
            raise LeaseLost(
                f"task {task_id}: fence {fence} is stale"
                f" (task is {info.status.value}, fence {info.fence})"
            )
        del now  # an expired lease is still the owner's until someone takes over
        return task

    def _end(self, task: _Task, transition: Transition, now: float, exit_code: int | None) -> None:
        info = task.info
        # The same columns the SQL backends write (shutdown refunds the attempt, ...).
        row = {"status": info.status, "attempts_used": info.attempts_used}
        columns = ended_columns(row, transition, now, exit_code)
        task.not_before = columns.pop("not_before", task.not_before)
        if "pid_started_at" in columns:
            task.pid_started_at = columns.pop("pid_started_at")
        del columns["changed_at"]  # the event records when
        columns["status"] = Status(columns["status"])
        self._set(task, now, **columns)

    # -- nodes -------------------------------------------------------------
    async def register_node(self, node: NodeInfo) -> None:
        self._check()
        self._nodes[node.id] = node

    async def stop_node(self, node_id: str, reason: str) -> None:
        self._check()
        now = time.time()
        node = self._nodes.get(node_id)
        if node is not None and node.stopped_at is None:
            self._nodes[node_id] = dataclasses.replace(node, stopped_at=now)
        # At once, as the SQL stores do in one transaction: a stopped node owns nothing.
        for task in self._tasks.values():
            info = task.info
            if info.status is Status.RUNNING and info.owner_node == node_id:
                transition = decide_handback(
                    handback_reason(node_id, reason),
                    cancel_requested=info.cancel_requested is not None,
                )
                self._end(task, transition, now, None)

    async def list_nodes(
        self, *, host: str | None = None, alive: bool | None = None
    ) -> list[NodeInfo]:
        self._check()
        return sorted(
            (
                n
                for n in self._nodes.values()
                if (host is None or n.host == host)
                and (alive is None or (n.stopped_at is None) == alive)
            ),
            key=lambda n: n.started_at,
        )

    # -- the queue ---------------------------------------------------------
    async def submit(self, spec: TaskSpec) -> int:
        self._check()
        spec = spec.checked()  # as the SQL stores: InvalidTask, and nothing stored
        now = time.time()
        task_id = len(self._tasks) + 1
        info = TaskInfo(
            id=task_id,
            spec=spec,
            status=Status.WAITING,
            submitted_at=now,
            attempts_used=0,
            fence=0,
            owner_node=None,
            lease_expires_at=None,
            pid=None,
            started_at=None,
            finished_at=None,
            exit_code=None,
            reason="submitted",
            cancel_requested=None,
        )
        self._tasks[task_id] = _Task(info, not_before=spec.not_before or 0.0)
        self._log(task_id, now, None, None, None, Status.WAITING, "submitted")
        return task_id

    async def claim(self, node_id: str, limits: Limits, lease_ttl_s: float) -> list[Claim]:
        async with self._lock:
            return self._claim(node_id, limits, lease_ttl_s)

    def _claim(self, node_id: str, limits: Limits, lease_ttl_s: float) -> list[Claim]:
        self._check()
        now = time.time()
        node = self._nodes.get(node_id)
        if node is not None and node.stopped_at is not None:
            return []  # a stopped node runs nothing
        live = [
            t.info
            for t in self._tasks.values()
            if t.info.status is Status.RUNNING and (t.info.lease_expires_at or 0) >= now
        ]
        waiting = sorted(
            (
                t.info
                for t in self._tasks.values()
                if t.info.status is Status.WAITING and t.not_before <= now
            ),
            key=lambda i: (-i.spec.priority, i.id),
        )
        chosen = plan_claims(
            [_slot(i) for i in waiting],
            [_slot(i) for i in live],
            node_running=sum(1 for i in live if i.owner_node == node_id),
            max_parallel=limits.max_parallel,
            project_limits=limits.project_limits,
        )
        claims = []
        for slot in chosen:
            task = self._tasks[slot.task_id]
            info = task.info
            self._set(
                task,
                now,
                status=Status.RUNNING,
                fence=info.fence + 1,
                attempts_used=info.attempts_used + 1,
                owner_node=node_id,
                lease_expires_at=now + lease_ttl_s,
                started_at=now,
                pid=None,
                exit_code=None,
                reason=f"claimed by node {node_id} (attempt {info.attempts_used + 1} of "
                f"{info.spec.max_attempts})",
            )
            task.pid_started_at = None
            claims.append(Claim(task.info, task.info.fence))
        return claims

    async def record_spawn(self, task_id: int, fence: int, pid: int, pid_started_at: float) -> None:
        task = self._fenced(task_id, fence, time.time())
        task.info = dataclasses.replace(task.info, pid=pid)
        task.pid_started_at = pid_started_at

    async def append_output(self, task_id: int, fence: int, texts: Sequence[str]) -> None:
        task = self._fenced(task_id, fence, time.time())
        task.output.setdefault(fence, []).extend(texts)

    async def finish(self, task_id: int, fence: int, outcome: Outcome) -> TaskInfo:
        now = time.time()
        task = self._fenced(task_id, fence, now)
        info = task.info
        transition = decide_finish(
            outcome,
            attempts_used=info.attempts_used,
            max_attempts=info.spec.max_attempts,
            backoff_s=info.spec.retry_backoff_s,
            now=now,
            cancel_requested=info.cancel_requested is not None,
        )
        self._end(task, transition, now, outcome.exit_code)
        return task.info

    async def finish_and_claim(
        self,
        task_id: int,
        fence: int,
        outcome: Outcome,
        *,
        node_id: str,
        limits: Limits,
        lease_ttl_s: float,
    ) -> list[Claim]:
        async with self._lock:
            await self.finish(task_id, fence, outcome)
            return self._claim(node_id, limits, lease_ttl_s)

    async def renew_leases(self, node_id: str, lease_ttl_s: float) -> Renewal:
        self._check()
        now = time.time()
        held: dict[int, int] = {}
        cancels: dict[int, CancelMode] = {}
        for task in self._tasks.values():
            info = task.info
            if (
                info.status is Status.RUNNING
                and info.owner_node == node_id
                and (info.lease_expires_at or 0) >= now
            ):
                task.info = dataclasses.replace(info, lease_expires_at=now + lease_ttl_s)
                held[info.id] = info.fence
                if info.cancel_requested:
                    cancels[info.id] = info.cancel_requested
        node = self._nodes.get(node_id)
        if node is not None:
            self._nodes[node_id] = dataclasses.replace(node, heartbeat_at=now)
        return Renewal(held=held, cancel_requests=cancels)

    async def rescue_expired(
        self, *, except_attempts: Collection[tuple[int, int]] = ()
    ) -> list[TaskInfo]:
        self._check()
        spared = set(except_attempts)
        now = time.time()
        rescued = []
        for task in self._tasks.values():
            info = task.info
            if info.status is not Status.RUNNING or (info.lease_expires_at or 0) >= now:
                continue
            if (info.id, info.fence) in spared:
                continue
            owner = self._nodes.get(info.owner_node or "")
            reason = rescue_reason(
                info.owner_node, owner.heartbeat_at if owner else None, info.lease_expires_at or 0
            )
            transition = decide_orphan(
                attempts_used=info.attempts_used,
                max_attempts=info.spec.max_attempts,
                reason=reason,
                cancel_requested=info.cancel_requested is not None,
            )
            self._end(task, transition, now, None)
            rescued.append(task.info)
        return rescued

    async def orphans_of(self, node_id: str) -> list[Orphan]:
        self._check()
        return [
            Orphan(t.info.id, t.info.fence, node_id, t.info.pid, t.pid_started_at)
            for t in self._tasks.values()
            if t.info.status is Status.RUNNING and t.info.owner_node == node_id
        ]

    async def settle_orphan(self, task_id: int, fence: int, reason: str) -> TaskInfo:
        task = self._task(task_id)
        info = task.info
        if info.status is not Status.RUNNING or info.fence != fence:
            return info
        transition = decide_orphan(
            attempts_used=info.attempts_used,
            max_attempts=info.spec.max_attempts,
            reason=reason,
            cancel_requested=info.cancel_requested is not None,
        )
        self._end(task, transition, time.time(), None)
        return task.info

    # -- operator actions --------------------------------------------------
    async def request_cancel(self, task_id: int, *, force: bool = False) -> TaskInfo:
        task = self._task(task_id)
        info = task.info
        now = time.time()
        if info.status is Status.WAITING:
            self._end(
                task,
                Transition(Status.CANCELLED, False, reason="cancelled while waiting"),
                now,
                None,
            )
        elif info.status is Status.RUNNING:
            forced = force or info.cancel_requested is CancelMode.FORCE
            mode = CancelMode.FORCE if forced else CancelMode.GRACEFUL
            task.info = dataclasses.replace(info, cancel_requested=mode)
            self._log(
                task_id,
                now,
                info.fence,
                info.owner_node,
                info.status,
                info.status,
                f"cancel requested ({mode})",
            )
        return task.info

    # -- reads -------------------------------------------------------------
    async def get(self, task_id: int) -> TaskInfo:
        return self._task(task_id).info

    async def list_tasks(
        self,
        *,
        statuses: Sequence[Status] | None = None,
        project: str | None = None,
        limit: int = 100,
    ) -> list[TaskInfo]:
        self._check()
        found = [
            t.info
            for t in reversed(self._tasks.values())
            if (statuses is None or t.info.status in statuses)
            and (project is None or t.info.spec.project == project)
        ]
        return found[:limit]

    async def events(self, task_id: int) -> list[TaskEvent]:
        self._check()
        return [e for e in self._events if e.task_id == task_id]

    async def read_output(
        self, task_id: int, *, after: tuple[int, int] = (0, 0), limit: int = 1000
    ) -> list[OutputChunk]:
        task = self._task(task_id)
        chunks = [
            OutputChunk(fence, seq, text)
            for fence in sorted(task.output)
            for seq, text in enumerate(task.output[fence], 1)
            if (fence, seq) > after
        ]
        return chunks[:limit]


def _slot(info: TaskInfo) -> Slot:
    spec = info.spec
    return Slot(info.id, spec.project, spec.template, spec.template_parallel, spec.locks)
