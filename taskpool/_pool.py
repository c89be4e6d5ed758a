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

import contextlib
import dataclasses
import functools
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup

from . import _containment, _procs
from ._client import Client, StaleReport
from ._containment import Box, CgroupBox, Containment
from ._errors import LeaseLost, PoolClosed, PoolCrashed, StoreUnavailable
from ._explain import WaitReason
from ._guard import Guard, GuardError
from ._models import (
    CancelMode,
    Claim,
    Limits,
    NodeInfo,
    Outcome,
    OutcomeKind,
    ResourceLimits,
    Status,
    TaskEvent,
    TaskInfo,
    TaskSpec,
)
from ._runner import RunnerControl, RunRequest, StopKind, run_attempt
from ._store import Orphan, Store
from ._telemetry import Metrics, Telemetry
from .stores import node_connections, open_store

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


class _GuardWatch:
    """Hands one attempt to the node's guard (the runner's `AttemptWatcher`)."""

    def __init__(self, pool: TaskPool, key: tuple[int, int], marker: str, box: Box) -> None:
        self._pool = pool
        self._key = key
        self._marker = marker
        # A cgroup box lives in the node's cgroup, which the guard watches whole.
        self._in_node_cgroup = isinstance(box, CgroupBox)
        self._started_at = time.monotonic()

    def started(self, pid: int) -> None:
        pool = self._pool
        if self._in_node_cgroup:
            return
        pool._guarded[self._key] = (self._marker, pid, None)
        if pool._guard is not None:
            pool._guard.watch(
                self._marker,
                leader_pid=pid,
                deadline=pool._guard_deadline(self._key),
            )

    def exited(self) -> str | None:
        pool = self._pool
        if self._in_node_cgroup:
            if pool._node_kill_since(self._started_at) is None:
                return None
            return (
                "stopped at lease expiry by the node's guard (no renewal came in time:"
                " it killed the node's cgroup)"
            )
        pool._guarded.pop(self._key, None)
        kill = pool._guard.forget(self._marker) if pool._guard is not None else None
        if kill is None:
            return None
        return (
            f"stopped at lease expiry by the node's guard ({kill.why}; {', '.join(kill.targets)})"
        )


