"""`why` on real stores with real pools: each kind of block gives its exact text,
naming the task, node and host that hold it; the queue ahead is read from the store."""

from __future__ import annotations

import os
import socket
import time

import pytest

from taskpool import (
    Client,
    Limits,
    NodeInfo,
    Status,
    Store,
    TaskInfo,
    TaskPool,
    TaskSpec,
    WaitKind,
    WaitReason,
)
from taskpool._client import QUEUE_READ
from taskpool._explain import READY_TEXT, duration, utc
from tests.helpers import eventually, fast_pool, running

HOST = socket.gethostname()


def held_by(what: str, reason: WaitReason, pool: TaskPool, holder_started: float | None) -> str:
    assert pool.node is not None
    assert holder_started is not None
    return (
        f"{what} is held by task {reason.holder_ids[0]} (running on node {pool.node.id[:8]}"
        f" on host {HOST} for {duration(reason.at - holder_started)})"
    )


async def test_holders_limits_and_full_nodes_give_their_exact_text(database: str) -> None:
    """A template holder, a lock holder, a project at its limit and a full node, as a
    pool runs them; then no live node once the pool has stopped."""
    async with fast_pool(database, max_parallel=4, project_limits={"infra": 1}) as pool:
        assert pool.node is not None
        holder_t = await pool.submit(["sleep", "600"], template="apply-prod")
        holder_l = await pool.submit(["sleep", "600"], locks=["prod-state"])
        holder_p = await pool.submit(["sleep", "600"], project="infra")
        started = {t: (await running(pool, t)).started_at for t in (holder_t, holder_l, holder_p)}
        by_template = await pool.submit(["true"], template="apply-prod")
        by_lock = await pool.submit(["true"], locks=["prod-state"])
        by_project = await pool.submit(["true"], project="infra")

        [reason] = await pool.why(by_template)
        assert (reason.kind, reason.subject, reason.holder_ids) == (
            WaitKind.TEMPLATE,
            "apply-prod",
            (holder_t,),
        )
        assert reason.text == held_by("template 'apply-prod'", reason, pool, started[holder_t])
        [reason] = await pool.why(by_lock)
        assert (reason.kind, reason.holder_ids) == (WaitKind.LOCK, (holder_l,))
        assert reason.text == held_by("lock 'prod-state'", reason, pool, started[holder_l])
        [reason] = await pool.why(by_project)
        assert (reason.kind, reason.limit, reason.holder_ids) == (
            WaitKind.PROJECT_LIMIT,
            1,
            (holder_p,),
        )
        assert reason.text == f"project 'infra' is at its limit 1: task {holder_p}"

        filler = await pool.submit(["sleep", "600"])
        await running(pool, filler)
        plain = await pool.submit(["true"])
        async with Client(database) as client:  # a client of its own says the same
            [reason] = await client.why(plain)
            assert reason.kind is WaitKind.NODES_FULL
            assert reason.text == f"every node is full (4/4 on {HOST})"
            full_and_held = await client.why(by_template)
            assert [r.kind for r in full_and_held] == [WaitKind.NODES_FULL, WaitKind.TEMPLATE]
            assert await client.why(holder_t) == []  # running: not waiting
    async with Client(database) as client:  # the pool stopped: its tasks went back to waiting
        assert (await client.get(holder_t)).status is Status.WAITING
        [reason] = await client.why(holder_t)
        assert reason.kind is WaitKind.NO_LIVE_NODE
        assert reason.text == "no live node: no worker is running on this store"


async def test_start_time_and_retry_backoff_give_their_exact_text(database: str) -> None:
    async with fast_pool(database) as pool:
        later = await pool.submit(["true"], not_before=time.time() + 3600)
        flaky = await pool.submit(["sh", "-c", "exit 3"], max_attempts=2, retry_backoff_s=3600)

        async def backing_off() -> bool:
            info = await pool.get(flaky)
            return info.status is Status.WAITING and info.attempts_used == 1

        await eventually(backing_off)
        info = await pool.get(later)
        [reason] = await pool.why(later)
        until = info.spec.not_before
        assert until is not None
        assert (reason.kind, reason.until) == (WaitKind.NOT_BEFORE, until)
        assert reason.text == f"not before {utc(until)} (in {duration(until - reason.at)})"
        info = await pool.get(flaky)
        [reason] = await pool.why(flaky)
        until = info.spec.not_before
        assert until is not None
        assert reason.kind is WaitKind.RETRY_BACKOFF
        assert reason.text == (
            f"retry backoff until {utc(until)} (in {duration(until - reason.at)});"
            f" last attempt: {info.reason}"
        )
        assert info.reason is not None
        assert info.reason.startswith("exited with code 3")


