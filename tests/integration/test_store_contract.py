"""The Store contract: what every backend must do, run against each backend.

A backend joins by adding to `BACKENDS` an async context manager that, given a
temporary directory, makes a fresh empty database and yields a function opening
a new handle onto it (two handles stand for two nodes or two processes).

Time is in the data, never slept on: a lease that has run out is one given with a
TTL in the past (PostgreSQL decides on its own clock, which a test cannot move); the
stores that take a clock (SQLite, MemoryStore) are also run on one the test moves, to
pin the rules at their boundaries.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio
import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskpool import (
    CancelMode,
    LeaseLost,
    Limits,
    NodeInfo,
    PruneReport,
    Retention,
    SQLiteStore,
    Status,
    Store,
    TaskInfo,
    TaskNotFound,
    TaskSpec,
)
from taskpool._models import Outcome, OutcomeKind
from taskpool._rules import Occupancy, Slot, blocked_by
from taskpool.stores.postgres import PostgresStore
from taskpool.stores.postgres import migrations as postgres_migrations
from taskpool.testing import MemoryStore
from tests.helpers import SAFETY_TIMEOUT_S
from tests.postgres import fresh_postgres_database

Opener = Callable[[], Store]


@asynccontextmanager
async def sqlite_database(tmp: Path) -> AsyncIterator[Opener]:
    yield lambda: SQLiteStore(tmp / "contract.db")


@asynccontextmanager
async def postgres_database(tmp: Path) -> AsyncIterator[Opener]:
    async with fresh_postgres_database() as dsn:
        yield lambda: PostgresStore(dsn, max_size=4)


@asynccontextmanager
async def memory_database(tmp: Path) -> AsyncIterator[Opener]:
    store = MemoryStore()  # every handle is the one store: it lives in this process
    yield lambda: store


BACKENDS: dict[str, Callable[[Path], AbstractAsyncContextManager[Opener]]] = {
    "sqlite": sqlite_database,
    "postgres": postgres_database,
    "memory": memory_database,
}


@pytest.fixture(params=sorted(BACKENDS))
async def opener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens handles onto one fresh database of the backend under test."""
    async with BACKENDS[request.param](tmp_path) as open_handle:
        yield open_handle


@asynccontextmanager
async def handles(opener: Opener, n: int) -> AsyncIterator[list[Store]]:
    async with AsyncExitStack() as stack:
        stores = [await stack.enter_async_context(opener()) for _ in range(n)]
        for i, store in enumerate(stores):
            await store.register_node(_node(f"node-{i}"))
        yield stores


def _node(node_id: str) -> NodeInfo:
    now = time.time()
    return NodeInfo(node_id, "host", os.getpid(), now, now, now, None, 4)


EXITED_0 = Outcome(OutcomeKind.EXITED, "exited with code 0", 0)


async def test_submit_is_visible_to_another_handle_when_it_returns(opener: Opener) -> None:
    """A submitted task is durable: another handle sees it waiting at once."""
    async with handles(opener, 2) as (one, two):
        task = await one.submit(TaskSpec.build(["echo", "hi"], project="p", locks=["x"]))
        info = await two.get(task)
        assert info.status is Status.WAITING
        assert info.spec.argv == ("echo", "hi")
        assert info.spec.locks == frozenset({"x"})
        assert [e.reason for e in await two.events(task)] == ["submitted"]


async def test_non_parallel_template_is_exclusive_across_handles(opener: Opener) -> None:
    """Two nodes never both claim tasks of one non-parallel template."""
    async with handles(opener, 2) as (one, two):
        for _ in range(5):
            await one.submit(TaskSpec.build(["true"], template="deploy"))
        first = await one.claim("node-0", Limits(max_parallel=4), lease_ttl_s=30)
        second = await two.claim("node-1", Limits(max_parallel=4), lease_ttl_s=30)
        assert len(first) == 1
        assert second == []


async def test_concurrent_claims_never_overlap(opener: Opener) -> None:
    """Claims racing from two handles take each task once and respect every lock."""
    async with handles(opener, 2) as stores:
        for i in range(40):
            await stores[0].submit(TaskSpec.build(["true"], locks=[f"lock-{i % 10}"]))
        claimed: list[int] = []

        async def claim_all(store: Store, node_id: str) -> None:
            for _ in range(10):
                claims = await store.claim(node_id, Limits(max_parallel=20), lease_ttl_s=30)
                claimed.extend(c.task.id for c in claims)

        async with anyio.create_task_group() as tg:
            tg.start_soon(claim_all, stores[0], "node-0")
            tg.start_soon(claim_all, stores[1], "node-1")
        assert len(claimed) == len(set(claimed)) == 10  # one per lock, no task twice
        running = await stores[0].list_tasks(statuses=[Status.RUNNING])
        assert sorted(next(iter(t.spec.locks)) for t in running) == [f"lock-{i}" for i in range(10)]


