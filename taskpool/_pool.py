"""TaskPool: the anyio task group that ties store, rules and runners together.

Shape of a running pool (every task below lives in one task group, so nothing
outlives `async with TaskPool(...)`):

- the claim loop asks the store for attempts the blocking rules allow and starts
  one runner per attempt (_runners.py), which spawns its process group, streams
  its output to the store and writes its terminal status, on every path;
- the heartbeat renews every lease of this node in one write and stops runners
  whose lease was lost or whose task an operator cancelled from elsewhere; the
  lease guard stops those it could not renew before their lease runs out (both
  decided in _leases.py, which also keeps the node's guard process);
- the reaper settles what dead pools on this host left and re-queues (or marks
  lost) attempts of nodes that stopped heartbeating (_recovery.py).

Every store call rides out outages up to a tolerance (_store_calls.py). An
exception in any task cancels the group: runners kill their process groups
(shielded), and the pool's context raises `PoolCrashed`. The client API the pool
offers is delegated to a `Client` of its own (_pool_client.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from types import TracebackType

import anyio
from anyio.abc import TaskGroup

from . import _containment, _procs
from ._attempt import AttemptSetup
from ._cancels import CancelWatcher
from ._client import Client
from ._containment import Containment
from ._crash import crash_cause
from ._errors import PoolClosed, PoolCrashed, StoreUnavailable
from ._leases import (
    LeaseBook,
    NodeGuard,
    act_on_renewal,
    fence_before_expiry,
    judge_renewal,
    self_fence_reason,
)
from ._models import CancelMode, Claim, Limits, NodeInfo, ResourceLimits, TaskInfo
from ._pool_client import PoolClientAPI
from ._recovery import (
    Strays,
    hand_back_strays,
    reconcile_predecessors,
    release_and_stop,
    rescue_expired,
)
from ._retention import DEFAULT_INTERVAL_S, DEFAULT_RETENTION, Retention, keep_pruning
from ._rules import check_fair_share
from ._runners import Runners, RunnerSetup
from ._scheduler import run_scheduler
from ._store import Store, Wake
from ._store_calls import StoreCalls
from ._telemetry import Metrics, Telemetry
from .stores import node_connections, open_store

#: At most how long a node woken by its store waits, at random, before it claims, while
#: other nodes share the store (see `_claim_loop`).
WAKE_JITTER_S = 0.004


class TaskPool(PoolClientAPI):
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
    `fair_share` (None: off) hands this node's free slots across projects instead
    of in queue order: each to the project with the fewest running tasks (on every
    node) per weight, so a project with a deep queue cannot starve another; True
    weighs every project 1, a mapping gives weights (finite, above 0; a project not
    listed weighs 1). Within a project, queue order still holds.
    A store that stays unavailable for longer than `store_outage_tolerance_s`
    crashes the pool (its children are killed and `PoolCrashed` is raised).
    `retention` prunes finished tasks every `retention_interval_s` (default: kept 30
    days, checked hourly; None keeps everything): see `Retention`.
    Every `schedule_interval_s` the pool fires the store's due schedules (None: never;
    see `Client.add_schedule`).
    """

    def __init__(
        self,
        store: Store | str | os.PathLike[str],
        *,
        max_parallel: int = 4,
        project_limits: Mapping[str, int] | None = None,
        fair_share: bool | Mapping[str, float] | None = None,
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
        retention: Retention | None = DEFAULT_RETENTION,
        retention_interval_s: float = DEFAULT_INTERVAL_S,
        schedule_interval_s: float | None = 1.0,
    ) -> None:
        if max_parallel < 1:
            raise ValueError("max_parallel must be >= 1")
        weights = check_fair_share(fair_share)  # before a store is opened
        # Ownership is the caller's choice, not the pool's guess: a store it opens from a
        # path or URL is its own (closed on leaving); a Store object stays the caller's.
        if isinstance(store, Store):
            self.store, self._owns_store = store, False
        else:
            self.store = open_store(
                store, connections=node_connections(max_parallel), lease_connection=True
            )
            self._owns_store = True
        # The client API (`submit`, `wait`, `follow`, ...) this pool offers, over its store.
        self._client = Client(self.store, poll_interval_s=poll_interval_s, watch=False)
        self.limits = Limits(max_parallel, dict(project_limits or {}), weights)
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
        # Finished tasks pruned in the background (_retention.py); None keeps everything.
        self.retention, self.retention_interval_s = retention, retention_interval_s
        self.schedule_interval_s = schedule_interval_s  # None: this node fires no schedules
        if not retention_interval_s > 0:
            raise ValueError("retention_interval_s must be > 0")
        self.containment_mode = containment
        self.cgroup_mount = cgroup_mount
        self.default_limits = default_limits or ResourceLimits()
        #: Chosen at start: a cgroup per attempt where possible, else process groups.
        self.containment: Containment | None = None
        self.use_guard = guard
        # The node's guard process (see _leases.NodeGuard), set up at start.
        self._guard: NodeGuard | None = None
        self._telemetry = Telemetry("-", metrics)  # named after the node at start
        # Every store call of the pool's own goes through this (outages, timeouts).
        self._with_store = StoreCalls(
            timeout_s=self.store_call_timeout_s,
            tolerance_s=store_outage_tolerance_s,
            telemetry=self._telemetry,
            closing=lambda: self._closing,
        )
        self.node: NodeInfo | None = None
        self._tg: TaskGroup | None = None
        # Created here, not in the services task: shutdown may cancel it before that task runs.
        self._services = anyio.CancelScope()
        self._wake = anyio.Event()
        self._store_woke = False  # the last wake came from the store's notification
        self._has_peers = False  # other live nodes share the store (see `_peers_loop`)
        self._closing = False
        self._claim_loop_ended = anyio.Event()
        # Leases held but run by no runner: a claim whose result never reached the pool.
        self._strays = Strays()
        # When each running attempt's lease surely runs out, kept by the runners.
        self._leases = LeaseBook(lease_ttl_s)
        self._runners = Runners(self._leases)  # the attempts this node runs
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
                fair_share=self.limits.fair_share,
            )
            self.containment = _containment.choose(
                self.store.store_id,
                self.node.id,
                mode=self.containment_mode,
                cgroup_mount=self.cgroup_mount,
            )
            self._telemetry.node_id = self.node.id
            self._guard = NodeGuard(
                self.containment,
                self.node.id,
                self._leases,
                renew_every_s=self.heartbeat_interval_s,
                telemetry=self._telemetry,
            )
            await self._guard.start(enabled=self.use_guard)
            attempt_setup = AttemptSetup(
                store=self.store,
                calls=self._with_store,
                containment=self.containment,
                guard=self._guard,
                default_limits=self.default_limits,
                kill_grace_s=self.kill_grace_s,
                max_log_bytes=self.max_log_bytes,
                output_changed=self._output_changed,
            )
            self.node = dataclasses.replace(self.node, containment=self._containment_text())
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
        self._runners.open(
            RunnerSetup(
                attempt=attempt_setup,
                task_group=self._tg,
                telemetry=self._telemetry,
                node_id=self.node.id,
                limits=self.limits,
                closing=lambda: self._closing,
                slot_freed=lambda: self._wake.set(),  # the claim loop renews `_wake`
                has_peers=lambda: self._has_peers,
                task_changed=self._task_changed,
            )
        )
        self._tg.start_soon(self._run_services, name="taskpool services")
        self._telemetry.node_started(self._containment_text(), self.containment.mode)
        return self

    def _containment_text(self) -> str:
        assert self.containment is not None
        note = self._guard.note if self._guard is not None else "off"
        return f"{self.containment.describe()}; guard: {note}"

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
            failure = crash_cause(raised, exc, anyio.get_cancelled_exc_class())
            if failure is None and exc is None:
                raise  # only cancellations, from an outer scope: not a crash, passed on
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await release_and_stop(
                self.store, self.node.id, self._runners.interrupted, failure, self._telemetry
            )
        if self._owns_store:
            with anyio.CancelScope(shield=True):
                await self.store.close()
        if self._guard is not None:
            self._guard.release_node()  # empty: every runner has ended
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
        self._runners.stop_for_shutdown(force=True, hurried=True)

    async def _shutdown(self, *, drain: bool) -> None:
        # The claim loop ends by itself: a claim in flight runs to its end and what it
        # committed is started and handed straight back (see `_start`). Cancelling it
        # instead could lose a claim that committed after the pool stopped listening.
        self._wake.set()
        await self._claim_loop_ended.wait()
        if drain and not self._hurried and self._runners:
            with anyio.move_on_after(self.shutdown_drain_s):
                await self._runners.wait_all_ended()
        self._runners.stop_for_shutdown(force=self._hurried)
        await self._runners.wait_all_ended()

    async def _run_services(self) -> None:
        with self._services:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._claim_loop, name="taskpool claim loop")
                tg.start_soon(self._heartbeat_loop, name="taskpool heartbeat")
                tg.start_soon(self._reaper_loop, name="taskpool reaper")
                tg.start_soon(self._peers_loop, name="taskpool peers")
                tg.start_soon(self._lease_guard_loop, name="taskpool lease guard")
                tg.start_soon(
                    self.store.watch_for_work, self._work_arrived, name="taskpool work watcher"
                )
                if self.retention is not None:
                    policy, every = self.retention, self.retention_interval_s
                    tg.start_soon(
                        keep_pruning, self.store, policy, every, name="taskpool retention"
                    )
                timeout_s = self.store_call_timeout_s
                cancels = CancelWatcher(
                    self.store, self.node_id, self._runners, read_timeout_s=timeout_s
                )
                tg.start_soon(cancels.run, name="taskpool cancel watcher")
                if self.schedule_interval_s is not None:
                    every, woken = self.schedule_interval_s, lambda: self._work_arrived(Wake.WORK)
                    tg.start_soon(
                        run_scheduler, self.store, every, woken, name="taskpool scheduler"
                    )

    # -- recovery ----------------------------------------------------------
    async def _reconcile_predecessors(self) -> None:
        """`_recovery.reconcile_predecessors` for this node (at boot until the task group runs)."""
        assert self.node is not None
        await reconcile_predecessors(
            self.store, self.containment, self.node, self._telemetry, at_boot=self._tg is None
        )

    # -- the loops ---------------------------------------------------------
    async def _claim_loop(self) -> None:
        assert self._tg is not None
        assert self.node is not None
        try:
            while not self._closing:
                self._wake = anyio.Event()
                if len(self._runners) < self.limits.max_parallel:
                    try:
                        claims, asked_at = await self._with_store.sent_at(
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
                if self._store_woke:
                    self._store_woke = False
                    if self._has_peers:
                        # Every node with a free slot was woken by the same notification:
                        # claiming in a random order, they share what it announced instead
                        # of the one whose connection happens to be read first taking all.
                        await anyio.sleep(random.uniform(0, WAKE_JITTER_S))
        finally:
            self._claim_loop_ended.set()

    def _start(self, claims: Sequence[Claim], asked_at: float) -> None:
        self._runners.start(claims, asked_at)  # at once: see `Runners.start`

    async def _heartbeat_loop(self) -> None:
        while True:
            await anyio.sleep(self.heartbeat_interval_s)
            # A store whose file was deleted or replaced raises a fatal StoreError here,
            # before anything is renewed in it: the pool crashes rather than split.
            await self._with_store(self.store.check_identity)
            assert self._guard is not None
            await self._guard.check()
            before = dict(self._runners)  # only runners whose claim committed before the renewal
            renewal, asked_at = await self._with_store.sent_at(
                lambda: self.store.renew_leases(self.node_id, self.lease_ttl_s)
            )
            await hand_back_strays(
                self.store,
                self._with_store,
                self._strays.confirm(renewal.held, self._runners),
                node_id=self.node_id,
                telemetry=self._telemetry,
                handed_back=self._wake.set,
            )
            verdict = judge_renewal(before, renewal, self._leases.deadlines, time.monotonic())
            act_on_renewal(verdict, before, fence_reason=self._self_fence_reason())
            self._leases.renew(verdict.renewed, asked_at)
            self._guard.arm_node(force=True)
            self._guard.renewed(verdict.renewed)  # only leases the store has just granted

    def _self_fence_reason(self) -> str:
        return self_fence_reason(self.node_id, self.lease_ttl_s)

    async def _lease_guard_loop(self) -> None:
        await fence_before_expiry(
            self._leases,
            self._runners,
            reason=self._self_fence_reason(),
            check_every_s=self.heartbeat_interval_s,
        )

    @property
    def self_fence_margin_s(self) -> float:
        """How long before its lease runs out an attempt that could not be renewed is
        stopped: room for a late wake-up of the lease guard and for the kill itself."""
        return self._leases.margin_s

    async def _peers_loop(self) -> None:
        """Keep `_has_peers` current: whether other live nodes share the store and are
        woken by it, so that an end freeing a key is handed off (`frees_for_others`)."""
        if not self.store.pushes_wakes:
            return
        while True:
            nodes = await self._with_store(lambda: self.store.list_nodes(alive=True))
            self._has_peers = any(node.id != self.node_id for node in nodes)
            await anyio.sleep(self.heartbeat_interval_s)

    async def _reaper_loop(self) -> None:
        while True:
            await self._with_store(self._reconcile_predecessors)
            # Never its own running attempts (see `_recovery.rescue_expired`).
            if await rescue_expired(self.store, self._with_store, self._runners, self._telemetry):
                self._wake.set()
                self._task_changed()
            await anyio.sleep(self.reaper_interval_s)

    def _work_arrived(self, wake: Wake) -> None:
        # Only work wakes the claim loop, and it claims only with a free slot: an 'end'
        # was claimed for by the node that ended its task, in the same transaction.
        if wake is Wake.WORK:
            self._store_woke = True
            self._wake.set()
        self._task_changed()  # a waiter may be waiting on another node's task too

    def _task_changed(self) -> None:
        self._client.notify_changed()

    def _output_changed(self) -> None:
        self._client.notify_output()

    # -- the client API (see _pool_client.py): what the pool adds ---------------
    @property
    def owns_store(self) -> bool:
        """True if the pool opened its store from a URL or path, and so closes it."""
        return self._owns_store

    def _check_open(self) -> None:
        if self._tg is None or self._closing:
            raise PoolClosed("the pool is not running")

    def _work_submitted(self) -> None:
        self._wake.set()

    def _cancel_requested(self, info: TaskInfo) -> None:
        forced = info.cancel_requested is CancelMode.FORCE
        self._runners.cancel((info.id, info.fence), force=forced)
