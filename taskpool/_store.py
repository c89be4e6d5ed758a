"""The one narrow interface between the pool (and the client) and their durable state.

`Store` is not a public extension point: taskpool ships its backends (SQLite,
PostgreSQL, and `taskpool.testing.MemoryStore` for tests) and changes this interface
and its vocabulary (`Renewal`, `Orphan`, `Claim`, `Outcome`, ...) between releases
without notice; only `OutputChunk`, which `read_output` returns, is exported. Use a
store through `Client` or `TaskPool`, or call its reading methods directly.

Every method is one atomic operation. Writes made on behalf of an attempt carry
its fencing token and raise `LeaseLost` when the token is stale: someone else
took the task over (a lease that merely expired only allows a rescue). What each
operation decides is written once, in `taskpool._decisions` (and the blocking
policy in `taskpool._rules`); a backend reads rows, asks, and writes the answer.
Backends turn driver errors into `StoreUnavailable` (transient: worth retrying)
or `StoreError` at this boundary.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Self

import anyio

from ._errors import TaskNotFound
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
)
from ._retention import PruneReport, Retention
from ._validation import check_batch_keys

if TYPE_CHECKING:
    from ._scheduler import ScheduleStore


@dataclass(frozen=True, slots=True)
class Renewal:
    """What a node learns from renewing its leases."""

    held: Mapping[int, int]  # task id -> fence of every lease the node still holds
    cancel_requests: Mapping[int, CancelMode]  # task id -> how to cancel it, for held tasks


@dataclass(frozen=True, slots=True)
class Orphan:
    """A running attempt whose owner is gone, with what is needed to find its processes."""

    task_id: int
    fence: int
    node_id: str
    pid: int | None
    pid_started_at: float | None


class Wake(enum.StrEnum):
    """What a store's change notification says happened (`Store.watch_for_work`)."""

    #: Work may have become claimable (a submit, a re-queue, a rescue, or a claim that
    #: filled its node and may have left claimable work to the others); a task may have
    #: ended too. Nodes with a free slot claim; waiters re-read.
    WORK = "work"
    #: Tasks ended and whoever could claim what their end freed did (a node claims in
    #: the transaction that ends its own task). Only waiters re-read; nodes sleep on.
    END = "end"

    @classmethod
    def of(cls, payload: str) -> Wake:
        """The kind a notification's payload names; anything else (a node or schema of
        another version) is taken as `WORK`, the kind that wakes everybody."""
        return cls.END if payload == cls.END.value else cls.WORK


@dataclass(frozen=True, slots=True)
class OutputChunk:
    """A piece of an attempt's output: `(fence, seq)` orders chunks across attempts."""

    fence: int
    seq: int
    text: str