#: A lease TTL in the past: the lease has run out when the claim returns.
RAN_OUT = -60.0


async def test_stale_fence_is_refused_everywhere(opener: Opener) -> None:
    """After a rescue and a new claim, every write of the old owner raises LeaseLost."""
    async with handles(opener, 2) as (old_store, new_store):
        task = await old_store.submit(TaskSpec.build(["true"], max_attempts=2))
        (old,) = await old_store.claim("node-0", Limits(), lease_ttl_s=RAN_OUT)
        (rescued,) = await new_store.rescue_expired()
        assert rescued.status is Status.WAITING
        assert rescued.reason is not None
        assert rescued.reason.startswith("owner node node-0 stopped heartbeating at ")
        (new,) = await new_store.claim("node-1", Limits(), lease_ttl_s=30)
        assert new.fence > old.fence
        with pytest.raises(LeaseLost):
            await old_store.append_output(task, old.fence, ["stale"])
        with pytest.raises(LeaseLost):
            await old_store.record_spawn(task, old.fence, 1234, 1.0)
        with pytest.raises(LeaseLost):
            await old_store.finish(task, old.fence, EXITED_0)
        assert (await old_store.renew_leases("node-0", 30)).held == {}
        await new_store.append_output(task, new.fence, ["fresh"])
        info = await new_store.finish(task, new.fence, EXITED_0)
        assert info.status is Status.SUCCEEDED
        assert [c.text for c in await new_store.read_output(task)] == ["fresh"]


async def test_an_expired_lease_is_lost_when_rescued(opener: Opener) -> None:
    """A lease past its expiry cannot be renewed, and a rescue marks it lost; once
    rescued, the old owner's writes are refused."""
    async with handles(opener, 1) as (store,):
        task = await store.submit(TaskSpec.build(["true"]))
        (claim,) = await store.claim("node-0", Limits(), lease_ttl_s=RAN_OUT)
        assert (await store.renew_leases("node-0", 30)).held == {}
        (rescued,) = await store.rescue_expired()
        with pytest.raises(LeaseLost):
            await store.finish(task, claim.fence, EXITED_0)
        assert rescued.status is Status.LOST
        assert rescued.reason is not None
        assert rescued.reason.endswith("; no attempts left")


async def test_an_expired_lease_nobody_took_over_still_records_its_end(opener: Opener) -> None:
    """Expiry only allows a rescue: until one happens the owner's output and result are
    recorded (its processes ended within the lease), and the rescue finds nothing."""
    async with handles(opener, 1) as (store,):
        task = await store.submit(TaskSpec.build(["true"]))
        (claim,) = await store.claim("node-0", Limits(), lease_ttl_s=RAN_OUT)
        await store.append_output(task, claim.fence, ["done\n"])
        info = await store.finish(task, claim.fence, EXITED_0)
        assert info.status is Status.SUCCEEDED
        assert await store.rescue_expired() == []
        assert [c.text for c in await store.read_output(task)] == ["done\n"]


async def test_renewal_reports_cancel_requests(opener: Opener) -> None:
    """A cancel requested through any handle reaches the owner with its renewal."""
    async with handles(opener, 2) as (owner, operator):
        task = await owner.submit(TaskSpec.build(["true"], max_attempts=3))
        (claim,) = await owner.claim("node-0", Limits(), lease_ttl_s=30)
        await operator.request_cancel(task)
        renewal = await owner.renew_leases("node-0", 30)
        assert renewal.held == {task: claim.fence}
        assert renewal.cancel_requests == {task: "graceful"}
        await operator.request_cancel(task, force=True)
        assert (await owner.renew_leases("node-0", 30)).cancel_requests == {task: "force"}
        info = await owner.finish(
            task, claim.fence, Outcome(OutcomeKind.EXITED, "exited with code 1", 1)
        )
        # It failed on its own with attempts left, but a cancel was asked: never re-queued.
        assert info.status is Status.CANCELLED


async def test_shutdown_release_does_not_use_an_attempt(opener: Opener) -> None:
    """An attempt ended by shutdown goes back to waiting with its attempt refunded."""
    async with handles(opener, 1) as (store,):
        task = await store.submit(TaskSpec.build(["true"]))
        (claim,) = await store.claim("node-0", Limits(), lease_ttl_s=30)
        assert claim.task.attempts_used == 1
        info = await store.finish(
            task, claim.fence, Outcome(OutcomeKind.SHUTDOWN, "interrupted: node shut down")
        )
        assert info.status is Status.WAITING
        assert info.attempts_used == 0