async def test_nodes_that_disagree_on_a_project_limit_are_named(database: str) -> None:
    """Two pools started with limits 1 and 2 for one project: the highest counts, and
    the text says which node has which."""
    async with (
        fast_pool(database, project_limits={"infra": 1}) as one,
        fast_pool(database, project_limits={"infra": 2}) as two,
    ):
        assert one.node is not None
        assert two.node is not None
        first = await one.submit(["sleep", "600"], project="infra")
        second = await one.submit(["sleep", "600"], project="infra")
        await running(one, first)
        await running(one, second)
        third = await one.submit(["true"], project="infra")
        [reason] = await two.why(third)
        assert (reason.kind, reason.limit) == (WaitKind.PROJECT_LIMIT, 2)
        assert reason.text == (
            f"project 'infra' is at its limit 2: tasks {first}, {second} (live nodes disagree"
            f" on its limit: 1 on {HOST} (node {one.node.id[:8]}), 2 on {HOST}"
            f" (node {two.node.id[:8]}); the highest counts)"
        )
        nodes = {n.id: n for n in await one.nodes(alive=True)}
        assert nodes[one.node.id].project_limits == {"infra": 1}
        assert nodes[two.node.id].project_limits == {"infra": 2}


async def test_tasks_ahead_in_the_queue_are_read_from_the_store(database: str) -> None:
    """A node with one free slot (registered, not claiming): the first of the queue
    would be claimed; the others wait behind it, whatever the store's queue order."""
    async with Client(database) as client:
        now = time.time()
        await client.store.register_node(
            NodeInfo("idle-node", "web-9", os.getpid(), now, now, now, None, 1)
        )
        first = await client.submit(["true"])
        second = await client.submit(["true"])
        urgent = await client.submit(["true"], priority=5)
        later = await client.submit(["true"], priority=9, not_before=time.time() + 3600)
        assert await client.why(urgent) == []
        [reason] = await client.why(first)
        assert (reason.kind, reason.ahead) == (WaitKind.BEHIND, 1)
        assert reason.text == "waiting behind 1 earlier task that a node will claim first"
        why = await client.why_many([await client.get(t) for t in (first, second, urgent, later)])
        assert [r.ahead for r in why[second]] == [1]  # one slot: one task goes first
        assert why[urgent] == []
        assert [r.kind for r in why[later]] == [WaitKind.NOT_BEFORE]
        assert READY_TEXT == "nothing holds it: a node will claim it at its next claim"


def recording(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The limits of every `waiting_ahead` read the client makes from now on."""
    limits: list[int] = []
    read = store.waiting_ahead

    async def recorded(task_id: int, *, limit: int) -> list[TaskInfo]:
        limits.append(limit)
        return await read(task_id, limit=limit)

    monkeypatch.setattr(store, "waiting_ahead", recorded)
    return limits


async def idle_node(store: Store, max_parallel: int) -> None:
    """A live node that never claims: the queue stays as the test makes it."""
    now = time.time()
    await store.register_node(
        NodeInfo("idle-node", "web-9", os.getpid(), now, now, now, None, max_parallel)
    )


async def test_a_long_queue_is_read_only_until_it_fills_every_node(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Client(database) as client:
        await idle_node(client.store, 2)
        await client.submit_many([TaskSpec.build(["true"]) for _ in range(2 * QUEUE_READ)])
        deep = await client.submit(["true"])
        limits = recording(client.store, monkeypatch)
        [reason] = await client.why(deep)
        assert (reason.kind, reason.ahead) == (WaitKind.BEHIND, 2)
        assert limits == [QUEUE_READ]  # its first part fills both free slots


async def test_a_queue_of_blocked_tasks_is_read_through(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tasks ahead that are blocked leave the slots free: the reader reads on until it
    can tell, here to the end of the queue ahead."""
    async with Client(database) as client:
        store = client.store
        await idle_node(store, 2)
        holder = await client.submit(["true"], locks=["db"])
        [claim] = await store.claim("idle-node", Limits(max_parallel=1), lease_ttl_s=600)
        assert claim.task.id == holder
        await client.submit_many([TaskSpec.build(["true"], locks=["db"]) for _ in range(600)])
        last = await client.submit(["true"])
        limits = recording(store, monkeypatch)
        assert await client.why(last) == []  # every task ahead is blocked by the lock
        assert limits == [QUEUE_READ, 4 * QUEUE_READ]  # the whole queue ahead, 600 tasks


async def test_a_task_waiting_for_the_only_fair_node_is_told_its_project_weight(
    database: str,
) -> None:
    """The only live node shares its one slot fairly: the task waiting for it is told
    so, with what its project weighs there; the reason itself is unchanged."""
    async with fast_pool(database, max_parallel=1, fair_share={"a": 3}) as pool:
        holder = await pool.submit(["sleep", "600"], project="a")
        await running(pool, holder)
        waiter = await pool.submit(["true"], project="b")
        fair = (
            f"{HOST} shares slots fairly across projects (a=3, others 1): project 'b'"
            " weighs 1, so another project's task may start first"
        )
        [reason] = await pool.why(waiter)
        assert reason.kind is WaitKind.NODES_FULL
        assert reason.text == f"every node is full (1/1 on {HOST}); {fair}"
        async with Client(database) as client:  # a client of its own says the same
            assert [r.text for r in await client.why(waiter)] == [reason.text]
