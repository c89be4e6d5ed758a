"""Deduplication keys and the retry policy on every store: several handles (nodes)
submitting one key at once leave exactly one live task with it, and say why."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from taskpool import InvalidTask, Limits, Status, Store, TaskSpec
from taskpool._models import Outcome, OutcomeKind, SubmitResult
from tests.integration.test_store_contract import BACKENDS, Opener, handles

NODES = 4
SUBMITS_PER_NODE = 5
EXIT_1 = Outcome(OutcomeKind.EXITED, "exited with code 1", 1)


@pytest.fixture(params=sorted(BACKENDS))
async def opener(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    async with BACKENDS[request.param](tmp_path) as open_handle:
        yield open_handle


async def _race(stores: list[Store], spec: TaskSpec) -> list[SubmitResult]:
    results = await asyncio.gather(
        *(store.submit(spec) for store in stores for _ in range(SUBMITS_PER_NODE))
    )
    return [SubmitResult.of(r) for r in results]


async def _live(store: Store, key: str) -> list[int]:
    tasks = await store.list_tasks(statuses=[Status.WAITING, Status.RUNNING], limit=1000)
    return [t.id for t in tasks if t.spec.unique_key == key]


async def test_racing_rejects_store_one_task_and_return_its_id(opener: Opener) -> None:
    async with handles(opener, NODES) as stores:
        spec = TaskSpec.build(["true"], unique_key="deploy-prod")
        results = await _race(stores, spec)
        created = [r for r in results if r.created]
        assert len(created) == 1
        assert {int(r) for r in results} == {created[0].task_id}
        assert await _live(stores[0], "deploy-prod") == [created[0].task_id]
        assert len(await stores[0].list_tasks(limit=1000)) == 1
        got = await stores[1].get(created[0].task_id)
        assert got.spec == spec


async def test_racing_replacements_leave_the_newest_and_name_it(opener: Opener) -> None:
    async with handles(opener, NODES) as stores:
        spec = TaskSpec.build(["true"], unique_key="plan", on_conflict="replace_waiting")
        results = await _race(stores, spec)
        assert all(r.created for r in results)
        ids = sorted(int(r) for r in results)
        assert len(set(ids)) == NODES * SUBMITS_PER_NODE
        live = await _live(stores[0], "plan")
        assert len(live) == 1
        replaced = {r.replaced for r in results if r.replaced is not None}
        # Every task but the one left was replaced by exactly one other, which its
        # reason names.
        assert replaced == set(ids) - set(live)
        by_replacer = {r.replaced: int(r) for r in results if r.replaced is not None}
        for task_id in replaced:
            task = await stores[0].get(task_id)
            reason = (
                f"replaced by task {by_replacer[task_id]}"
                " (unique key 'plan', on_conflict replace_waiting)"
            )
            assert (task.status, task.reason) == (Status.CANCELLED, reason)
            events = await stores[0].events(task_id)
            assert [(e.to_status, e.reason) for e in events] == [
                (Status.WAITING, "submitted"),
                (Status.CANCELLED, reason),
            ]


async def test_a_running_holder_is_never_replaced(opener: Opener) -> None:
    async with handles(opener, 2) as stores:
        spec = TaskSpec.build(["true"], unique_key="k", on_conflict="replace_waiting")
        first = SubmitResult.of(await stores[0].submit(spec))
        [claim] = await stores[0].claim("node-0", Limits(max_parallel=1), lease_ttl_s=30)
        again = SubmitResult.of(await stores[1].submit(spec))
        assert (int(again), again.created, again.replaced) == (int(first), False, None)
        # Once it has ended, the key is free again.
        await stores[0].finish(claim.task.id, claim.fence, EXIT_1)
        after = SubmitResult.of(await stores[1].submit(spec))
        assert after.created
        assert int(after) != int(first)
        assert await _live(stores[0], "k") == [int(after)]


async def test_a_batch_checks_each_key_and_refuses_one_key_twice(opener: Opener) -> None:
    async with handles(opener, 1) as [store]:
        held = SubmitResult.of(await store.submit(TaskSpec.build(["true"], unique_key="a")))
        twice = [TaskSpec.build(["true"], unique_key="b")] * 2
        with pytest.raises(InvalidTask, match="unique_key 'b' appears twice in one batch"):
            await store.submit_many(twice)
        ids = await store.submit_many(
            [
                TaskSpec.build(["true"]),
                TaskSpec.build(["true"], unique_key="a"),
                TaskSpec.build(["true"], unique_key="b"),
            ]
        )
        results = [SubmitResult.of(i) for i in ids]
        assert [r.created for r in results] == [True, False, True]
        assert int(results[1]) == int(held)
        assert int(results[0]) < int(results[2])
        assert len(await store.list_tasks(limit=100)) == 3


async def test_retry_on_decides_in_the_store_and_says_so(opener: Opener) -> None:
    async with handles(opener, 1) as [store]:
        spec = TaskSpec.build(
            ["false"],
            max_attempts=3,
            retry_on=["lost", "timed_out"],
            retry_jitter=0.5,
            retry_max_delay_s=7.5,
        )
        task_id = await store.submit(spec)
        assert (await store.get(task_id)).spec == spec
        [claim] = await store.claim("node-0", Limits(max_parallel=1), lease_ttl_s=30)
        ended = await store.finish(task_id, claim.fence, EXIT_1)
        reason = "exited with code 1; not retried: retry_on is lost, timed_out"
        assert (ended.status, ended.reason) == (Status.FAILED, reason)
        assert (await store.events(task_id))[-1].reason == reason