async def test_orphans_are_settled_without_waiting_for_expiry(opener: Opener) -> None:
    """A dead owner's attempt is settled at once, and settling twice is harmless."""
    async with handles(opener, 1) as (store,):
        task = await store.submit(TaskSpec.build(["true"], max_attempts=2))
        (claim,) = await store.claim("node-0", Limits(), lease_ttl_s=600)
        await store.record_spawn(task, claim.fence, 4321, 99.5)
        (orphan,) = await store.orphans_of("node-0")
        assert (orphan.task_id, orphan.fence, orphan.pid) == (task, claim.fence, 4321)
        info = await store.settle_orphan(task, claim.fence, "owner died")
        assert info.status is Status.WAITING
        assert info.reason == "owner died; re-queued (attempt 2 of 2)"
        again = await store.settle_orphan(task, claim.fence, "owner died")
        assert again.status is Status.WAITING
        assert await store.orphans_of("node-0") == []


async def test_unknown_task(opener: Opener) -> None:
    """Every per-task call on a missing id raises TaskNotFound."""
    async with handles(opener, 1) as (store,):
        with pytest.raises(TaskNotFound):
            await store.get(99)
        with pytest.raises(TaskNotFound):
            await store.request_cancel(99)


async def test_statuses_and_get_many_read_many_tasks_at_once_leaving_out_unknown_ids(
    opener: Opener,
) -> None:
    """`statuses` and `get_many` answer for every id they know, as `get` would, from
    another handle, and leave out ids of no task (the waiters' shared read relies on
    both)."""
    async with handles(opener, 2) as (one, two):
        assert await two.statuses([]) == {}
        done, running, waiting = [await one.submit(TaskSpec.build(["true"])) for _ in range(3)]
        claims = await one.claim("node-0", Limits(2), 60.0)
        assert [c.task.id for c in claims] == [done, running]
        await one.finish(done, claims[0].fence, EXITED_0)
        found = await two.statuses([done, running, waiting, 9999, done])
        assert found == {
            done: Status.SUCCEEDED,
            running: Status.RUNNING,
            waiting: Status.WAITING,
        }
        assert found == {t: (await two.get(t)).status for t in (done, running, waiting)}
        fetched = await two.get_many([done, 9999, running, done])
        assert fetched == {done: await two.get(done), running: await two.get(running)}
        every = [done, running, waiting, 9999]
        assert await two.get_many(every, ended_only=True) == {done: await two.get(done)}
        assert await two.get_many([]) == {}


async def test_output_reads_in_order_across_attempts(opener: Opener) -> None:
    """Output chunks come back in (attempt, sequence) order, resumable from a cursor."""
    async with handles(opener, 1) as (store,):
        task = await store.submit(TaskSpec.build(["true"], max_attempts=2, retry_backoff_s=0))
        (first,) = await store.claim("node-0", Limits(), lease_ttl_s=30)
        await store.append_output(task, first.fence, ["a", "b"])
        await store.finish(task, first.fence, Outcome(OutcomeKind.EXITED, "exited with code 1", 1))
        (second,) = await store.claim("node-0", Limits(), lease_ttl_s=30)
        await store.append_output(task, second.fence, ["c"])
        chunks = await store.read_output(task)
        assert [c.text for c in chunks] == ["a", "b", "c"]
        after = (chunks[1].fence, chunks[1].seq)
        assert [c.text for c in await store.read_output(task, after=after)] == ["c"]


async def test_every_transition_is_logged_with_the_attempt_it_starts_or_ends(
    opener: Opener,
) -> None:
    """The event log of one life (submit, claim, a retry, a claim, cancel asked, a
    success all the same) is the same on every backend: the SQL triggers and MemoryStore log what
    `taskpool._decisions.logged_transition` says, and a cancel request its own event."""
    async with handles(opener, 2) as (one, two):
        task = await one.submit(TaskSpec.build(["true"], max_attempts=2, retry_backoff_s=0))
        (first,) = await one.claim("node-0", Limits(), lease_ttl_s=30)
        await one.renew_leases("node-0", 30)  # neither status nor fence: nothing logged
        failed = Outcome(OutcomeKind.EXITED, "exited with code 1", 1)
        await one.finish(task, first.fence, failed)
        (second,) = await two.claim("node-0", Limits(), lease_ttl_s=30)
        await two.request_cancel(task)
        await one.finish(task, second.fence, EXITED_0)
        events = await two.events(task)
    assert [(e.from_status, e.to_status, e.fence, e.node_id, e.reason) for e in events] == [
        (None, Status.WAITING, None, None, "submitted"),
        (Status.WAITING, Status.RUNNING, 1, "node-0", "claimed by node node-0 (attempt 1 of 2)"),
        (
            Status.RUNNING,
            Status.WAITING,
            1,
            "node-0",
            "exited with code 1; retrying in 0 s (attempt 2 of 2)",
        ),
        (Status.WAITING, Status.RUNNING, 2, "node-0", "claimed by node node-0 (attempt 2 of 2)"),
        (Status.RUNNING, Status.RUNNING, 2, "node-0", "cancel requested (graceful)"),
        (Status.RUNNING, Status.SUCCEEDED, 2, "node-0", "exited with code 0"),
    ]
    assert [e.id for e in events] == sorted(e.id for e in events)