class Store(abc.ABC):
    """Durable state of tasks, attempts, nodes, output and events.

    Internal interface, not a public extension point (see the module docstring): the
    backends are `SQLiteStore`, `PostgresStore` and, for tests, `MemoryStore`. Pass
    one to `TaskPool` or `Client`, or let them open one from a path or URL
    (`taskpool.stores.open_store`)."""

    #: Whether `watch_for_work` is told of other processes' changes (PostgreSQL's
    #: NOTIFY); stores that only poll keep False.
    pushes_wakes: ClassVar[bool] = False

    #: A random identity created once with the schema and read by `open`. Every
    #: attempt's processes carry it, so that a pool, its reaper and its tests touch
    #: only processes of their own store, even where another store on the same host
    #: has the same task ids.
    store_id: str = ""

    # -- lifecycle ---------------------------------------------------------
    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and bring the schema up to date."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections. Idempotent."""

    async def check_identity(self) -> None:
        """Raise `StoreError` (not `StoreUnavailable`: it is fatal) if this store is no
        longer the one `open` opened, for example its file was deleted or replaced, so
        that a pool stops instead of splitting its state between two stores. Cheap: the
        pool calls it at every heartbeat. Stores with nothing to check keep this default."""
        return  # by default there is nothing that could have changed under the store

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- nodes -------------------------------------------------------------
    @abc.abstractmethod
    async def register_node(self, node: NodeInfo) -> None:
        """Record a new pool incarnation."""

    @abc.abstractmethod
    async def stop_node(self, node_id: str, reason: str) -> None:
        """Mark a node stopped; it owns nothing afterwards."""

    @abc.abstractmethod
    async def list_nodes(
        self, *, host: str | None = None, alive: bool | None = None
    ) -> list[NodeInfo]:
        """Nodes, optionally only those on `host` and/or not (yet) marked stopped."""

    # -- the queue ---------------------------------------------------------
    @abc.abstractmethod
    async def submit(self, spec: TaskSpec, *, reason: str = "submitted") -> int:
        """Store a task as waiting; durable when this returns. `reason` is its first
        event's (a retry says which task it retries). With a `unique_key` held by a
        waiting or running task, decided atomically with the write: that task's id,
        not `created` (`on_conflict="reject"`, or a running holder), or the waiting
        holder cancelled (`replaced`) and the task stored (`"replace_waiting"`).
        Every id in `spec.after` must exist (`InvalidTask`, nothing stored); the task
        is then held until they all succeed, or cancelled at once if one already
        ended otherwise (`taskpool._decisions.plan_dependencies`)."""

    async def submit_many(self, specs: Sequence[TaskSpec]) -> list[int]:
        """Store several tasks as waiting, in order, and return their ids in the same
        order; all of them or, if any spec is invalid (`InvalidTask`), none. Each
        spec's unique key is handled as `submit` does, and each id is its
        `SubmitResult` (typed `int` so that a `list[int]` still takes the list); one
        key twice in the batch is `InvalidTask`. Backends that can write them in one
        transaction must (the SQL stores do): this default checks every spec first,
        then submits them one by one, which is all or nothing for invalid input but
        not against a failure half-way."""
        checked = [spec.checked() for spec in specs]  # InvalidTask before anything is stored
        check_batch_keys(spec.unique_key for spec in checked)
        return [await self.submit(spec) for spec in checked]

    @abc.abstractmethod
    async def claim(self, node_id: str, limits: Limits, lease_ttl_s: float) -> list[Claim]:
        """Atomically start as many waiting tasks as the blocking rules allow on this node."""

    @abc.abstractmethod
    async def record_spawn(self, task_id: int, fence: int, pid: int, pid_started_at: float) -> None:
        """Remember the attempt's process identity, to find leftovers after a crash."""

    @abc.abstractmethod
    async def append_output(self, task_id: int, fence: int, texts: Sequence[str]) -> None:
        """Append output chunks to the attempt's log."""

    @abc.abstractmethod
    async def finish(self, task_id: int, fence: int, outcome: Outcome) -> TaskInfo:
        """End the attempt: terminal status, or back to waiting for a retry or shutdown."""

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
        """`finish`, then `claim` for the slot it freed. Backends that can do both in
        one transaction should: it saves a round trip on every task's hot path."""
        await self.finish(task_id, fence, outcome)
        return await self.claim(node_id, limits, lease_ttl_s)

    @abc.abstractmethod
    async def renew_leases(self, node_id: str, lease_ttl_s: float) -> Renewal:
        """Extend every live lease the node holds, in one write, and heartbeat the node."""

    @abc.abstractmethod
    async def rescue_expired(
        self, *, except_attempts: Collection[tuple[int, int]] = ()
    ) -> list[TaskInfo]:
        """Re-queue (attempts left) or mark lost every attempt whose lease has expired,
        but those in `except_attempts` ((task id, fence) pairs): a node passes the
        attempts it runs itself, which it never rescues (it stops them before their
        lease runs out and hands them back itself)."""

    @abc.abstractmethod
    async def orphans_of(self, node_id: str) -> list[Orphan]:
        """Running attempts owned by `node_id` (a dead predecessor, at boot)."""

    @abc.abstractmethod
    async def settle_orphan(self, task_id: int, fence: int, reason: str) -> TaskInfo:
        """Re-queue or mark lost an orphaned attempt, without waiting for its lease to expire."""

    async def watch_for_work(self, on_wake: Callable[[Wake], None]) -> None:
        """Call `on_wake` with what happened whenever another node or process may have
        made work claimable (`Wake.WORK`: a submit, a re-queue, a rescue, a claim that
        filled its node) or ended tasks (`Wake.END`). Once per transaction at most:
        a transaction that does both says `WORK`. Calls `on_wake(Wake.WORK)` too on every
        (re)connection: something may have happened while nobody listened. Runs until
        cancelled and rides out outages by itself: the pool's and the waiters' polling
        is the fallback. Stores without push notifications keep this default, which
        never calls."""
        del on_wake
        await anyio.sleep_forever()

    # -- operator actions --------------------------------------------------
    @abc.abstractmethod
    async def request_cancel(self, task_id: int, *, force: bool = False) -> TaskInfo:
        """Cancel a waiting task at once; ask the owner of a running one to stop it."""

    @abc.abstractmethod
    async def prune(
        self, policy: Retention, *, now: float | None = None, dry_run: bool = False
    ) -> PruneReport:
        """Remove finished tasks (with their attempts, events and output) and output
        that `policy` no longer keeps, as of `now` (default: the store's clock), in
        transactions of at most `_retention.BATCH_TASKS` tasks; never a waiting or
        running task. `dry_run` removes nothing and reports what it would remove.
        Concurrent prunes are safe. SQLite files in incremental vacuum mode shrink."""

    async def vacuum(self) -> int | None:
        """Rewrite the storage to return free space (SQLite: a full VACUUM that also
        turns on incremental vacuum; it holds the write lock throughout). Bytes the
        file shrank by, None where not known. Stores with nothing to do keep this."""
        return None

    @abc.abstractmethod
    async def cancel_requests(self, node_id: str) -> dict[int, tuple[int, CancelMode]]:
        """The cancels asked for the running attempts `node_id` owns: task id -> (fence,
        mode). A read, cheap enough to run on every `watch_for_cancels` wake-up."""

    async def watch_for_cancels(self, node_id: str, on_cancel: Callable[[], None]) -> None:
        """Call `on_cancel` soon after a cancel may have been asked, from any process,
        for a task `node_id` runs (and once whenever watching starts anew: one may have
        come while nobody watched). Runs until cancelled and rides out outages by
        itself: the heartbeat's renewal is the fallback. Stores without a way to watch
        keep this default, which never calls."""
        del node_id, on_cancel
        await anyio.sleep_forever()

    def schedules(self) -> ScheduleStore | None:
        """The schedules this store keeps (`taskpool._scheduler`); None for a store that
        keeps none (the pools' scheduler loop then does nothing)."""
        return None

    # -- reads -------------------------------------------------------------
    @abc.abstractmethod
    async def get(self, task_id: int) -> TaskInfo:
        """One task, or `TaskNotFound`."""

    async def statuses(self, task_ids: Collection[int]) -> dict[int, Status]:
        """The current status of each of these tasks; ids of no task are left out. A
        client's waiters check so, in one query for all, that the tasks they start to
        wait for exist. The shipped backends read them in one query; this default asks
        `get` for each."""
        found: dict[int, Status] = {}
        for task_id in task_ids:
            try:
                found[task_id] = (await self.get(task_id)).status
            except TaskNotFound:
                continue
        return found

    async def get_many(
        self, task_ids: Collection[int], *, ended_only: bool = False
    ) -> dict[int, TaskInfo]:
        """These tasks by id, ids of no task left out; with `ended_only`, only those
        that have ended (a terminal status). The waiters' shared read: the ended tasks
        among all those waited for, in one query on the shipped backends, that returns
        no row for a task still waiting or running. This default asks `get` for each."""
        found: dict[int, TaskInfo] = {}
        for task_id in task_ids:
            try:
                info = await self.get(task_id)
            except TaskNotFound:
                continue
            if info.is_terminal or not ended_only:
                found[task_id] = info
        return found

    @abc.abstractmethod
    async def list_tasks(
        self,
        *,
        statuses: Sequence[Status] | None = None,
        project: str | None = None,
        limit: int = 100,
    ) -> list[TaskInfo]:
        """Tasks, newest first."""

    @abc.abstractmethod
    async def waiting_ahead(self, task_id: int, *, limit: int) -> list[TaskInfo]:
        """The waiting tasks due now (`not_before` reached) that a claim considers
        before task `task_id`: higher priority, or equal priority and submitted
        earlier; the first `limit` of them in that queue order. `TaskNotFound` if
        there is no task `task_id`. What explains a waiting task's place in the queue."""

    @abc.abstractmethod
    async def events(self, task_id: int) -> list[TaskEvent]:
        """The task's transitions in order."""

    @abc.abstractmethod
    async def read_output(
        self, task_id: int, *, after: tuple[int, int] = (0, 0), limit: int = 1000
    ) -> list[OutputChunk]:
        """Output chunks after (fence, seq), in order, across all attempts."""
