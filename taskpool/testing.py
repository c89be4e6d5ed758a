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
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import anyio

from ._decisions import (
    HELD_FOR_DEPENDENCIES,
    CancelRequest,
    DependencyStart,
    Ending,
    Start,
    TaskState,
    cascade_reasons,
    check_fence,
    keyed_conflict,
    lease_live,
    logged_transition,
    plan_cancel,
    plan_dependencies,
    plan_dependency_cancel,
    plan_finish,
    plan_handback,
    plan_orphan_settlement,
    plan_replace,
    plan_rescue,
    plan_start,
)
from ._errors import StoreError
from ._models import (
    CancelMode,
    Claim,
    Limits,
    NodeInfo,
    Outcome,
    Status,
    SubmitResult,
    TaskEvent,
    TaskInfo,
    TaskSpec,
)
from ._retention import FinishedTask, PruneReport, Retention, select_prunable
from ._rules import FairClock, Slot, fair_tags, plan_claims
from ._scheduler import MemorySchedules
from ._store import Orphan, OutputChunk, Renewal, Store
from ._validation import check_batch_keys
from .stores._common import no_task


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
        # The run-after edges, as the SQL stores' task_after: a task -> who runs after it.
        self._dependants: dict[int, set[int]] = {}
        self._cascading = False
        self._nodes: dict[str, NodeInfo] = {}
        #: Fair sharing's clock: each project's start and finish tags (`FairClock`).
        self._fair_tags: dict[str, tuple[float, float]] = {}
        self._events: list[TaskEvent] = []
        self._last_task_id = self._last_event_id = 0
        self._lock = anyio.Lock()
        self._open = False
        #: The UNIX time leases, retries and claims are decided on: set your own to
        #: move time in a test instead of sleeping.
        self.clock: Callable[[], float] = time.time
        self.store_id = uuid.uuid4().hex
        # `watch_for_cancels` callers: node id -> the calls to make on a cancel request.
        self._cancel_watchers: dict[str, list[Callable[[], None]]] = {}
        self._schedules = MemorySchedules(self)

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
            raise no_task(task_id)
        return task

    def _set(self, task: _Task, now: float, **changes: object) -> None:
        """Change a task, logging the event its change logs (as the SQL triggers do)."""
        old = task.info
        task.info = dataclasses.replace(old, **changes)  # type: ignore[arg-type]
        event = logged_transition(
            TaskState.of(old), TaskState.of(task.info), now, task.info.reason or ""
        )
        if event is not None:
            self._log(event)
        if task.info.status is not old.status and task.info.is_terminal and not self._cascading:
            self._settle_dependants(task.info, now)

    def _settle_dependants(self, ended: TaskInfo, now: float) -> None:
        """As the SQL stores' triggers do in the same transaction: a success releases
        each held dependant whose dependencies have all succeeded; another end cancels
        every waiting task below it, each with its reason."""
        if not self._dependants.get(ended.id):
            return
        if ended.status is Status.SUCCEEDED:
            for task_id in sorted(self._dependants[ended.id]):
                task = self._tasks.get(task_id)
                if (
                    task is not None
                    and task.info.status is Status.WAITING
                    and task.not_before == HELD_FOR_DEPENDENCIES
                    and all(
                        d not in self._tasks or self._tasks[d].info.status is Status.SUCCEEDED
                        for d in task.info.spec.after
                    )
                ):
                    task.not_before = task.info.spec.not_before or 0.0
            return

        def waiting_dependants(task_id: int) -> list[int]:
            return [
                d
                for d in self._dependants.get(task_id, ())
                if d in self._tasks and self._tasks[d].info.status is Status.WAITING
            ]

        reasons = cascade_reasons(
            ended.id, ended.status, waiting_dependants, lambda i: self._tasks[i].info.spec.after
        )
        self._cascading = True  # the cancels below settle nothing more: all are here
        try:
            for task_id, reason in reasons.items():
                task = self._tasks[task_id]
                self._end(task, plan_dependency_cancel(TaskState.of(task.info), reason, now))
        finally:
            self._cascading = False

    def _log(self, event: TaskEvent) -> None:
        self._last_event_id += 1  # never reused, even after a prune
        self._events.append(dataclasses.replace(event, id=self._last_event_id))

    def _fenced(self, task_id: int, fence: int) -> _Task:
        task = self._task(task_id)
        check_fence(TaskState.of(task.info), fence)
        return task

    def _end(self, task: _Task, e: Ending) -> TaskInfo:
        """Apply an ending as the SQL stores write its columns."""
        changes: dict[str, object] = {
            "status": e.status,
            "attempts_used": e.attempts_used,
            "lease_expires_at": None,
            "exit_code": e.exit_code,
            "reason": e.reason,
        }
        if e.requeued:
            changes.update(owner_node=None, pid=None)
            # As the SQL stores read it back: the spec shows when it may run again.
            changes["spec"] = dataclasses.replace(task.info.spec, not_before=e.not_before or None)
            task.not_before, task.pid_started_at = e.not_before, None
        else:
            changes["finished_at"] = e.at
        self._set(task, e.at, **changes)
        return task.info

    def _start(self, task: _Task, s: Start) -> TaskInfo:
        self._set(
            task,
            s.at,
            status=Status.RUNNING,
            fence=s.fence,
            attempts_used=s.attempts_used,
            owner_node=s.owner_node,
            lease_expires_at=s.lease_expires_at,
            started_at=s.at,
            pid=None,
            exit_code=None,
            reason=s.reason,
        )
        task.pid_started_at = None
        return task.info

    # -- nodes -------------------------------------------------------------
    async def register_node(self, node: NodeInfo) -> None:
        self._check()
        self._nodes[node.id] = node

    async def stop_node(self, node_id: str, reason: str) -> None:
        self._check()
        now = self.clock()
        node = self._nodes.get(node_id)
        if node is not None and node.stopped_at is None:
            self._nodes[node_id] = dataclasses.replace(node, stopped_at=now)
        # At once, as the SQL stores do in one transaction: a stopped node owns nothing.
        for task in self._tasks.values():
            info = task.info
            if info.status is Status.RUNNING and info.owner_node == node_id:
                self._end(task, plan_handback(TaskState.of(info), node_id, reason, now))

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
    def _dependencies(self, spec: TaskSpec) -> DependencyStart | None:
        if not spec.after:
            return None
        known = [self._tasks[i].info for i in spec.after if i in self._tasks]
        found = {info.id: info.status for info in known}
        return plan_dependencies(spec.after, found, {info.id: info.reason for info in known})

    async def submit_many(self, specs: Sequence[TaskSpec]) -> list[int]:
        """As the SQL stores: every spec and every dependency checked before any is stored."""
        self._check()
        checked = [spec.checked() for spec in specs]
        check_batch_keys(spec.unique_key for spec in checked)
        for spec in checked:
            self._dependencies(spec)
        return [await self.submit(spec) for spec in checked]

    async def submit(self, spec: TaskSpec, *, reason: str = "submitted") -> int:
        self._check()
        spec = spec.checked()  # as the SQL stores: InvalidTask, and nothing stored
        dependencies = self._dependencies(spec)  # InvalidTask too, before anything changes
        now = time.time()
        holder = next(
            (
                t
                for t in self._tasks.values()
                if spec.unique_key is not None
                and t.info.spec.unique_key == spec.unique_key
                and not t.info.is_terminal
            ),
            None,
        )
        state = TaskState.of(holder.info) if holder is not None else None
        existing, replaced = keyed_conflict(state, spec.on_conflict)
        if existing is not None:
            return SubmitResult(existing, created=False)
        self._last_task_id += 1  # never reused, even after a prune
        task_id = self._last_task_id
        if holder is not None and state is not None and spec.unique_key is not None:
            self._end(holder, plan_replace(state, task_id, spec.unique_key, now))
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
            reason=reason,
            cancel_requested=None,
        )
        held = dependencies is not None and dependencies.held
        not_before = HELD_FOR_DEPENDENCIES if held else spec.not_before or 0.0
        task = self._tasks[task_id] = _Task(info, not_before=not_before)
        self._log(TaskEvent(0, task_id, now, None, None, None, Status.WAITING, reason))
        for after in spec.after:
            self._dependants.setdefault(after, set()).add(task_id)
        if dependencies is not None and dependencies.cancel_reason is not None:
            ending = plan_dependency_cancel(TaskState.of(info), dependencies.cancel_reason, now)
            self._end(task, ending)
        return SubmitResult(task_id, replaced=replaced)

    async def claim(self, node_id: str, limits: Limits, lease_ttl_s: float) -> list[Claim]:
        async with self._lock:
            return self._claim(node_id, limits, lease_ttl_s)

    def _claim(self, node_id: str, limits: Limits, lease_ttl_s: float) -> list[Claim]:
        self._check()
        now = self.clock()
        node = self._nodes.get(node_id)
        if node is not None and node.stopped_at is not None:
            return []  # a stopped node runs nothing
        live = [
            t.info
            for t in self._tasks.values()
            if t.info.status is Status.RUNNING and lease_live(t.info.lease_expires_at, now)
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
            fair_share=limits.fair_share,
            clock=FairClock.of(self._fair_tags),
        )
        if limits.fair_share is not None:
            self._fair_tags.update(
                fair_tags(FairClock.of(self._fair_tags), chosen, limits.fair_share)
            )
        return [
            Claim(self._start(task, plan_start(TaskState.of(task.info), node_id, now, lease_ttl_s)))
            for task in (self._tasks[slot.task_id] for slot in chosen)
        ]

    async def record_spawn(self, task_id: int, fence: int, pid: int, pid_started_at: float) -> None:
        task = self._fenced(task_id, fence)
        task.info = dataclasses.replace(task.info, pid=pid)
        task.pid_started_at = pid_started_at

    async def append_output(self, task_id: int, fence: int, texts: Sequence[str]) -> None:
        task = self._fenced(task_id, fence)
        task.output.setdefault(fence, []).extend(texts)

    async def finish(self, task_id: int, fence: int, outcome: Outcome) -> TaskInfo:
        task = self._task(task_id)
        return self._end(task, plan_finish(TaskState.of(task.info), fence, outcome, self.clock()))

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
        now = self.clock()
        held: dict[int, int] = {}
        cancels: dict[int, CancelMode] = {}
        for task in self._tasks.values():
            info = task.info
            if (
                info.status is Status.RUNNING
                and info.owner_node == node_id
                and lease_live(info.lease_expires_at, now)
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
        now = self.clock()
        rescued = []
        for task in self._tasks.values():
            info = task.info
            if info.status is not Status.RUNNING or lease_live(info.lease_expires_at, now):
                continue
            if (info.id, info.fence) in spared:
                continue
            owner = self._nodes.get(info.owner_node or "")
            heartbeat_at = owner.heartbeat_at if owner else None
            rescued.append(self._end(task, plan_rescue(TaskState.of(info), heartbeat_at, now)))
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
        ending = plan_orphan_settlement(TaskState.of(task.info), fence, reason, self.clock())
        return task.info if ending is None else self._end(task, ending)

    def schedules(self) -> MemorySchedules:
        return self._schedules

    # -- operator actions --------------------------------------------------
    async def request_cancel(self, task_id: int, *, force: bool = False) -> TaskInfo:
        task = self._task(task_id)
        plan = plan_cancel(TaskState.of(task.info), force=force, now=self.clock())
        if isinstance(plan, Ending):
            return self._end(task, plan)
        if isinstance(plan, CancelRequest):
            task.info = dataclasses.replace(task.info, cancel_requested=plan.mode)
            self._log(plan.event)
            for on_cancel in list(self._cancel_watchers.get(task.info.owner_node or "", ())):
                on_cancel()
        return task.info

    async def prune(
        self, policy: Retention, *, now: float | None = None, dry_run: bool = False
    ) -> PruneReport:
        self._check()
        finished = [
            FinishedTask(t.info.id, t.info.status, t.info.finished_at, bool(t.output))
            for t in self._tasks.values()
            if t.info.status.is_terminal and t.info.finished_at is not None
        ]
        chosen = select_prunable(finished, policy.plan(self.clock() if now is None else now))
        gone = set(chosen.tasks)
        report = PruneReport(dry_run=dry_run).plus(
            len(chosen.tasks),
            sum(self._tasks[i].info.fence for i in chosen.tasks),  # one attempt per claim
            sum(1 for e in self._events if e.task_id in gone),
            sum(
                len(c)
                for i in (*chosen.tasks, *chosen.output_only)
                for c in self._tasks[i].output.values()
            ),
            len(chosen.output_only),
        )
        if not dry_run:
            for task_id in chosen.tasks:
                del self._tasks[task_id]
                self._dependants.pop(task_id, None)
            for task_id in chosen.output_only:
                self._tasks[task_id].output.clear()
            self._events = [e for e in self._events if e.task_id not in gone]
        return report

    async def cancel_requests(self, node_id: str) -> dict[int, tuple[int, CancelMode]]:
        self._check()
        return {
            t.info.id: (t.info.fence, t.info.cancel_requested)
            for t in self._tasks.values()
            if t.info.status is Status.RUNNING
            and t.info.owner_node == node_id
            and t.info.cancel_requested is not None
        }

    async def watch_for_cancels(self, node_id: str, on_cancel: Callable[[], None]) -> None:
        """An in-process call: `request_cancel` calls `on_cancel` for the owner's node."""
        watchers = self._cancel_watchers.setdefault(node_id, [])
        watchers.append(on_cancel)
        try:
            on_cancel()  # one may have come before this watch began
            await anyio.sleep_forever()
        finally:
            watchers.remove(on_cancel)

    # -- reads -------------------------------------------------------------
    async def get(self, task_id: int) -> TaskInfo:
        return self._task(task_id).info

    async def statuses(self, task_ids: Collection[int]) -> dict[int, Status]:
        self._check()
        found = {i: self._tasks.get(i) for i in task_ids}
        return {i: t.info.status for i, t in found.items() if t is not None}

    async def get_many(
        self, task_ids: Collection[int], *, ended_only: bool = False
    ) -> dict[int, TaskInfo]:
        self._check()
        found = {i: self._tasks.get(i) for i in task_ids}
        return {
            i: t.info
            for i, t in found.items()
            if t is not None and (t.info.is_terminal or not ended_only)
        }

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

    async def waiting_ahead(self, task_id: int, *, limit: int) -> list[TaskInfo]:
        me = self._task(task_id).info
        now = self.clock()
        ahead = sorted(
            (
                t.info
                for t in self._tasks.values()
                if t.info.status is Status.WAITING
                and t.not_before <= now
                and (-t.info.spec.priority, t.info.id) < (-me.spec.priority, me.id)
            ),
            key=lambda i: (-i.spec.priority, i.id),
        )
        return ahead[:limit]

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