ROUTING = st.tuples(
    st.sampled_from(["p1", "p2"]),
    st.one_of(st.none(), st.sampled_from(["t1", "t2"])),
    st.booleans(),
    st.frozensets(st.sampled_from(["l1", "l2", "l3"]), max_size=2),
    st.integers(0, 2),
)


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    tasks=st.lists(ROUTING, min_size=1, max_size=25),
    capacities=st.lists(st.integers(1, 4), min_size=1, max_size=6),
    project_limit=st.integers(1, 3),
)
def test_claimed_sets_always_satisfy_the_rules(
    backend: str,
    tasks: list[tuple[str, str | None, bool, frozenset[str], int]],
    capacities: list[int],
    project_limit: int,
) -> None:
    """Whatever is queued and however nodes claim, what runs obeys every rule at once."""

    async def run() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            async with BACKENDS[backend](Path(tmp)) as opener:
                await _claim_and_check(opener, tasks, capacities, project_limit)

    anyio.run(run)


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _claim_and_check(
    opener: Opener,
    tasks: list[tuple[str, str | None, bool, frozenset[str], int]],
    capacities: list[int],
    project_limit: int,
) -> None:
    limits = {"p1": project_limit}
    async with handles(opener, 2) as stores:
        for project, template, parallel, locks, priority in tasks:
            await stores[0].submit(
                TaskSpec.build(
                    ["true"],
                    project=project,
                    template=template,
                    template_parallel=parallel,
                    locks=sorted(locks),
                    priority=priority,
                )
            )
        for i, capacity in enumerate(capacities):
            node, store = f"node-{i % 2}", stores[i % 2]
            before = await _running_on(store, node)
            claims = await store.claim(
                node, Limits(max_parallel=capacity, project_limits=limits), lease_ttl_s=30
            )
            assert len(claims) <= max(0, capacity - before)
        # A last claim with room to spare must take everything the rules allow.
        await stores[0].claim(
            "node-0", Limits(max_parallel=100, project_limits=limits), lease_ttl_s=30
        )
        running = await stores[0].list_tasks(statuses=[Status.RUNNING], limit=1000)
        waiting = await stores[0].list_tasks(statuses=[Status.WAITING], limit=1000)
    assert Counter(t.spec.project for t in running)["p1"] <= project_limit
    locks_held = [lock for t in running for lock in t.spec.locks]
    assert len(locks_held) == len(set(locks_held))
    for template in ("t1", "t2"):
        of_template = [t for t in running if t.spec.template == template]
        if any(not t.spec.template_parallel for t in of_template):
            assert len(of_template) == 1
    # That claim left nothing runnable behind (no head-of-line blocking): every task
    # still waiting is blocked by the pure rules.
    occupancy = Occupancy.of(
        [_slot(t) for t in running],
        node_running=sum(1 for t in running if t.owner_node == "node-0"),
    )
    for task in waiting:
        assert blocked_by(_slot(task), occupancy, max_parallel=100, project_limits=limits), (
            f"task {task.id} was runnable but left waiting"
        )
    assert len(running) + len(waiting) == len(tasks)  # nothing lost


async def _running_on(store: Store, node: str) -> int:
    running = await store.list_tasks(statuses=[Status.RUNNING], limit=1000)
    return sum(1 for t in running if t.owner_node == node)


def _slot(task: TaskInfo) -> Slot:
    spec = task.spec
    return Slot(task.id, spec.project, spec.template, spec.template_parallel, spec.locks)


async def test_a_postgres_node_registered_before_fair_share_was_recorded_reads_it_off() -> None:
    """A node row written by the version before 0016 reads as not fair-sharing."""
    async with fresh_postgres_database() as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                "CREATE TABLE taskpool_schema_version"
                " (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
            )
            for version, sql in postgres_migrations():
                if version < 16:
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO taskpool_schema_version VALUES ($1, 0)", version
                    )
            await conn.execute(
                "INSERT INTO taskpool_nodes (id, host, pid, pid_started_at, started_at,"
                " heartbeat_at, max_parallel) VALUES ('old', 'host', 1, 0, 0, 0, 2)"
            )
        finally:
            await conn.close()
        async with PostgresStore(dsn, max_size=1) as store:
            [node] = await store.list_nodes()
        assert (node.id, node.fair_share, node.project_limits) == ("old", None, {})