class TaskPool:
    """A pool of subprocess runners embedded in the caller's event loop.

    Use it as `async with TaskPool("tasks.db") as pool:`. Leaving the context
    shuts down gracefully: no new claims, running tasks get `shutdown_drain_s`
    to finish, then are stopped (SIGTERM, `kill_grace_s`, SIGKILL) and put back
    to waiting without using up an attempt, for the next pool to resume.

    `store` is a `Store`, a `postgresql://` URL (the multi-node store), or a path
    to an SQLite file (created if missing). **Ownership**: a store the pool opens
    from a URL or path is the pool's (closed when the context ends, sized with a
    connection per running task plus the pool's own); a `Store` object passed in is
    the caller's: the pool opens it if needed but never closes it (`owns_store`).

    The pool also offers the whole client API (`submit`, `submit_many`, `get`,
    `list_tasks`, `events`, `output`, `follow`, `wait`, `cancel`, `retry`, `nodes`,
    `stale`) by delegating to a `Client` of its own over the same store, woken by the
    pool's own events; a submit also wakes the claim loop, and a cancel stops a task
    this pool runs at once. A process that only submits and watches needs a
    `Client`, not a pool.
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
        store_call_timeout_s: float | None = None,
        containment: str = "auto",
        cgroup_mount: str | os.PathLike[str] | None = None,
        guard: bool = True,
        default_limits: ResourceLimits | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if max_parallel < 1:
            raise ValueError("max_parallel must be >= 1")
        # Ownership is the caller's choice, not the pool's guess: a store it opens from a
        # path or URL is its own (closed on leaving); a Store object stays the caller's.
        if isinstance(store, Store):
            self.store, self._owns_store = store, False
        else:
            self.store = open_store(store, connections=node_connections(max_parallel))
            self._owns_store = True
        # The client API (`submit`, `wait`, `follow`, ...) this pool offers, over its store.
        self._client = Client(self.store, poll_interval_s=poll_interval_s, watch=False)
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
        # A call that has not answered by then counts as an outage (it is retried).
        self.store_call_timeout_s = store_call_timeout_s or min(10.0, lease_ttl_s / 3)
        if store_outage_tolerance_s > lease_ttl_s:
            # Allowed (the node rides out the outage), but running tasks cannot: say so.
            logging.getLogger("taskpool").warning(
                "store_outage_tolerance_s (%g s) is longer than lease_ttl_s (%g s): during"
                " an outage longer than the lease, running tasks are stopped before their"
                " lease runs out and handed back; the node itself survives up to the"
                " tolerance. A longer lease lets tasks ride out longer outages.",
                store_outage_tolerance_s,
                lease_ttl_s,
            )
        self.metrics = metrics
        self.containment_mode = containment
        self.cgroup_mount = cgroup_mount
        self.default_limits = default_limits or ResourceLimits()
        #: Chosen at start: a cgroup per attempt where possible, else process groups.
        self.containment: Containment | None = None
        self.use_guard = guard
        # The node's guard process (see _guard.py): kills attempts whose lease ran out
        # when this process cannot (frozen, dead). What it watches, to watch it again
        # should it have to be restarted: attempt key -> (marker, leader pid, cgroup).
        self._guard: Guard | None = None
        self._guard_note = "off"
        self._guarded: dict[tuple[int, int], tuple[str, int, str | None]] = {}
        self._node_killed_at: float | None = None  # the guard killed the node's cgroup
        self._node_deadline_sent: float | None = None  # the guard's deadline for the node
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
        self._closing = False
        self._claim_loop_ended = anyio.Event()
        # Leases the last renewal said this node holds but no runner runs (task id ->
        # fence): a claim whose result never reached the pool. Handed back when seen
        # twice in a row, so a claim still on its way is never mistaken for one.
        self._strays: dict[int, int] = {}
        # When each running attempt's lease surely runs out, on the system's monotonic
        # clock (time.monotonic(), which the guard process shares): (time its claim or
        # last renewal was *sent*) + TTL. The store's expiry is computed when the
        # request arrives, so it is never earlier than this.
        self._lease_deadlines: dict[tuple[int, int], float] = {}
        self._hurried = False  # hurry_shutdown was called: no drain, no grace

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
                project_limits=dict(self.limits.project_limits),
            )
            self.containment = _containment.choose(
                self.store.store_id,
                self.node.id,
                mode=self.containment_mode,
                cgroup_mount=self.cgroup_mount,
            )
            await self._start_guard()
            self.node = dataclasses.replace(self.node, containment=self._containment_text())
            self._telemetry = Telemetry(self.node.id, self.metrics)
            await self.store.register_node(self.node)
            # Recovery before work: nothing is claimed until predecessors are settled.
            await self._reconcile_predecessors()
            self._tg = anyio.create_task_group()
            await self._tg.__aenter__()
        except BaseException:
            with anyio.CancelScope(shield=True):
                if self._guard is not None:
                    await self._guard.close()
                if self._owns_store:
                    await self.store.close()
            raise
        self._tg.start_soon(self._run_services, name="taskpool services")
        self._telemetry.node_started(self._containment_text(), self.containment.mode)
        return self

    def _containment_text(self) -> str:
        assert self.containment is not None
        return f"{self.containment.describe()}; guard: {self._guard_note}"

    async def _start_guard(self) -> None:
        """Start the node's guard process, or say why there is none (never silently)."""
        if not self.use_guard:
            self._guard_note = "off (disabled)"
            return
        try:
            self._guard = await Guard.start()
        except GuardError as exc:
            self._guard, self._guard_note = None, f"off (could not start: {exc})"
            return
        self._guard_note = f"process {self._guard.pid}"
        self._node_deadline_sent = None
        self._arm_node_guard(force=True)

    @property
    def _node_guard_key(self) -> str:
        return f"node:{self.node_id}"

    def _arm_node_guard(self, *, force: bool = False) -> None:
        """In cgroup mode the guard watches the node's cgroup, which holds every attempt:
        it kills it whole when the pool dies, or when the earliest lease of the node's
        running attempts runs out unrenewed. So attempts need no message of their own.

        The guard's deadline must never be later than any running attempt's lease: new
        claims only bring later ones, so it is moved when a renewal comes (`force`), and
        moved later when attempts end only if it would otherwise fire before the next
        renewal (the attempts it was set for were stopped: an outage, a pause), lest it
        kill the node's fresh attempts. A watch the guard acted on is gone: each new one
        first collects the kill it may have reported."""
        guard, containment = self._guard, self.containment
        if guard is None or containment is None or containment.node_cgroup is None:
            return
        now = time.monotonic()
        running = [d for key, d in self._lease_deadlines.items() if key in self._runners]
        deadline = (min(running) if running else now + self.lease_ttl_s) - (
            self.self_fence_margin_s / 2
        )
        sent = self._node_deadline_sent
        if (
            not force
            and sent is not None
            and sent <= deadline
            and sent - now > self.heartbeat_interval_s
        ):
            return  # earlier than needed but far off: the next renewal moves it
        kill = guard.forget(self._node_guard_key)
        if kill is not None:
            self._node_killed_at = kill.at
        guard.watch(
            self._node_guard_key,
            leader_pid=None,
            cgroup=str(containment.node_cgroup),
            deadline=deadline,
        )
        self._node_deadline_sent = deadline

    def _node_kill_since(self, started_at: float) -> float | None:
        """When the guard killed the node's cgroup, if it did after `started_at`."""
        if self._guard is not None:
            kill = self._guard.killed().get(self._node_guard_key)
            if kill is not None:
                self._node_killed_at = kill.at
        at = self._node_killed_at
        return at if at is not None and at >= started_at else None

    async def _check_guard(self) -> None:
        """A dead guard kills nothing: start a new one and hand it every running attempt."""
        if self._guard is None or self._guard.alive:
            return
        self._telemetry.note(
            logging.WARNING, "guard_restarted", "the guard process died: starting a new one"
        )
        await self._guard.close()
        await self._start_guard()
        guard = self._guard
        if guard is None:
            return
        for key, (marker, pid, cgroup) in list(self._guarded.items()):
            guard.watch(marker, leader_pid=pid, cgroup=cgroup, deadline=self._guard_deadline(key))

    def _guard_deadline(self, key: tuple[int, int]) -> float:
        """The guard acts after the pool's own self-fencing would, before the lease ends."""
        return self._lease_deadlines.get(key, time.monotonic()) - self.self_fence_margin_s / 2

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
        if self._guard is not None:
            self._guard.forget(self._node_guard_key)  # empty: every runner has ended
            await self._guard.close()  # shielded and bounded
        if self.containment is not None:
            self.containment.close()
        if failure is not None:
            self._telemetry.crashed(failure)
            raise PoolCrashed(f"taskpool node {self.node.id} crashed: {failure!r}") from failure
        return exc is None and exc_type is not None

    def hurry_shutdown(self) -> None:
        """Make the shutdown under way (or the next one) skip the drain and the grace
        period: every running task's process group gets SIGKILL at once, and the task
        goes back to waiting without using an attempt, as in any shutdown. It hurries the
        shutdown, never skips it: leaving the context still waits for every runner.
        Idempotent. The CLI worker calls it on a second SIGINT/SIGTERM."""
        self._hurried = True
        if not self._closing:
            return  # still running: the flag alone makes leaving the context hurry
        for control in list(self._runners.values()):
            # Escalates a graceful stop in progress (its reason kept), or stops at once.
            control.stop(StopKind.SHUTDOWN, f"{self._shutdown_reason()} (hurried)", force=True)

    async def _shutdown(self, *, drain: bool) -> None:
        # The claim loop ends by itself: a claim in flight runs to its end and what it
        # committed is started and handed straight back (see `_start`). Cancelling it
        # instead could lose a claim that committed after the pool stopped listening.
        self._wake.set()
        await self._claim_loop_ended.wait()
        if drain and not self._hurried and self._runners:
            with anyio.move_on_after(self.shutdown_drain_s):
                await self._wait_idle()
        assert self.node is not None
        for control in list(self._runners.values()):
            control.stop(StopKind.SHUTDOWN, self._shutdown_reason(), force=self._hurried)
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
                tg.start_soon(self._lease_guard_loop, name="taskpool lease guard")
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
                _procs.Leftover(
                    o.pid,
                    o.pid_started_at,
                    _procs.attempt_marker(self.store.store_id, o.task_id, o.fence),
                )
                for o in orphans
            ]
            # Off the event loop: exactly by cgroup where the attempt had one, else one
            # scan of the process table for all the others.
            killed = await anyio.to_thread.run_sync(
                _reclaim, self.containment, node.id, orphans, leftovers
            )
            for orphan, leftover in zip(orphans, leftovers, strict=True):
                kills = killed[leftover.marker]
                found = f"killed leftover {', '.join(kills)}" if kills else "no process was left"
                reason = f"owner node {node.id} (pid {node.pid}) died; {how_found}; {found}"
                info = await self.store.settle_orphan(orphan.task_id, orphan.fence, reason)
                self._telemetry.settled(info, "reconciled")
            if self.containment is not None:
                self.containment.forget_node(node.id)
            await self.store.stop_node(node.id, f"{how_found}: its process is gone")

    # -- the loops ---------------------------------------------------------
    async def _claim_loop(self) -> None:
        assert self._tg is not None
        assert self.node is not None
        try:
            while not self._closing:
                self._wake = anyio.Event()
                if len(self._runners) < self.limits.max_parallel:
                    try:
                        claims, asked_at = await self._sent_at(
                            lambda: self.store.claim(self.node_id, self.limits, self.lease_ttl_s),
                            retry_while_closing=False,
                        )
                    except StoreUnavailable:
                        if self._closing:
                            break  # nothing claimed that stop_node will not hand back
                        raise
                    self._start(claims, asked_at)
                with anyio.move_on_after(self.poll_interval_s):
                    await self._wake.wait()
        finally:
            self._claim_loop_ended.set()

    def _start(self, claims: Sequence[Claim], asked_at: float) -> None:
        """Start a runner for each claim. Called at once when a claim returns, with no
        checkpoint between: whatever the store committed is either run or handed back."""
        assert self._tg is not None
        stopping = self._closing or self._tg.cancel_scope.cancel_called
        for claim in claims:
            control = RunnerControl()
            if stopping:  # claimed while shutdown began: hand it straight back
                control.stop(StopKind.SHUTDOWN, self._shutdown_reason())
            self._runners[claim.task.id, claim.fence] = control
            self._lease_deadlines[claim.task.id, claim.fence] = asked_at + self.lease_ttl_s
            self._tg.start_soon(self._run, claim, name=f"taskpool task {claim.task.id}")
        if claims:
            self._arm_node_guard()

    def _shutdown_reason(self) -> str:
        return f"interrupted: node {self.node_id} shut down"

    async def _heartbeat_loop(self) -> None:
        while True:
            await anyio.sleep(self.heartbeat_interval_s)
            # A store whose file was deleted or replaced raises a fatal StoreError here,
            # before anything is renewed in it: the pool crashes rather than split.
            await self._with_store(self.store.check_identity)
            await self._check_guard()
            before = dict(self._runners)  # only runners whose claim committed before the renewal
            renewal, asked_at = await self._sent_at(
                lambda: self.store.renew_leases(self.node_id, self.lease_ttl_s)
            )
            await self._hand_back_strays(renewal.held)
            renewed: list[tuple[int, int]] = []
            for (task_id, fence), control in before.items():
                key = (task_id, fence)
                if renewal.held.get(task_id) != fence:
                    if self._lease_deadlines.get(key, math.inf) <= time.monotonic():
                        # Not renewed because it ran out while the store was unreachable
                        # (or this process was paused): ours unless rescued; hand it back.
                        control.stop(StopKind.SELF_FENCED, self._self_fence_reason(), force=True)
                    else:
                        control.stop(
                            StopKind.LEASE_LOST,
                            "lease lost: another node owns the task",
                            force=True,
                        )
                    continue
                if key in self._lease_deadlines:
                    self._lease_deadlines[key] = asked_at + self.lease_ttl_s
                    renewed.append(key)
                if task_id in renewal.cancel_requests:
                    force = renewal.cancel_requests[task_id] == "force"
                    control.stop(StopKind.CANCELLED, "cancelled by request", force=force)
            self._arm_node_guard(force=True)
            if self._guard is not None:  # only leases the store has just granted
                self._guard.renew(
                    {
                        self._guarded[key][0]: self._guard_deadline(key)
                        for key in renewed
                        if key in self._guarded
                    }
                )

    async def _hand_back_strays(self, held: Mapping[int, int]) -> None:
        """Hand back leases this node holds but runs nothing for, seen at two renewals in
        a row: a claim that committed after its call gave up (a timeout, a lost reply).
        Without this the heartbeat would renew them forever and block their template."""
        running = set(self._runners)
        strays = {t: f for t, f in held.items() if (t, f) not in running}
        confirmed = {t: f for t, f in strays.items() if self._strays.get(t) == f}
        self._strays = {t: f for t, f in strays.items() if t not in confirmed}
        outcome = Outcome(
            OutcomeKind.SHUTDOWN,
            f"handed back without using an attempt: node {self.node_id} held the lease"
            " but never started the task",
        )
        for task_id, fence in confirmed.items():
            with contextlib.suppress(LeaseLost):  # settled by someone else meanwhile
                info = await self._with_store(
                    functools.partial(self.store.finish, task_id, fence, outcome)
                )
                self._telemetry.settled(info, "handed_back")
            self._wake.set()

    @property
    def self_fence_margin_s(self) -> float:
        """How long before its lease runs out an attempt that could not be renewed is
        stopped: room for a late wake-up of this loop and for the kill itself."""
        return max(0.5, self.lease_ttl_s / 10)

    def _self_fence_reason(self) -> str:
        return (
            f"self-fenced: node {self.node_id} could not renew the lease for"
            f" {self.lease_ttl_s - self.self_fence_margin_s:g} s and stopped the attempt"
            " before it ran out, so that no copy started elsewhere overlaps it"
        )

    async def _lease_guard_loop(self) -> None:
        """Stop every attempt whose lease could not be renewed, before it runs out.

        A rescue happens only after expiry (on the database's clock, which is never
        ahead of our deadline): so a copy started by a rescuer never overlaps one of
        ours, whether the store is down, the network is cut or silent. The stopped
        attempt is handed back without using an attempt once the store answers."""
        while True:
            now = time.monotonic()
            margin = self.self_fence_margin_s
            wake_at = now + self.heartbeat_interval_s  # new leases run out later than this
            for key, deadline in list(self._lease_deadlines.items()):
                control = self._runners.get(key)
                if control is None or control.forced:
                    continue
                if deadline - margin <= now:
                    control.stop(StopKind.SELF_FENCED, self._self_fence_reason(), force=True)
                else:
                    wake_at = min(wake_at, deadline - margin)
            await anyio.sleep(max(wake_at - time.monotonic(), 0.01))

    async def _reaper_loop(self) -> None:
        while True:
            await self._with_store(self._reconcile_predecessors)
            # Never its own running attempts: their runners stop them before their
            # lease runs out and hand them back (see `_lease_guard_loop`).
            rescued = await self._with_store(
                lambda: self.store.rescue_expired(except_attempts=set(self._runners))
            )
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
        assert self.containment is not None

        async def on_spawn(pid: int, started_at: float) -> None:
            await self._with_store(lambda: self.store.record_spawn(task.id, fence, pid, started_at))

        finished = claimed = False
        started = anyio.current_time()
        self._telemetry.attempt_started(task)
        outcome = Outcome(OutcomeKind.SHUTDOWN, "interrupted: the pool stopped its task group")
        box = None
        try:
            try:
                limits = spec.limits.over(self.default_limits)
                box = self.containment.box(f"{task.id}.{fence}", limits)
            except OSError as exc:
                outcome = Outcome(
                    OutcomeKind.SPAWN_FAILED, f"could not make the attempt's cgroup: {exc}"
                )
            else:
                marker = _procs.attempt_marker(self.store.store_id, task.id, fence)
                request = RunRequest(
                    argv=spec.argv,
                    cwd=spec.cwd,
                    env=spec.env,
                    pass_env=spec.pass_env,
                    inherit_env=spec.inherit_env,
                    marker=marker,
                    timeout_s=spec.timeout_s,
                    stall_timeout_s=spec.stall_timeout_s,
                    kill_grace_s=self.kill_grace_s,
                    max_log_bytes=self.max_log_bytes,
                    box=box,
                    watcher=_GuardWatch(self, (task.id, fence), marker, box),
                )
                outcome = await run_attempt(
                    request, _StoreSink(self, task.id, fence), control, on_spawn
                )
            if outcome.kind is not OutcomeKind.LEASE_LOST:
                try:
                    claimed = await self._finish(task.id, fence, outcome)
                except LeaseLost as exc:
                    # Reported as what it is, not as the exit the runner saw.
                    outcome = Outcome(
                        OutcomeKind.LEASE_LOST,
                        f"result refused ({exc}); the attempt had {outcome.reason}",
                        outcome.exit_code,
                    )
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
            if box is not None:
                box.remove()  # empty by now: the runner waited for it
            self._telemetry.attempt_ended(task, outcome, anyio.current_time() - started)
            if not finished:
                self._interrupted[task.id] = fence
            del self._runners[task.id, fence]
            self._lease_deadlines.pop((task.id, fence), None)
            self._arm_node_guard()
            self._idle.set()
            if not claimed:  # the slot is free and nobody looked for work for it yet
                self._wake.set()
            self._task_changed()

    async def _finish(self, task_id: int, fence: int, outcome: Outcome) -> bool:
        """Write the outcome; unless shutting down, claim for the freed slot in the same
        transaction (no round trip through the claim loop on the hot path). True if it
        claimed."""
        if self._closing or outcome.kind is OutcomeKind.SELF_FENCED:
            # A self-fenced node is in trouble with its store: no new work until it renews.
            await self._with_store(lambda: self.store.finish(task_id, fence, outcome))
            return False
        claims, asked_at = await self._sent_at(
            lambda: self.store.finish_and_claim(
                task_id,
                fence,
                outcome,
                node_id=self.node_id,
                limits=self.limits,
                lease_ttl_s=self.lease_ttl_s,
            )
        )
        self._start(claims, asked_at)
        return True

    async def _sent_at(
        self, call: Callable[[], Awaitable[T]], *, retry_while_closing: bool = True
    ) -> tuple[T, float]:
        """`_with_store`, and when the call that succeeded was sent (time.monotonic()): a
        lease it grants or renews runs from then, not from a first try that an outage
        made fail (that would stop a fresh attempt at once)."""
        sent = time.monotonic()

        async def timed() -> T:
            nonlocal sent
            sent = time.monotonic()
            return await call()

        result = await self._with_store(timed, retry_while_closing=retry_while_closing)
        return result, sent

    async def _with_store(
        self, call: Callable[[], Awaitable[T]], *, retry_while_closing: bool = True
    ) -> T:
        """Run a store call, riding out outages up to the configured tolerance (or not at
        all once the pool is closing, unless `retry_while_closing`).

        Each call is shielded from cancellation: what it commits reaches the pool,
        which runs it or hands it back (a claim cancelled mid-flight could commit
        unseen and leave its task running under nobody). It is bounded instead by
        `store_call_timeout_s`, so a silent network counts as an outage."""
        deadline: float | None = None
        delay = 0.05
        while True:
            try:
                with anyio.CancelScope(shield=True):
                    try:
                        with anyio.fail_after(self.store_call_timeout_s):
                            return await call()
                    except TimeoutError as exc:
                        raise StoreUnavailable(
                            f"store call timed out after {self.store_call_timeout_s:g} s"
                        ) from exc
            except StoreUnavailable as exc:
                now = anyio.current_time()
                self._telemetry.store_retry(exc, first=deadline is None)
                if deadline is None:
                    deadline = now + self.store_outage_tolerance_s
                if now >= deadline or (self._closing and not retry_while_closing):
                    raise
                await anyio.sleep(min(delay, deadline - now))
                delay = min(delay * 2, 1.0)

    def _work_arrived(self) -> None:
        self._wake.set()
        self._task_changed()  # a waiter may be waiting on another node's work too

    def _task_changed(self) -> None:
        self._client.notify_changed()

    def _output_changed(self) -> None:
        self._client.notify_output()

    # -- public API: the client's, for embedded use ---------------------------
    @property
    def owns_store(self) -> bool:
        """True if the pool opened its store from a URL or path, and so closes it."""
        return self._owns_store

    def _check_open(self) -> None:
        if self._tg is None or self._closing:
            raise PoolClosed("the pool is not running")

    async def submit(self, argv: Sequence[str], **options: Any) -> int:
        """`Client.submit`, waking this pool's claim loop; `PoolClosed` if it is not
        running (a `Client` submits with no pool at all)."""
        return await self.submit_spec(TaskSpec.build(argv, **options))

    async def submit_spec(self, spec: TaskSpec) -> int:
        """`Client.submit_spec`, waking this pool's claim loop."""
        self._check_open()
        task_id = await self._client.submit_spec(spec)
        self._wake.set()
        return task_id

    async def submit_many(self, specs: Iterable[TaskSpec]) -> list[int]:
        """`Client.submit_many` (one transaction, all or nothing), waking the claim loop."""
        self._check_open()
        task_ids = await self._client.submit_many(specs)
        self._wake.set()
        return task_ids

    async def retry(self, task_id: int) -> int:
        """`Client.retry`, waking this pool's claim loop."""
        self._check_open()
        task_id = await self._client.retry(task_id)
        self._wake.set()
        return task_id

    async def cancel(
        self, task_id: int, mode: CancelMode | str = CancelMode.GRACEFUL, *, force: bool = False
    ) -> TaskInfo:
        """`Client.cancel`; a task this pool runs is stopped at once, not at the next
        heartbeat."""
        info = await self._client.cancel(task_id, mode, force=force)
        control = self._runners.get((task_id, info.fence))
        if control is not None and info.status is Status.RUNNING:
            forced = info.cancel_requested is CancelMode.FORCE
            control.stop(StopKind.CANCELLED, "cancelled by request", force=forced)
        return info

    async def get(self, task_id: int) -> TaskInfo:
        """`Client.get`: the task's current state (`TaskNotFound` if there is none)."""
        return await self._client.get(task_id)

    async def list_tasks(
        self,
        *,
        statuses: Sequence[Status] | None = None,
        project: str | None = None,
        limit: int = 100,
    ) -> list[TaskInfo]:
        """`Client.list_tasks`: tasks, newest first."""
        return await self._client.list_tasks(statuses=statuses, project=project, limit=limit)

    async def events(self, task_id: int) -> list[TaskEvent]:
        """`Client.events`: the task's recorded transitions, each with its reason."""
        return await self._client.events(task_id)

    async def nodes(self, *, alive: bool | None = None) -> list[NodeInfo]:
        """`Client.nodes`: pools registered with the store, oldest first."""
        return await self._client.nodes(alive=alive)

    async def stale(self, *, older_than_s: float = 60.0) -> StaleReport:
        """`Client.stale`: expired leases and silent nodes."""
        return await self._client.stale(older_than_s=older_than_s)

    async def why(self, task_id: int) -> list[WaitReason]:
        """`Client.why`: what holds a waiting task (empty: nothing, or not waiting)."""
        return await self._client.why(task_id)

    async def why_many(self, tasks: Iterable[TaskInfo]) -> dict[int, list[WaitReason]]:
        """`Client.why_many`: `why` for several tasks from one read."""
        return await self._client.why_many(tasks)

    async def wait(self, task_id: int, *, timeout_s: float | None = None) -> TaskInfo:
        """`Client.wait`: until the task is terminal (`TimeoutError` after `timeout_s`)."""
        return await self._client.wait(task_id, timeout_s=timeout_s)

    async def output(self, task_id: int) -> str:
        """`Client.output`: everything the task has printed so far, across attempts."""
        return await self._client.output(task_id)

    def follow(self, task_id: int) -> AsyncIterator[str]:
        """`Client.follow`: the task's output as it arrives, until it is terminal."""
        return self._client.follow(task_id)


def _reclaim(
    containment: Containment | None,
    node_id: str,
    orphans: Sequence[Orphan],
    leftovers: Sequence[_procs.Leftover],
) -> dict[str, list[str]]:
    """Kill what orphaned attempts left: their cgroup where it exists (exact, no scan of
    the process table), else by recorded pid, start time and marker. Per marker, what
    was killed."""
    report: dict[str, list[str]] = {}
    rest = []
    for orphan, leftover in zip(orphans, leftovers, strict=True):
        name = f"{orphan.task_id}.{orphan.fence}"
        pids = None if containment is None else containment.reclaim(node_id, name)
        if pids is None:
            rest.append(leftover)
        elif pids:
            listed = ", ".join(map(str, pids))
            many = "processes" if len(pids) > 1 else "process"
            report[leftover.marker] = [f"cgroup of attempt {name} ({len(pids)} {many}: {listed})"]
        else:
            report[leftover.marker] = []
    report.update(_procs.kill_leftovers(rest))
    return report


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _is_cancel(exc: BaseException) -> bool:
    return isinstance(exc, anyio.get_cancelled_exc_class())
