"""TaskPool: the anyio task group that ties store, rules and runners together.

Shape of a running pool (every task below lives in one task group, so nothing
outlives `async with TaskPool(...)`):

- the claim loop asks the store for attempts the blocking rules allow and starts
  one runner task per attempt;
- the heartbeat renews every lease of this node in one write and stops runners
  whose lease was lost or whose task an operator cancelled from elsewhere;
- the reaper re-queues (or marks lost) attempts of nodes that stopped
  heartbeating;
- each runner spawns a process group, streams its output to the store and
  writes its terminal status, on every path.

An exception in any of them cancels the group: runners kill their process
groups (shielded), and the pool's context raises `PoolCrashed`.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup

from . import _procs
from ._errors import LeaseLost, PoolClosed, PoolCrashed, StoreUnavailable
from ._models import (
    Claim,
    Limits,
    NodeInfo,
    Outcome,
    OutcomeKind,
    Status,
    TaskEvent,
    TaskInfo,
    TaskSpec,
)
from ._runner import RunnerControl, RunRequest, StopKind, run_attempt
from ._store import Store
from ._telemetry import Metrics, Telemetry

T = TypeVar("T")

#: Output is sent to the store once this much is buffered (or every flush interval).
LOG_FLUSH_BYTES = 256 * 1024


class _StoreSink:
    """Buffers one attempt's output and appends it to the store in batches."""

    def __init__(self, pool: TaskPool, task_id: int, fence: int) -> None:
        self._pool = pool
        self._task_id = task_id
        self._fence = fence
        self._buffer: list[str] = []
        self._buffered = 0

    async def write(self, text: str) -> None:
        self._buffer.append(text)
        self._buffered += len(text)
        if self._buffered >= LOG_FLUSH_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if not self._buffer:
            return
        texts, self._buffer, self._buffered = self._buffer, [], 0
        await self._pool._with_store(
            lambda: self._pool.store.append_output(self._task_id, self._fence, texts)
        )
        self._pool._output_changed()