async def test_postgres_migrations_apply_once_even_when_nodes_start_together() -> None:
    """Nodes booting at once on an empty database migrate it exactly once, in order."""
    async with fresh_postgres_database() as dsn:
        stores = [PostgresStore(dsn, max_size=1) for _ in range(3)]
        async with anyio.create_task_group() as tg:
            for store in stores:
                tg.start_soon(store.open)
        try:
            conn = await asyncpg.connect(dsn)
            try:
                versions = [
                    r[0]
                    for r in await conn.fetch(
                        "SELECT version FROM taskpool_schema_version ORDER BY version"
                    )
                ]
            finally:
                await conn.close()
            assert versions == [v for v, _ in postgres_migrations()]
            task = await stores[0].submit(TaskSpec.build(["true"]))
            assert (await stores[2].get(task)).status is Status.WAITING
        finally:
            for store in stores:
                await store.close()


async def test_a_stopped_node_owns_nothing_and_claims_nothing(opener: Opener) -> None:
    """Stopping a node hands its running attempts back in the same operation, refunded
    (a cancel-requested one is cancelled instead); a claim made for a stopped node
    takes nothing, so no task is ever left running under a stopped node."""
    async with handles(opener, 2) as (one, two):
        plain = await one.submit(TaskSpec.build(["true"], max_attempts=1))
        doomed = await one.submit(TaskSpec.build(["true"], max_attempts=1))
        claimed = await one.claim("node-0", Limits(max_parallel=4), lease_ttl_s=30)
        assert sorted(c.task.id for c in claimed) == [plain, doomed]
        await two.request_cancel(doomed)
        await two.stop_node("node-0", "stopped")

        info = await two.get(plain)
        assert info.status is Status.WAITING
        assert info.attempts_used == 0  # refunded: the node never ran it to an end
        assert info.owner_node is None
        assert info.reason is not None
        assert info.reason.startswith("handed back without using an attempt: node node-0")
        assert (await two.get(doomed)).status is Status.CANCELLED

        assert await one.claim("node-0", Limits(max_parallel=4), lease_ttl_s=30) == []
        assert (await two.get(plain)).status is Status.WAITING
        (again,) = await two.claim("node-1", Limits(max_parallel=4), lease_ttl_s=30)
        assert again.task.id == plain
        assert again.task.attempts_used == 1


# --- rules at their boundaries, on a clock the test moves (SQLite, MemoryStore) ---------


class Clock:
    """UNIX time that moves only when the test moves it (in whole seconds and halves from
    a whole second, exact in a float: a boundary is hit exactly)."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now


def _clocked_memory(clock: Clock) -> Store:
    store = MemoryStore()
    store.clock = clock
    return store


CLOCKED: dict[str, Callable[[Path, Clock], Store]] = {
    "sqlite": lambda tmp, clock: SQLiteStore(tmp / "clocked.db", clock=clock),
    "memory": lambda tmp, clock: _clocked_memory(clock),
}


@pytest.fixture(params=sorted(CLOCKED))
def clocked(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Opener, Clock]:
    """Opens handles onto one fresh database whose store decides on the test's clock."""
    clock = Clock()
    make = CLOCKED[request.param]
    store = make(tmp_path, clock)
    return (lambda: store if isinstance(store, MemoryStore) else make(tmp_path, clock)), clock


async def test_a_lease_counts_through_its_expiry_instant_and_no_longer(
    clocked: tuple[Opener, Clock],
) -> None:
    """At its expiry instant a lease still blocks its lock and is not rescued; just after,
    the lock is free for another node and the attempt is rescued."""
    opener, clock = clocked
    async with handles(opener, 2) as (one, two):
        first = await one.submit(TaskSpec.build(["true"], locks=["x"]))
        second = await one.submit(TaskSpec.build(["true"], locks=["x"]))
        (held,) = await one.claim("node-0", Limits(), lease_ttl_s=30)
        assert held.task.id == first
        clock.now += 30
        assert await two.claim("node-1", Limits(), lease_ttl_s=30) == []
        assert await two.rescue_expired() == []
        clock.now += 0.5
        (taken,) = await two.claim("node-1", Limits(), lease_ttl_s=30)
        assert taken.task.id == second
        (rescued,) = await two.rescue_expired()
        assert (rescued.id, rescued.status) == (first, Status.LOST)


