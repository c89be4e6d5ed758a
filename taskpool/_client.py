"""Client: submit, inspect, follow, cancel and retry tasks over a store, no worker needed.

A web app that only submits and watches, an operator's command line, a script
that waits for a batch: none of them runs tasks, so none needs a `TaskPool`. A
`Client` talks to the same store the workers share. `TaskPool` offers the same
methods for embedded use by delegating to a client of its own.

Waiting and following never hammer the store: all of a client's waiters share one
read of their tasks (`taskpool._waiters`), made after a change notification (a pool
in the same process, or PostgreSQL's LISTEN/NOTIFY) and otherwise on a polling
backoff that starts at `min_poll_interval_s` and doubles up to `poll_interval_s`; at
most once per `min_poll_interval_s` however many notifications arrive and however
many callers wait. It returns only the tasks that ended, and wakes only their callers.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import anyio
from anyio.abc import TaskGroup

from ._errors import InvalidTask
from ._explain import WaitReason, explain_waiting, fills_every_node, queue_order
from ._models import (
    CancelMode,
    NodeInfo,
    Status,
    TaskEvent,
    TaskInfo,
    TaskSpec,
)
from ._schedule_client import ScheduleMethods
from ._store import Store, Wake
from ._waiters import StatusReads, Watch
from .stores import CLIENT_CONNECTIONS, open_store

#: At most how many running tasks `stale` and `why` read.
RUNNING_READ = 10_000
#: How many queued tasks `why` reads first; it reads four times more each time that
#: is not enough to tell (many tasks ahead, blocked, while nodes have room).
QUEUE_READ = 256


@dataclass(frozen=True, slots=True)
class StaleReport:
    """What looks stuck in a store: running tasks whose lease has expired (their owner
    stopped renewing and no node has rescued them yet), and nodes not marked stopped
    that have not heartbeaten for a while."""

    expired_leases: list[TaskInfo]
    silent_nodes: list[NodeInfo]
    at: float  # when it was judged (UNIX seconds, this host's clock)


def judge_stale(
    running: Iterable[TaskInfo], nodes: Iterable[NodeInfo], *, now: float, older_than_s: float
) -> StaleReport:
    """The stale report for these running tasks and live nodes at `now` (pure)."""
    expired = [t for t in running if t.lease_expires_at is not None and t.lease_expires_at < now]
    silent = [n for n in nodes if n.stopped_at is None and now - n.heartbeat_at > older_than_s]
    return StaleReport(expired, silent, now)


def poll_delays(first_s: float, max_s: float) -> Iterator[float]:
    """The pauses between two reads of a waiter that sees nothing change: `first_s`,
    doubling, then `max_s` for ever (pure)."""
    delay = min(first_s, max_s)
    while True:
        yield delay
        delay = min(delay * 2, max_s)


class Client(ScheduleMethods):
    """Submit, inspect, follow, cancel and retry tasks in a store; runs nothing itself.

    `store` is a `Store`, a `postgresql://` URL, or the path of an SQLite file.
    **Ownership**: a store the client opened from a URL or path is its own: `async
    with Client(url)` opens it and closes it on leaving. A `Store` object passed in
    is the caller's: the client opens it if it is not yet open (opening is
    idempotent) and never closes it. `owns_store` says which.

    `create=False` refuses to make a new database (a mistyped path is an error);
    `connections` sizes a PostgreSQL connection pool the client opens.

    Use it as `async with Client(...) as client:`. While it is entered, `wait` and
    `follow` on PostgreSQL are woken by the database's notifications (one LISTEN
    connection, opened when somebody first has to wait, held until the client
    closes); otherwise they poll with backoff
    (`min_poll_interval_s` doubling to `poll_interval_s`). Either way all the
    client's concurrent `wait` and `follow` calls share one status read per change
    (or poll), not one each. With `watch=False` the client never LISTENs
    (`TaskPool`'s own client: the pool has its watcher and calls `notify_changed`).
    """

    def __init__(
        self,
        store: Store | str | os.PathLike[str],
        *,
        create: bool = True,
        connections: int = CLIENT_CONNECTIONS,
        poll_interval_s: float = 1.0,
        min_poll_interval_s: float = 0.05,
        watch: bool = True,
    ) -> None:
        if not poll_interval_s > 0 or not min_poll_interval_s > 0:
            raise ValueError("poll intervals must be > 0")
        if isinstance(store, Store):
            self.store = store
            self.owns_store = False  # the caller's: never closed here
        else:
            self.store = open_store(store, connections=connections, create=create)
            self.owns_store = True
        self.poll_interval_s = poll_interval_s
        self.min_poll_interval_s = min(min_poll_interval_s, poll_interval_s)
        self._watch = watch
        # The statuses every waiting caller shares; `poll_delays` is looked up when a
        # backoff starts (tests replace it).
        self._reads = StatusReads(
            self.store,
            first_s=self.min_poll_interval_s,
            delays=lambda: poll_delays(self.min_poll_interval_s, self.poll_interval_s),
            on_pause=self._watch_for_changes,
        )
        self._tg: TaskGroup | None = None
        self._watching = False  # the LISTEN watcher runs in `_tg`

    def __repr__(self) -> str:
        owner = "owned" if self.owns_store else "given"
        return f"<Client store={self.store!r} ({owner})>"

    # -- lifecycle ---------------------------------------------------------
    async def __aenter__(self) -> Self:
        await self.store.open()
        try:
            self._tg = anyio.create_task_group()
            await self._tg.__aenter__()
        except BaseException:
            self._tg = None
            await self._close_store()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg, self._tg = self._tg, None
        try:
            if tg is not None:
                # Only the LISTEN watcher lives in it. The body's own exception is not
                # handed to the group, so that it leaves as raised, not in a group.
                tg.cancel_scope.cancel()
                await tg.__aexit__(None, None, None)
        finally:
            self._watching = False
            await self._close_store()
        return None

    async def _close_store(self) -> None:
        if self.owns_store:
            with anyio.CancelScope(shield=True):
                await self.store.close()

    # -- change notifications ------------------------------------------------
    def notify_changed(self) -> None:
        """Tell waiters that a task's status may have changed: their shared read is
        made again now (at most once per `min_poll_interval_s`). `TaskPool` calls it
        for its own tasks and for the store's notifications."""
        self._reads.changed()
        self.notify_output()

    def notify_output(self) -> None:
        """Tell followers that a task may have new output."""
        self._reads.output_arrived()

    def _store_woke(self, wake: Wake) -> None:
        del wake  # either kind may mean a task ended ('work' may come with an end)
        self.notify_changed()

    def _watch_for_changes(self) -> None:
        """Before a caller's first pause: one LISTEN on stores that push (PostgreSQL),
        shared by every waiter of this client and held until the client closes. Started
        no sooner (a wait that finds its task ended needs none), and never stopped by a
        waiter leaving: a connection cancelled half-way through its handshake leaks."""
        if self._watch and self._tg is not None and not self._watching:
            self._watching = True
            self._tg.start_soon(self.store.watch_for_work, self._store_woke)

    async def _ended(self, watch: Watch) -> TaskInfo | None:
        """Once the shared read has settled `watch`: the ended task it fetched or, when
        it found no such task or failed, the task as this caller reads it alone (so
        `TaskNotFound`, or the store's error, is raised to this caller only); None, and
        watched again, if it has not ended after all."""
        if watch.info is not None:
            return watch.info
        info = await self.store.get(watch.task_id)
        if info.is_terminal:
            return info
        watch.settled = None  # the shared read failed but the task runs on
        return None

    # -- submitting ----------------------------------------------------------
    async def submit(self, argv: Sequence[str], **options: Any) -> int:
        """Store a task and return its id; it is durable when this returns.

        Options are those of `TaskSpec.build`: cwd, env, pass_env, inherit_env,
        project, template, template_parallel, locks, priority, not_before,
        timeout_s, stall_timeout_s, max_attempts, retry_backoff_s, retry_jitter,
        retry_max_delay_s, retry_on, memory_max, pids_max, cpu_max, unique_key,
        on_conflict, after. Bad input raises `InvalidTask` and stores nothing.

        The id is a `SubmitResult` (an int): with a `unique_key` that a waiting or
        running task holds, it is that task's id and `created` is False
        (`on_conflict="reject"`, the default, or a running holder); with
        `on_conflict="replace_waiting"` a waiting holder is cancelled (its id in
        `replaced`) and the new task stored.

        `after=[ids]`: the task starts only once each of those tasks has succeeded;
        if one fails, times out, stalls, is cancelled or lost, this one is cancelled
        with a reason naming it, and so on down a chain. Each must exist
        (`InvalidTask` otherwise), so no cycle can form.
        """
        return await self.submit_spec(TaskSpec.build(argv, **options))

    async def submit_spec(self, spec: TaskSpec) -> int:
        """Store a prepared `TaskSpec` and return its id (see `submit`)."""
        return await self.store.submit(spec)

    async def submit_many(self, specs: Iterable[TaskSpec]) -> list[int]:
        """Store several prepared specs in one transaction and return their ids, in
        order (queued in that order among equal priorities). All or nothing: one
        invalid spec raises `InvalidTask` and none is stored; so does one
        `unique_key` twice in the batch. Each key is handled as in `submit`."""
        return await self.store.submit_many(list(specs))

    async def retry(self, task_id: int) -> int:
        """Queue a finished task again, as a new task with the same spec; its id. Its
        first event's reason is `retry of task <id>`. A task that is still waiting or
        running is refused with `InvalidTask`."""
        task = await self.store.get(task_id)
        if not task.is_terminal:
            raise InvalidTask(
                f"task {task.id} is {task.status.value}; only a finished task is retried"
            )
        return await self.store.submit(task.spec, reason=f"retry of task {task.id}")

    async def cancel(
        self, task_id: int, mode: CancelMode | str = CancelMode.GRACEFUL, *, force: bool = False
    ) -> TaskInfo:
        """Cancel a task: a waiting one at once; for a running one, ask its node to stop
        it (`CancelMode.GRACEFUL`: SIGTERM, its grace period, SIGKILL;
        `CancelMode.FORCE`, or `force=True`: SIGKILL at once). Returns the task's state
        after the request; `wait` tells when a running one has ended. A forced request
        escalates a graceful one; a graceful one never softens a forced one."""
        try:
            mode = CancelMode(mode)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in CancelMode)
            raise ValueError(f"cancel mode must be one of {choices}, got {mode!r}") from None
        force = force or mode is CancelMode.FORCE
        info = await self.store.request_cancel(task_id, force=force)
        self.notify_changed()
        return info

    # -- reading -------------------------------------------------------------
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

    async def nodes(self, *, alive: bool | None = None) -> list[NodeInfo]:
        """Pools that have registered with the store, oldest first (`alive=True`: only
        those not marked stopped)."""
        return await self.store.list_nodes(alive=alive)

    async def stale(self, *, older_than_s: float = 60.0) -> StaleReport:
        """Expired leases nobody rescued yet, and live nodes silent for `older_than_s`."""
        running = await self.store.list_tasks(statuses=[Status.RUNNING], limit=RUNNING_READ)
        nodes = await self.store.list_nodes(alive=True)
        return judge_stale(running, nodes, now=time.time(), older_than_s=older_than_s)

    async def why(self, task_id: int) -> list[WaitReason]:
        """What holds a waiting task, by the rules the claim applies: each reason with
        its kind, the tasks and nodes it names and its `text` (`taskpool._explain`).
        Empty when the task is not waiting, or when nothing holds it (a node will
        claim it at its next claim). `TaskNotFound` if there is no such task."""
        task = await self.store.get(task_id)
        return (await self.why_many([task]))[task.id]

    async def why_many(self, tasks: Iterable[TaskInfo]) -> dict[int, list[WaitReason]]:
        """`why` for several tasks as read already (a list of waiting ones), from one
        read of what runs, the live nodes and the queue ahead of the deepest of them."""
        tasks = list(tasks)
        now = time.time()
        running = await self.store.list_tasks(statuses=[Status.RUNNING], limit=RUNNING_READ)
        nodes = await self.store.list_nodes(alive=True)
        waiting = [t for t in tasks if t.status is Status.WAITING]
        queue: list[TaskInfo] = []
        if waiting and nodes:
            deepest = max(waiting, key=queue_order)
            limit = QUEUE_READ
            while True:
                queue = await self.store.waiting_ahead(deepest.id, limit=limit)
                if len(queue) < limit or fills_every_node(queue, running, nodes, now=now):
                    break
                limit *= 4
        after = {task_id for t in waiting for task_id in t.spec.after}
        dependencies = await self.store.statuses(after) if after else {}
        return explain_waiting(
            tasks, queue=queue, running=running, nodes=nodes, now=now, dependencies=dependencies
        )

    async def wait(self, task_id: int, *, timeout_s: float | None = None) -> TaskInfo:
        """Wait until the task is terminal and return it (`TimeoutError` after
        `timeout_s`; the task is left alone; `TaskNotFound` if there is none).

        Concurrent calls share one read per change (see the class), which returns the
        tasks that ended to their callers."""
        with anyio.fail_after(timeout_s if timeout_s is not None else math.inf):
            watch = self._reads.register(task_id)
            try:
                while True:
                    await self._reads.park(watch)
                    info = await self._ended(watch)
                    if info is not None:
                        return info
            finally:
                self._reads.unregister(watch)

    async def output(self, task_id: int) -> str:
        """Everything the task has printed so far, across attempts."""
        return "".join([chunk async for chunk in self._chunks(task_id, follow=False)])

    async def follow(self, task_id: int) -> AsyncIterator[str]:
        """Yield the task's output as it arrives, until the task is terminal."""
        async for text in self._chunks(task_id, follow=True):
            yield text

    async def _chunks(self, task_id: int, *, follow: bool) -> AsyncIterator[str]:
        cursor = (0, 0)
        delays = poll_delays(self.min_poll_interval_s, self.poll_interval_s)
        # A follower's status check is the shared read's (as a waiter's).
        watch = self._reads.register(task_id, follows=True) if follow else None
        done = False
        try:
            while True:
                read_at = anyio.current_time()
                # Know the end before reading the output: output written before the
                # end is then always read before we stop.
                if watch is not None and watch.settled is not None and not done:
                    done = await self._ended(watch) is not None
                chunks = await self.store.read_output(task_id, after=cursor)
                for chunk in chunks:
                    yield chunk.text
                if chunks:
                    cursor = (chunks[-1].fence, chunks[-1].seq)
                    delays = poll_delays(self.min_poll_interval_s, self.poll_interval_s)
                    continue
                if watch is None or done:
                    return
                # Until the task ends, output may have come, or the follower's own poll.
                await self._reads.park(watch, budget_s=next(delays))
                # Never sooner than `min_poll_interval_s` after the last output read: a
                # storm of notifications costs one read per interval.
                rest = read_at + self.min_poll_interval_s - anyio.current_time()
                if rest > 0 and watch.settled is None:
                    await anyio.sleep(rest)
        finally:
            if watch is not None:
                self._reads.unregister(watch)
