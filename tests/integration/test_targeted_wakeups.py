"""PostgreSQL wakes nodes only for work (migration 0007), once per transaction.

Notifications are counted on a LISTEN connection of the test's; each step is followed
by a sentinel NOTIFY from another connection, and since notifications arrive in commit
order, those before the sentinel are exactly the step's. Claims are counted by a store
that counts its calls; pools poll only once an hour, so every claim they make was
asked for by a notification (or their start).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio
import asyncpg

from taskpool import Client, Limits, NodeInfo, Status, TaskSpec
from taskpool._models import Claim, Outcome, OutcomeKind
from taskpool.stores import node_connections
from taskpool.stores.postgres import WORK_CHANNEL, PostgresStore
from tests.helpers import SAFETY_TIMEOUT_S, eventually, fast_pool
from tests.postgres import fresh_postgres_database

EXITED_0 = Outcome(OutcomeKind.EXITED, "exited with code 0", 0)


class Notifications:
    """What a LISTEN connection hears on the work channel, step by step."""

    def __init__(self, listening: asyncpg.Connection, other: asyncpg.Connection) -> None:
        self._other = other
        self._heard: list[str] = []
        self._arrived = anyio.Event()
        listening_to = self

        def heard(_c: object, _pid: int, _channel: str, payload: str) -> None:
            listening_to._heard.append(payload)
            listening_to._arrived.set()

        self.listener = heard

    async def step(self) -> list[str]:
        """The payloads committed since the last step."""
        await self._other.execute(f"NOTIFY {WORK_CHANNEL}, 'sentinel'")
        with anyio.fail_after(SAFETY_TIMEOUT_S):
            while "sentinel" not in self._heard:
                self._arrived = anyio.Event()
                await self._arrived.wait()
        end = self._heard.index("sentinel")
        heard, self._heard = self._heard[:end], self._heard[end + 1 :]
        return heard


@asynccontextmanager
async def notifications(dsn: str) -> AsyncIterator[Notifications]:
    listening = await asyncpg.connect(dsn)
    other = await asyncpg.connect(dsn)
    try:
        heard = Notifications(listening, other)
        await listening.add_listener(WORK_CHANNEL, heard.listener)
        yield heard
    finally:
        await listening.close()
        await other.close()


async def test_each_transaction_says_work_or_end_once() -> None:
    async with (
        fresh_postgres_database() as dsn,
        PostgresStore(dsn, max_size=2) as store,
        notifications(dsn) as heard,
    ):
        now = time.time()
        await store.register_node(NodeInfo("node", "host", 1, now, now, now, None, 3))
        limits = Limits(3)
        fences: dict[int, int] = {}

        async def finish_and_claim(task_id: int) -> list[int]:
            claims = await store.finish_and_claim(
                task_id,
                fences.pop(task_id),
                EXITED_0,
                node_id="node",
                limits=limits,
                lease_ttl_s=60.0,
            )
            fences.update((c.task.id, c.fence) for c in claims)
            return [c.task.id for c in claims]

        assert await heard.step() == []
        a = await store.submit(TaskSpec.build(["true"]))
        assert await heard.step() == ["work"]  # claimable
        b, c, d = await store.submit_many([TaskSpec.build(["true"]) for _ in range(3)])
        assert await heard.step() == ["work"]  # once for the whole transaction

        claimed = await store.claim("node", limits, 60.0)
        fences.update((x.task.id, x.fence) for x in claimed)
        assert list(fences) == [a, b, c]
        assert await heard.step() == ["work"]  # it filled the node: the rest is others'

        assert await finish_and_claim(a) == [d]
        # Two commits, the finish and then the claim (a claim's locks are held for its
        # own statement only), each saying one thing: the end for waiters, then work
        # for the other nodes, as the claim filled this one.
        assert await heard.step() == ["end", "work"]

        assert await finish_and_claim(b) == []
        assert await heard.step() == ["end"]  # nothing to claim: no node is woken

        e = await store.submit(TaskSpec.build(["true"]))
        assert await heard.step() == ["work"]
        assert await finish_and_claim(c) == [e]
        assert await heard.step() == ["end"]  # it took all its end freed, with room left

        await store.finish(d, fences.pop(d), EXITED_0)
        assert await heard.step() == ["work"]  # a plain finish claims nothing itself

        waiting = await store.submit(TaskSpec.build(["true"]))
        assert await heard.step() == ["work"]
        await store.request_cancel(waiting)
        assert await heard.step() == ["end"]  # a waiting task ended: it freed nothing

        assert await finish_and_claim(e) == []
        assert await heard.step() == ["end"]

        expired = await store.submit(TaskSpec.build(["true"], max_attempts=1))
        assert await heard.step() == ["work"]
        (lapsed,) = await store.claim("node", limits, -1.0)  # its lease has run out
        assert await heard.step() == []  # a claim that filled nothing: nothing left
        assert [t.id for t in await store.rescue_expired()] == [lapsed.task.id] == [expired]
        assert (await store.get(expired)).status is Status.LOST
        assert await heard.step() == ["work"]  # lost: what it held is free for anyone


class CountingStore(PostgresStore):
    """Counts the claim transactions a node runs."""

    def __init__(self, dsn: str, max_parallel: int) -> None:
        super().__init__(dsn, max_size=node_connections(max_parallel))
        self.claims = 0  # from the claim loop (woken, or at start)
        self.finish_claims = 0  # a runner's end, claiming in the same transaction

    async def claim(self, node_id: str, limits: Limits, lease_ttl_s: float) -> list[Claim]:
        self.claims += 1
        return await super().claim(node_id, limits, lease_ttl_s)

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
        self.finish_claims += 1
        return await super().finish_and_claim(
            task_id, fence, outcome, node_id=node_id, limits=limits, lease_ttl_s=lease_ttl_s
        )


@asynccontextmanager
async def nodes(
    dsn: str, stack: AsyncExitStack, count: int, max_parallel: int
) -> AsyncIterator[list[CountingStore]]:
    stores = []
    for _ in range(count):
        store = await stack.enter_async_context(CountingStore(dsn, max_parallel))
        await stack.enter_async_context(
            fast_pool(store, max_parallel=max_parallel, poll_interval_s=3600.0)
        )
        stores.append(store)
    yield stores


async def test_a_task_end_wakes_no_node_and_a_submit_each_idle_node_once() -> None:
    """K idle nodes, tasks run one after another: each task costs at most one claim per
    node (woken by its submit) plus its own end's; its end wakes nobody (before
    migration 0007 it woke all K to claim again: 2K + 1 per task)."""
    k, n = 4, 8
    async with fresh_postgres_database() as dsn, AsyncExitStack() as stack:
        client = await stack.enter_async_context(Client(dsn))
        stores = await stack.enter_async_context(nodes(dsn, stack, k, max_parallel=2))

        async def all_listening() -> bool:  # each node's LISTEN said 'work' on connecting
            return len(await client.nodes(alive=True)) == k and all(s.claims >= 1 for s in stores)

        await eventually(all_listening)
        with anyio.fail_after(SAFETY_TIMEOUT_S):
            for _ in range(n):
                task = await client.submit(["true"])
                assert (await client.wait(task)).status is Status.SUCCEEDED
        assert sum(s.finish_claims for s in stores) == n
        # Start-up, then per submit one claim per node, plus each end's own claim (a
        # `finish_and_claim` commits its finish, then claims through `claim`).
        assert sum(s.claims for s in stores) <= 2 * k + n * k + n


async def test_a_full_node_runs_no_claim_when_woken(tmp_path: Path) -> None:
    """A node whose slot is taken is notified of every submit and every claim that
    fills a node, and claims nothing: it claims when its own runner ends."""
    go = tmp_path / "go"
    async with fresh_postgres_database() as dsn, AsyncExitStack() as stack:
        client = await stack.enter_async_context(Client(dsn))
        (full,) = await stack.enter_async_context(nodes(dsn, stack, 1, max_parallel=1))
        blocker = await client.submit(["sh", "-c", f"while [ ! -e {go} ]; do sleep 0.01; done"])

        async def blocker_runs() -> bool:
            return (await client.get(blocker)).pid is not None

        await eventually(blocker_runs)
        claims_while_full = full.claims
        (other,) = await stack.enter_async_context(nodes(dsn, stack, 1, max_parallel=1))
        for _ in range(5):  # each: a submit ('work'), a claim that fills `other` ('work')
            task = await client.submit(["true"])
            assert (await client.wait(task)).status is Status.SUCCEEDED
        assert other.finish_claims == 5
        assert full.claims == claims_while_full
        go.touch()
        assert (await client.wait(blocker)).status is Status.SUCCEEDED
        assert full.finish_claims == 1