async def test_a_renewal_extends_the_lease_from_when_it_is_made(
    clocked: tuple[Opener, Clock],
) -> None:
    """A lease renewed before it runs out lasts its TTL from the renewal, and past the
    first expiry nobody may rescue it."""
    opener, clock = clocked
    async with handles(opener, 1) as (store,):
        task = await store.submit(TaskSpec.build(["true"]))
        (claim,) = await store.claim("node-0", Limits(), lease_ttl_s=30)
        clock.now += 20
        assert (await store.renew_leases("node-0", 30)).held == {task: claim.fence}
        clock.now += 20  # past the first expiry, within the renewed lease
        assert await store.rescue_expired() == []
        assert (await store.get(task)).lease_expires_at == pytest.approx(clock.now + 10)


async def test_a_retry_waits_out_its_backoff(clocked: tuple[Opener, Clock]) -> None:
    """A failed attempt with attempts left is claimable again exactly when its backoff
    has passed, not a moment before."""
    opener, clock = clocked
    async with handles(opener, 1) as (store,):
        task = await store.submit(TaskSpec.build(["true"], max_attempts=2, retry_backoff_s=10))
        (claim,) = await store.claim("node-0", Limits(), lease_ttl_s=30)
        failed = Outcome(OutcomeKind.EXITED, "exited with code 1", 1)
        info = await store.finish(task, claim.fence, failed)
        assert info.status is Status.WAITING
        assert info.reason == "exited with code 1; retrying in 10 s (attempt 2 of 2)"
        clock.now += 9.5
        assert await store.claim("node-0", Limits(), lease_ttl_s=30) == []
        clock.now += 0.5
        (again,) = await store.claim("node-0", Limits(), lease_ttl_s=30)
        assert (again.task.id, again.task.attempts_used) == (task, 2)


# --- retention: prune ------------------------------------------------------------------

FAILED_1 = Outcome(OutcomeKind.EXITED, "exited with code 1", 1)


async def _finished(store: Store, n: int, outcome: Outcome = EXITED_0, **spec: object) -> list[int]:
    """`n` tasks run to their end through the store as a pool would, with output."""
    ids = [await store.submit(TaskSpec.build(["true"], **spec)) for _ in range(n)]  # type: ignore[arg-type]
    claims = await store.claim("node-0", Limits(max_parallel=n), lease_ttl_s=30)
    assert sorted(c.task.id for c in claims) == ids
    for claim in claims:
        await store.append_output(claim.task.id, claim.fence, ["out 1\n", "out 2\n"])
        await store.finish(claim.task.id, claim.fence, outcome)
    return ids


async def _gone(store: Store, task_id: int) -> bool:
    """Nothing of the task left: no row, no events, no output."""
    try:
        await store.get(task_id)
    except TaskNotFound:
        pass
    else:
        return False
    if await store.events(task_id):
        return False
    try:
        return await store.read_output(task_id) == []
    except TaskNotFound:  # MemoryStore says so where the SQL stores find no rows
        return True


async def _latest_finish(store: Store, ids: list[int]) -> float:
    return max([(await store.get(i)).finished_at or 0.0 for i in ids])


async def test_prune_never_touches_waiting_or_running_tasks(opener: Opener) -> None:
    """Even a policy that keeps no finished task leaves waiting and running tasks, with
    their events and output, as they were; every finished task goes with its events and
    output."""
    async with handles(opener, 1) as (store,):
        done = await _finished(store, 3)
        running = await store.submit(TaskSpec.build(["sleep", "9"]))
        (claim,) = await store.claim("node-0", Limits(max_parallel=1), lease_ttl_s=30)
        await store.append_output(running, claim.fence, ["still going\n"])
        waiting = await store.submit(TaskSpec.build(["true"], not_before=time.time() + 3600))
        before = {t: await store.events(t) for t in (running, waiting)}
        report = await store.prune(Retention(older_than_s=0, keep_last=0), now=time.time() + 60)
        assert (report.tasks, report.attempts, report.events, report.output_chunks) == (3, 3, 9, 6)
        assert [await _gone(store, t) for t in done] == [True] * 3
        assert (await store.get(running)).status is Status.RUNNING
        assert (await store.get(waiting)).status is Status.WAITING
        assert {t: await store.events(t) for t in (running, waiting)} == before
        assert [c.text for c in await store.read_output(running)] == ["still going\n"]
        # The running one still ends normally, and is then pruned like any other.
        await store.finish(running, claim.fence, EXITED_0)
        again = await store.prune(Retention(older_than_s=0), now=time.time() + 60)
        assert again.tasks == 1
        assert await _gone(store, running)


