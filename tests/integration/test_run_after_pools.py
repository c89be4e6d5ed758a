"""Run-after dependencies with real pools and processes, on SQLite and PostgreSQL:
a dependant never starts before its dependencies succeeded (the store's events say
so), starts promptly once they did, and several nodes claiming while several
clients submit chains end every task exactly as the rules say."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import anyio

from taskpool import Client, Status, TaskEvent, TaskInfo, TaskPool, TaskSpec, WaitKind
from tests.helpers import SAFETY_TIMEOUT_S, fast_pool, running


def first(events: list[TaskEvent], to: Status) -> TaskEvent:
    return next(e for e in events if e.to_status is to)


async def assert_ran_after(
    client: Client | TaskPool, task: int, dependencies: tuple[int, ...]
) -> None:
    """The task's first start is logged after each dependency's success, in the store's
    own order (event ids) and clock."""
    started = first(await client.events(task), Status.RUNNING)
    for dependency in dependencies:
        succeeded = first(await client.events(dependency), Status.SUCCEEDED)
        assert succeeded.id < started.id, (task, dependency)
        assert succeeded.at <= started.at, (task, dependency)


async def test_apply_starts_after_init_succeeded_woken_not_polled(database: str) -> None:
    """With an hour between idle polls, `apply` still starts once `init` succeeded
    (the end that releases it wakes the nodes), and never before."""
    async with fast_pool(database, poll_interval_s=3600.0) as pool:
        init = await pool.submit(["sh", "-c", "echo init"])
        apply = await pool.submit(["sh", "-c", "echo apply"], after=[init])
        with anyio.fail_after(SAFETY_TIMEOUT_S):
            done = await pool.wait(apply)
        assert done.status is Status.SUCCEEDED
        assert await pool.output(apply) == "apply\n"
        await assert_ran_after(pool, apply, (init,))


async def test_a_failed_init_cancels_apply_which_never_runs(database: str) -> None:
    """A failing `init` leaves `apply` cancelled with the reason, never started."""
    async with fast_pool(database) as pool:
        init = await pool.submit(["sh", "-c", "exit 3"])
        apply = await pool.submit(["true"], after=[init])
        with anyio.fail_after(SAFETY_TIMEOUT_S):
            done = await pool.wait(apply)
        assert (done.status, done.reason) == (Status.CANCELLED, f"dependency {init} failed")
        assert [e.to_status for e in await pool.events(apply)] == [
            Status.WAITING,
            Status.CANCELLED,
        ]


CLIENTS = 3
CHAINS = 6  # per client


async def submit_chains(
    client: Client, index: int, chains: list[tuple[bool, int, int, int, int]]
) -> None:
    """Submit chains root -> mid -> leaf (leaf also after root) -> tail, one call at a
    time so that nodes claim and end roots meanwhile; every third root fails."""
    for n in range(CHAINS):
        ok = (index + n) % 3 != 0
        root = await client.submit(["true"] if ok else ["sh", "-c", "exit 1"])
        mid = await client.submit(["true"], after=[root])
        if n % 2:  # through submit_many too
            [leaf] = await client.submit_many([TaskSpec.build(["true"], after=[mid, root])])
        else:
            leaf = await client.submit(["true"], after=[root, mid])
        tail = await client.submit(["true"], after=[leaf])
        chains.append((ok, root, mid, leaf, tail))


async def race(database: str, nodes: int) -> None:
    """`nodes` pools on `database` claim while clients submit chains; every task ends
    as the rules say, none left waiting, none started early."""
    chains: list[tuple[bool, int, int, int, int]] = []
    async with AsyncExitStack() as stack:
        pools: list[TaskPool] = [
            await stack.enter_async_context(fast_pool(database, max_parallel=3))
            for _ in range(nodes)
        ]
        clients = [
            await stack.enter_async_context(Client(database, poll_interval_s=0.1))
            for _ in range(CLIENTS)
        ]
        with anyio.fail_after(SAFETY_TIMEOUT_S * 2):
            async with anyio.create_task_group() as tg:
                for i, client in enumerate(clients):
                    tg.start_soon(submit_chains, client, i, chains)
            client = clients[0]
            ended: dict[int, TaskInfo] = {}
            for chain in chains:
                for task in chain[1:]:
                    ended[task] = await client.wait(task)
        assert len(chains) == CLIENTS * CHAINS
        for ok, root, mid, leaf, tail in chains:
            if ok:
                assert {ended[t].status for t in (root, mid, leaf, tail)} == {Status.SUCCEEDED}
                await assert_ran_after(client, mid, (root,))
                await assert_ran_after(client, leaf, (root, mid))
                await assert_ran_after(client, tail, (leaf,))
                continue
            said = f"dependency {root} failed"
            assert ended[root].status is Status.FAILED
            assert (ended[mid].status, ended[mid].reason) == (Status.CANCELLED, said)
            assert (ended[leaf].status, ended[leaf].reason) == (Status.CANCELLED, said)
            assert (ended[tail].status, ended[tail].reason) == (
                Status.CANCELLED,
                f"dependency {leaf} was cancelled: {said}",
            )
            for task in (mid, leaf, tail):
                events = await client.events(task)
                assert Status.RUNNING not in [e.to_status for e in events], task
        ran_on = {
            e.node_id
            for chain in chains
            for task in chain[1:]
            for e in await client.events(task)
            if e.to_status is Status.RUNNING
        }
        assert ran_on <= {p.node_id for p in pools}


async def test_nodes_race_chains_that_several_clients_submit(database: str) -> None:
    """Three pools on one PostgreSQL database (two on one SQLite file) claim while
    three clients submit chains: exact ends and reasons, nothing started early."""
    await race(database, 3 if database.startswith("postgresql://") else 2)


async def test_why_says_a_dependant_waits_for_its_running_dependency(
    database: str, tmp_path: Path
) -> None:
    """While its dependency runs, `why` names it, running; then the dependant runs."""
    go = tmp_path / "go"
    async with fast_pool(database) as pool:
        blocker = await pool.submit(["sh", "-c", f"while [ ! -e {go} ]; do sleep 0.01; done"])
        dependant = await pool.submit(["true"], after=[blocker])
        await running(pool, blocker)
        [reason] = await pool.why(dependant)
        assert (reason.kind, reason.text) == (
            WaitKind.DEPENDENCY,
            f"waiting for dependency {blocker} (running)",
        )
        go.touch()
        with anyio.fail_after(SAFETY_TIMEOUT_S):
            assert (await pool.wait(dependant)).status is Status.SUCCEEDED
        assert await pool.why(dependant) == []
