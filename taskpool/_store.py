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
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Self

import anyio

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
        event's (a retry says which task it retries)."""

    async def submit_many(self, specs: Sequence[TaskSpec]) -> list[int]:
        """Store several tasks as waiting, in order, and return their ids in the same
        order; all of them or, if any spec is invalid (`InvalidTask`), none. Backends
        that can write them in one transaction must (the SQL stores do): this default
        checks every spec first, then submits them one by one, which is all or nothing
        for invalid input but not against a failure half-way."""
        checked = [spec.checked() for spec in specs]  # InvalidTask before anything is stored
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

    async def watch_for_work(self, on_work: Callable[[], None]) -> None:
        """Call `on_work` whenever another node or process may have made work claimable
        (a submit, a retry coming due, a rescue). Runs until cancelled and rides out
        outages by itself: the pool's polling is the fallback. Stores without push
        notifications keep this default, which never calls."""
        del on_work
        await anyio.sleep_forever()

    # -- operator actions --------------------------------------------------
    @abc.abstractmethod
    async def request_cancel(self, task_id: int, *, force: bool = False) -> TaskInfo:
        """Cancel a waiting task at once; ask the owner of a running one to stop it."""

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

    # -- reads -------------------------------------------------------------
    @abc.abstractmethod
    async def get(self, task_id: int) -> TaskInfo:
        """One task, or `TaskNotFound`."""

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
    async def events(self, task_id: int) -> list[TaskEvent]:
        """The task's transitions in order."""

    @abc.abstractmethod
    async def read_output(
        self, task_id: int, *, after: tuple[int, int] = (0, 0), limit: int = 1000
    ) -> list[OutputChunk]:
        """Output chunks after (fence, seq), in order, across all attempts."""