async def test_prune_dry_run_removes_nothing_and_reports_what_a_prune_removes(
    opener: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dry run counts exactly what the real prune then removes (across batches)."""
    monkeypatch.setattr("taskpool.stores._prune.BATCH_TASKS", 2)
    async with handles(opener, 1) as (store,):
        old = await _finished(store, 5)
        kept = await _finished(store, 1, FAILED_1)
        policy = Retention(older_than_s=60, per_status={"failed": None})
        now = await _latest_finish(store, old + kept) + 120
        dry = await store.prune(policy, now=now, dry_run=True)
        assert dry.dry_run
        assert [await _gone(store, t) for t in old + kept] == [False] * 6
        real = await store.prune(policy, now=now)
        assert not real.dry_run
        counts = (dry.tasks, dry.attempts, dry.events, dry.output_chunks)
        assert counts == (real.tasks, real.attempts, real.events, real.output_chunks)
        assert counts == (5, 5, 15, 10)
        assert [await _gone(store, t) for t in old] == [True] * 5
        assert (await store.get(kept[0])).status is Status.FAILED
        assert (await store.prune(policy, now=now)).tasks == 0


async def test_prune_respects_per_status_ages_and_keep_last(opener: Opener) -> None:
    """Succeeded tasks go after `older_than_s`, failed ones after their own longer age;
    `keep_last` keeps only the most recently finished, whatever their age."""
    async with handles(opener, 1) as (store,):
        succeeded = await _finished(store, 2)
        failed = await _finished(store, 2, FAILED_1)
        finished = succeeded + failed
        now = await _latest_finish(store, finished) + 500
        policy = Retention(older_than_s=100, per_status={"failed": 1000})
        report = await store.prune(policy, now=now)
        assert report.tasks == 2
        assert [await _gone(store, t) for t in finished] == [True, True, False, False]
        later = await store.prune(policy, now=now + 1000)
        assert later.tasks == 2
        assert [await _gone(store, t) for t in failed] == [True, True]

        newer = await _finished(store, 4)
        by_count = await store.prune(Retention(older_than_s=None, keep_last=1), now=now)
        assert by_count.tasks == 3
        assert [await _gone(store, t) for t in newer] == [True, True, True, False]


async def test_prune_can_drop_output_alone(opener: Opener) -> None:
    """`output_older_than_s` drops the output of old tasks and keeps their rows, attempts
    and events; younger tasks keep their output."""
    async with handles(opener, 1) as (store,):
        (task,) = await _finished(store, 1)
        events = await store.events(task)
        now = await _latest_finish(store, [task]) + 500
        young = Retention(older_than_s=None, output_older_than_s=1000)
        assert (await store.prune(young, now=now)).output_chunks == 0
        assert len(await store.read_output(task)) == 2
        old = Retention(older_than_s=None, output_older_than_s=100)
        report = await store.prune(old, now=now)
        assert (report.tasks, report.output_tasks, report.output_chunks) == (0, 1, 2)
        assert await store.read_output(task) == []
        assert (await store.get(task)).status is Status.SUCCEEDED
        assert await store.events(task) == events


async def test_concurrent_prunes_share_the_work_safely(
    opener: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two handles pruning at once remove every prunable task once between them (their
    counts add up to what there was), and nothing else."""
    monkeypatch.setattr("taskpool.stores._prune.BATCH_TASKS", 3)
    async with handles(opener, 2) as (one, two):
        doomed = await _finished(one, 20)
        waiting = await one.submit(TaskSpec.build(["true"], not_before=time.time() + 3600))
        now = await _latest_finish(one, doomed) + 60
        reports: list[PruneReport] = []

        async def prune(store: Store) -> None:
            reports.append(await store.prune(Retention(older_than_s=0), now=now))

        async with anyio.create_task_group() as tg:
            tg.start_soon(prune, one)
            tg.start_soon(prune, two)
        assert sum(r.tasks for r in reports) == 20
        assert sum(r.events for r in reports) == 60
        assert sum(r.output_chunks for r in reports) == 40
        assert [await _gone(two, t) for t in doomed] == [True] * 20
        assert (await two.get(waiting)).status is Status.WAITING


async def test_waiting_ahead_follows_the_claims_queue_order(opener: Opener) -> None:
    """The waiting tasks due now that a claim considers before a task: higher priority
    first, then submit order; not the running, nor those whose start time is ahead."""
    async with handles(opener, 1) as (store,):
        a, b, c = [await store.submit(TaskSpec.build(["true"], priority=p)) for p in (0, 0, 5)]
        later = await store.submit(TaskSpec.build(["true"], not_before=time.time() + 3600))
        e, f = [await store.submit(TaskSpec.build(["true"], priority=p)) for p in (0, 5)]
        (claimed,) = await store.claim("node-0", Limits(max_parallel=1), lease_ttl_s=60)
        assert claimed.task.id == c
        assert [t.id for t in await store.waiting_ahead(e, limit=10)] == [f, a, b]
        assert [t.id for t in await store.waiting_ahead(e, limit=2)] == [f, a]
        assert await store.waiting_ahead(f, limit=10) == []
        assert [t.id for t in await store.waiting_ahead(later, limit=10)] == [f, a, b]
        assert await store.waiting_ahead(e, limit=10) == [await store.get(t) for t in (f, a, b)]
        with pytest.raises(TaskNotFound):
            await store.waiting_ahead(99, limit=10)


async def test_a_node_keeps_the_project_limits_it_registered_with(opener: Opener) -> None:
    async with handles(opener, 1) as (store,):
        now = time.time()
        limited = NodeInfo(
            "limited", "host", os.getpid(), now, now, now, None, 2, project_limits={"infra": 1}
        )
        await store.register_node(limited)
        nodes = {n.id: n for n in await store.list_nodes()}
        assert nodes["limited"] == limited
        assert nodes["node-0"].project_limits == {}


async def test_a_node_keeps_the_fair_share_it_registered_with(opener: Opener) -> None:
    """Off (None), on with every project 1 ({}) and weighted are three different
    settings, kept as registered, through a handle opened afterwards too."""
    now = time.time()
    fair = {
        "off": None,
        "even": {},
        "weighted": {"a": 3.0, "b": 0.5},
    }
    registered = [
        NodeInfo(node_id, "host", os.getpid(), now, now, now, None, 2, fair_share=weights)
        for node_id, weights in fair.items()
    ]
    async with handles(opener, 1) as (store,):
        for node in registered:
            await store.register_node(node)
        nodes = {n.id: n for n in await store.list_nodes()}
        assert [nodes[n.id] for n in registered] == registered
        assert nodes["node-0"].fair_share is None  # registered without it
    async with opener() as reopened:
        nodes = {n.id: n for n in await reopened.list_nodes()}
        assert {n: nodes[n].fair_share for n in fair} == fair


async def test_cancel_requests_name_the_nodes_running_attempts(opener: Opener) -> None:
    """`cancel_requests` lists, with their fence and mode, the cancels asked of the
    running attempts the node owns, through any handle; no other node's, nothing ended."""
    async with handles(opener, 3) as (owner, other, operator):
        mine = [await owner.submit(TaskSpec.build(["true"])) for _ in range(2)]
        claims = await owner.claim("node-0", Limits(max_parallel=2), lease_ttl_s=30)
        fences = {c.task.id: c.fence for c in claims}
        theirs = await other.submit(TaskSpec.build(["true"]))
        await other.claim("node-1", Limits(), lease_ttl_s=30)
        assert await owner.cancel_requests("node-0") == {}
        await operator.request_cancel(mine[0])
        await operator.request_cancel(theirs, force=True)
        assert await owner.cancel_requests("node-0") == {
            mine[0]: (fences[mine[0]], CancelMode.GRACEFUL)
        }
        assert await owner.cancel_requests("node-1") == {theirs: (1, CancelMode.FORCE)}
        await operator.request_cancel(mine[0], force=True)
        await operator.request_cancel(mine[1], force=True)
        assert await owner.cancel_requests("node-0") == {
            task: (fences[task], CancelMode.FORCE) for task in mine
        }
        await owner.finish(mine[0], fences[mine[0]], EXITED_0)
        assert await owner.cancel_requests("node-0") == {
            mine[1]: (fences[mine[1]], CancelMode.FORCE)
        }


async def test_a_cancel_through_another_handle_wakes_the_owners_watch(opener: Opener) -> None:
    """`watch_for_cancels` calls back once when it starts, then after a cancel asked
    through another handle of a task the node runs."""
    async with handles(opener, 2) as (owner, operator):
        task = await owner.submit(TaskSpec.build(["true"]))
        await owner.claim("node-0", Limits(), lease_ttl_s=30)
        calls: list[anyio.Event] = [anyio.Event()]

        def on_cancel() -> None:
            calls[-1].set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(owner.watch_for_cancels, "node-0", on_cancel)
            with anyio.fail_after(SAFETY_TIMEOUT_S):
                await calls[-1].wait()  # watching began
                calls.append(anyio.Event())
                await operator.request_cancel(task)
                await calls[-1].wait()
            tg.cancel_scope.cancel()
        assert await owner.cancel_requests("node-0") == {task: (1, CancelMode.GRACEFUL)}