class TaskPool:
    """A pool of subprocess runners embedded in the caller's event loop.

    Use it as `async with TaskPool("tasks.db") as pool:`. Leaving the context
    shuts down gracefully: no new claims, running tasks get `shutdown_drain_s`
    to finish, then are stopped (SIGTERM, `kill_grace_s`, SIGKILL) and put back
    to waiting without using up an attempt, for the next pool to resume.

    `store` is a `Store`, a `postgresql://` URL (the multi-node store), or a path
    to an SQLite file (created if missing).
    `max_parallel` caps running tasks on this node; `project_limits` caps
    running tasks per project across every node sharing the store.
    A store that stays unavailable for longer than `store_outage_tolerance_s`
    crashes the pool (its children are killed and `PoolCrashed` is raised).
    """

    def __init__(
        self,
        store: Store | str | os.PathLike[str],
        *,
        max_parallel: int = 4,
        project_limits: Mapping[str, int] | None = None,
        lease_ttl_s: float = 30.0,
        heartbeat_interval_s: float | None = None,
        reaper_interval_s: float = 5.0,
        poll_interval_s: float = 1.0,
        kill_grace_s: float = 5.0,
        shutdown_drain_s: float = 10.0,
        max_log_bytes: int = 10 * 1024 * 1024,
        store_outage_tolerance_s: float = 30.0,
        metrics: Metrics | None = None,
    ) -> None:
        if isinstance(store, Store):
            self.store = store
            self._owns_store = False
        elif isinstance(store, str) and store.startswith(("postgresql://", "postgres://")):
            from .stores.postgres import PostgresStore

            # A connection per running task's writes, plus the loops' own.
            self.store = PostgresStore(store, max_size=max(max_parallel, 1) + 4)
            self._owns_store = True
        else:
            from .stores.sqlite import SQLiteStore

            self.store = SQLiteStore(Path(store))
            self._owns_store = True
        if max_parallel < 1:
            raise ValueError("max_parallel must be >= 1")
        self.limits = Limits(max_parallel, dict(project_limits or {}))
        self.lease_ttl_s = lease_ttl_s
        self.heartbeat_interval_s = heartbeat_interval_s or lease_ttl_s / 3
        if self.heartbeat_interval_s >= lease_ttl_s:
            raise ValueError("heartbeat_interval_s must be shorter than lease_ttl_s")
        self.reaper_interval_s = reaper_interval_s
        self.poll_interval_s = poll_interval_s
        self.kill_grace_s = kill_grace_s
        self.shutdown_drain_s = shutdown_drain_s
        self.max_log_bytes = max_log_bytes
        self.store_outage_tolerance_s = store_outage_tolerance_s
        self.metrics = metrics
        self._telemetry = Telemetry("-", metrics)
        self.node: NodeInfo | None = None
        self._tg: TaskGroup | None = None
        # Created here, not in the services task: shutdown may cancel it before that task runs.
        self._services = anyio.CancelScope()
        # Keyed by (task id, fence): a task whose lease this node lost and then claimed
        # again has two runners for a moment, the old one still killing its process.
        self._runners: dict[tuple[int, int], RunnerControl] = {}
        self._interrupted: dict[int, int] = {}  # runners cancelled by a crash: task id -> fence
        self._idle = anyio.Event()
        self._wake = anyio.Event()
        self._changed = anyio.Event()
        self._new_output = anyio.Event()
        self._closing = False

    def __repr__(self) -> str:
        node = self.node.id if self.node else None
        return (
            f"<TaskPool node={node} running={len(self._runners)}/{self.limits.max_parallel} "
            f"store={self.store!r}>"
        )

    @property
    def node_id(self) -> str:
        if self.node is None:
            raise PoolClosed("the pool is not running")
        return self.node.id

    # -- lifecycle ---------------------------------------------------------
    async def __aenter__(self) -> TaskPool:
        await self.store.open()
        try:
            now = time.time()
            me = os.getpid()
            self.node = NodeInfo(
                id=uuid.uuid4().hex,  # a fresh identity per incarnation, never reused
                host=socket.gethostname(),
                pid=me,
                pid_started_at=_procs.start_time(me) or now,
                started_at=now,
                heartbeat_at=now,
                stopped_at=None,
                max_parallel=self.limits.max_parallel,
            )
            self._telemetry = Telemetry(self.node.id, self.metrics)
            await self.store.register_node(self.node)
            # Recovery before work: nothing is claimed until predecessors are settled.
            await self._reconcile_predecessors()
            self._tg = anyio.create_task_group()
            await self._tg.__aenter__()
        except BaseException:
            if self._owns_store:
                with anyio.CancelScope(shield=True):
                    await self.store.close()
            raise
        self._tg.start_soon(self._run_services, name="taskpool services")
        self._telemetry.node_started()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._tg is not None
        assert self.node is not None
        self._closing = True
        crashed = self._tg.cancel_scope.cancel_called
        if not crashed:
            # Bounded and shielded, so an outer cancellation cannot skip the cleanup.
            budget = (0 if exc_type else self.shutdown_drain_s) + self.kill_grace_s + 30
            with anyio.CancelScope(shield=True), anyio.move_on_after(budget):
                await self._shutdown(drain=exc_type is None)
        self._services.cancel()
        failure: BaseException | None = None
        try:
            if await self._tg.__aexit__(exc_type, exc, tb):
                exc = None
        except BaseException as raised:
            errors = [e for e in _leaves(raised) if e is not exc and not _is_cancel(e)]
            if errors:
                failure = errors[0]
            elif exc is None:
                raise
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await self._write_what_can_be_written(failure)
        if self._owns_store:
            with anyio.CancelScope(shield=True):
                await self.store.close()
        if failure is not None:
            self._telemetry.crashed(failure)
            raise PoolCrashed(f"taskpool node {self.node.id} crashed: {failure!r}") from failure
        return exc is None and exc_type is not None

    async def _shutdown(self, *, drain: bool) -> None:
        if drain and self._runners:
            with anyio.move_on_after(self.shutdown_drain_s):
                await self._wait_idle()
        assert self.node is not None
        for control in list(self._runners.values()):
            control.stop(StopKind.SHUTDOWN, self._shutdown_reason())
        await self._wait_idle()

    async def _wait_idle(self) -> None:
        while self._runners:
            self._idle = anyio.Event()
            await self._idle.wait()

    async def _write_what_can_be_written(self, failure: BaseException | None) -> None:
        """After the group is gone: release interrupted attempts, mark the node stopped."""
        assert self.node is not None
        why = f"pool crashed ({failure!r})" if failure else "shutdown did not finish in time"
        for task_id, fence in self._interrupted.items():
            try:
                await self.store.finish(
                    task_id, fence, Outcome(OutcomeKind.SHUTDOWN, f"interrupted: {why}")
                )
            except Exception as exc:  # the store may be what failed; boot will reconcile
                self._telemetry.note(
                    logging.WARNING,
                    "release_failed",
                    "could not release task %s after crash: %r",
                    task_id,
                    exc,
                    task_id=task_id,
                )
        try:
            reason = "stopped" if failure is None else f"crashed: {failure!r}"
            await self.store.stop_node(self.node.id, reason)
        except Exception as exc:
            self._telemetry.note(
                logging.WARNING, "stop_failed", "could not mark the node stopped: %r", exc
            )

    async def _run_services(self) -> None:
        with self._services:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._claim_loop, name="taskpool claim loop")
                tg.start_soon(self._heartbeat_loop, name="taskpool heartbeat")
                tg.start_soon(self._reaper_loop, name="taskpool reaper")
                tg.start_soon(
                    self.store.watch_for_work, self._work_arrived, name="taskpool work watcher"
                )

    # -- recovery ----------------------------------------------------------
    async def _reconcile_predecessors(self) -> None:
        """Settle what dead pools on this host left running: kill leftovers, re-queue or fail.

        Run at boot before any claim, and again by the reaper: a sibling pool on this
        host that dies is settled within a reaper interval, leftovers killed, without
        waiting for its leases to expire."""
        assert self.node is not None
        how_found = (
            f"found by node {self.node.id}"
            if self._tg is not None
            else f"found at boot of node {self.node.id}"
        )
        for node in await self.store.list_nodes(host=self.node.host, alive=True):
            if node.id == self.node.id or _procs.is_same_process(node.pid, node.pid_started_at):
                continue  # a live pool (maybe stopped with SIGSTOP): its leases will tell
            orphans = await self.store.orphans_of(node.id)
            leftovers = [
                _procs.Leftover(o.pid, o.pid_started_at, _procs.attempt_marker(o.task_id, o.fence))
                for o in orphans
            ]
            # One scan of the process table for all of them, off the event loop.
            killed = await anyio.to_thread.run_sync(_procs.kill_leftovers, leftovers)
            for orphan, leftover in zip(orphans, leftovers, strict=True):
                kills = killed[leftover.marker]
                found = f"killed leftover {', '.join(kills)}" if kills else "no process was left"
                reason = f"owner node {node.id} (pid {node.pid}) died; {how_found}; {found}"
                info = await self.store.settle_orphan(orphan.task_id, orphan.fence, reason)
                self._telemetry.settled(info, "reconciled")
            await self.store.stop_node(node.id, f"{how_found}: its process is gone")

    # -- the loops ---------------------------------------------------------
    async def _claim_loop(self) -> None:
        assert self._tg is not None
        assert self.node is not None
        while not self._closing:
            self._wake = anyio.Event()
            if len(self._runners) < self.limits.max_parallel:
                claims = await self._with_store(
                    lambda: self.store.claim(self.node_id, self.limits, self.lease_ttl_s)
                )
                self._start(claims)
            with anyio.move_on_after(self.poll_interval_s):
                await self._wake.wait()

    def _start(self, claims: Sequence[Claim]) -> None:
        assert self._tg is not None
        for claim in claims:
            control = RunnerControl()
            if self._closing:  # claimed while shutdown began: hand it straight back
                control.stop(StopKind.SHUTDOWN, self._shutdown_reason())
            self._runners[claim.task.id, claim.fence] = control
            self._tg.start_soon(self._run, claim, name=f"taskpool task {claim.task.id}")

    def _shutdown_reason(self) -> str:
        return f"interrupted: node {self.node_id} shut down"

    async def _heartbeat_loop(self) -> None:
        while True:
            await anyio.sleep(self.heartbeat_interval_s)
            before = dict(self._runners)  # only runners whose claim committed before the renewal
            renewal = await self._with_store(
                lambda: self.store.renew_leases(self.node_id, self.lease_ttl_s)
            )
            for (task_id, fence), control in before.items():
                if renewal.held.get(task_id) != fence:
                    control.stop(
                        StopKind.LEASE_LOST, "lease lost: another node owns the task", force=True
                    )
                elif task_id in renewal.cancel_requests:
                    force = renewal.cancel_requests[task_id] == "force"
                    control.stop(StopKind.CANCELLED, "cancelled by request", force=force)

    async def _reaper_loop(self) -> None:
        while True:
            await self._with_store(self._reconcile_predecessors)
            rescued = await self._with_store(self.store.rescue_expired)
            for info in rescued:
                self._telemetry.settled(info, "rescued")
            if rescued:
                self._wake.set()
                self._task_changed()
            await anyio.sleep(self.reaper_interval_s)

    async def _run(self, claim: Claim) -> None:
        task = claim.task
        fence = claim.fence
        control = self._runners[task.id, fence]
        spec = task.spec
        request = RunRequest(
            argv=spec.argv,
            cwd=spec.cwd,
            env=spec.env,
            pass_env=spec.pass_env,
            inherit_env=spec.inherit_env,
            marker=_procs.attempt_marker(task.id, fence),
            timeout_s=spec.timeout_s,
            stall_timeout_s=spec.stall_timeout_s,
            kill_grace_s=self.kill_grace_s,
            max_log_bytes=self.max_log_bytes,
        )

        async def on_spawn(pid: int, started_at: float) -> None:
            await self._with_store(lambda: self.store.record_spawn(task.id, fence, pid, started_at))

        finished = claimed = False
        started = anyio.current_time()
        self._telemetry.attempt_started(task)
        outcome = Outcome(OutcomeKind.SHUTDOWN, "interrupted: the pool stopped its task group")
        try:
            outcome = await run_attempt(
                request, _StoreSink(self, task.id, fence), control, on_spawn
            )
            if outcome.kind is not OutcomeKind.LEASE_LOST:
                try:
                    claimed = await self._finish(task.id, fence, outcome)
                except LeaseLost as exc:
                    self._telemetry.note(
                        logging.WARNING,
                        "result_refused",
                        "task %s: result not recorded: %s",
                        task.id,
                        exc,
                        task_id=task.id,
                        fence=fence,
                    )
            finished = True
        finally:
            self._telemetry.attempt_ended(task, outcome, anyio.current_time() - started)
            if not finished:
                self._interrupted[task.id] = fence
            del self._runners[task.id, fence]
            self._idle.set()
            if not claimed:  # the slot is free and nobody looked for work for it yet
                self._wake.set()
            self._task_changed()

    async def _finish(self, task_id: int, fence: int, outcome: Outcome) -> bool:
        """Write the outcome; unless shutting down, claim for the freed slot in the same
        transaction (no round trip through the claim loop on the hot path). True if it
        claimed."""
        if self._closing:
            await self._with_store(lambda: self.store.finish(task_id, fence, outcome))
            return False
        claims = await self._with_store(
            lambda: self.store.finish_and_claim(
                task_id,
                fence,
                outcome,
                node_id=self.node_id,
                limits=self.limits,
                lease_ttl_s=self.lease_ttl_s,
            )
        )
        self._start(claims)
        return True

    async def _with_store(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run a store call, riding out outages up to the configured tolerance."""
        deadline: float | None = None
        delay = 0.05
        while True:
            try:
                return await call()
            except StoreUnavailable as exc:
                now = anyio.current_time()
                self._telemetry.store_retry(exc, first=deadline is None)
                if deadline is None:
                    deadline = now + self.store_outage_tolerance_s
                if now >= deadline:
                    raise
                await anyio.sleep(min(delay, deadline - now))
                delay = min(delay * 2, 1.0)

    def _work_arrived(self) -> None:
        self._wake.set()
        self._task_changed()  # a waiter may be waiting on another node's work too

    def _task_changed(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _output_changed(self) -> None:
        self._new_output.set()
        self._new_output = anyio.Event()

    # -- public API ----------------------------------------------------------
    def _check_open(self) -> None:
        if self._tg is None or self._closing:
            raise PoolClosed("the pool is not running")

    async def submit(self, argv: Sequence[str], **options: Any) -> int:
        """Store a task and return its id; it is durable when this returns.

        Options are those of `TaskSpec.build`: cwd, env, project, template,
        template_parallel, locks, priority, not_before, timeout_s,
        stall_timeout_s, max_attempts, retry_backoff_s. Bad input raises
        `InvalidTask` and stores nothing.
        """
        return await self.submit_spec(TaskSpec.build(argv, **options))

    async def submit_spec(self, spec: TaskSpec) -> int:
        """Store a prepared `TaskSpec` and return its id."""
        self._check_open()
        task_id = await self.store.submit(spec)
        self._wake.set()
        return task_id

    async def cancel(self, task_id: int, *, force: bool = False) -> TaskInfo:
        """Cancel a task: a waiting one at once; a running one with SIGTERM, a grace
        period and SIGKILL (`force=True`: SIGKILL at once). Returns the task's state
        after the request; `wait` tells when a running one has ended."""
        info = await self.store.request_cancel(task_id, force=force)
        control = self._runners.get((task_id, info.fence))
        if control is not None and info.status is Status.RUNNING:
            control.stop(StopKind.CANCELLED, "cancelled by request", force=force)
        self._task_changed()
        return info

    async def get(self, task_id: int) -> TaskInfo:
        """The task's current state (`TaskNotFound` if there is none)."""
        return await self.store.get(task_id)

    async def list_tasks(
        self,
        *,
        statuses: Sequence[Status] | None = None,
        project: str | None = None,
        limit: int = 100,
    ) -> list[TaskInfo]:
        """Tasks, newest first."""
        return await self.store.list_tasks(statuses=statuses, project=project, limit=limit)

    async def events(self, task_id: int) -> list[TaskEvent]:
        """The task's recorded transitions, each with its reason."""
        return await self.store.events(task_id)

    async def wait(self, task_id: int, *, timeout_s: float | None = None) -> TaskInfo:
        """Wait until the task is terminal and return it (`TimeoutError` after `timeout_s`)."""
        with anyio.fail_after(timeout_s if timeout_s is not None else math.inf):
            while True:
                changed = self._changed
                info = await self.store.get(task_id)
                if info.is_terminal:
                    return info
                with anyio.move_on_after(self.poll_interval_s):
                    await changed.wait()

    async def output(self, task_id: int) -> str:
        """Everything the task has printed so far, across attempts."""
        return "".join([chunk async for chunk in self._chunks(task_id, follow=False)])

    async def follow(self, task_id: int) -> AsyncIterator[str]:
        """Yield the task's output as it arrives, until the task is terminal."""
        async for text in self._chunks(task_id, follow=True):
            yield text

    async def _chunks(self, task_id: int, *, follow: bool) -> AsyncIterator[str]:
        cursor = (0, 0)
        while True:
            new_output = self._new_output
            done = follow and (await self.store.get(task_id)).is_terminal
            chunks = await self.store.read_output(task_id, after=cursor)
            for chunk in chunks:
                yield chunk.text
            if chunks:
                cursor = (chunks[-1].fence, chunks[-1].seq)
                continue
            if not follow or done:
                return
            with anyio.move_on_after(self.poll_interval_s):
                await new_output.wait()


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _is_cancel(exc: BaseException) -> bool:
    return isinstance(exc, anyio.get_cancelled_exc_class())
