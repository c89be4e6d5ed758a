"""The Store contract for run-after dependencies (`TaskSpec.after`), on every backend.

A dependant is claimable only once each of its dependencies has succeeded; a
dependency that ends otherwise cancels every waiting task below it, each with a
reason naming the dependency. The backends' fixtures are the contract suite's.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from taskpool import InvalidTask, Limits, Status, Store, TaskSpec
from taskpool._models import Outcome, OutcomeKind
from tests.integration.test_store_contract import EXITED_0, Opener, _node, handles
from tests.integration.test_store_contract import opener as opener  # the fixture

LIMITS = Limits(max_parallel=100)
FAILED = Outcome(OutcomeKind.EXITED, "exited with code 1", 1)


async def claim_ids(store: Store, *, ttl_s: float = 30) -> dict[int, int]:
    """Claim everything claimable: task id -> fence."""
    node = getattr(store, "_test_node", "node-0")
    return {c.task.id: c.fence for c in await store.claim(node, LIMITS, ttl_s)}


async def succeed(store: Store, task_id: int) -> None:
    """Claim what is claimable, which must include `task_id`, and let it succeed."""
    claimed = await claim_ids(store)
    assert task_id in claimed, (task_id, claimed)
    await store.finish(task_id, claimed[task_id], EXITED_0)
    for other, fence in claimed.items():  # hand the rest back untouched
        if other != task_id:
            await store.finish(other, fence, Outcome(OutcomeKind.SHUTDOWN, "handed back"))


async def status_and_reason(store: Store, task_id: int) -> tuple[Status, str | None]:
    info = await store.get(task_id)
    return info.status, info.reason


async def test_a_dependant_is_claimable_only_after_its_dependency_succeeded(
    opener: Opener,
) -> None:
    """The dependant is left out of every claim while its dependency waits and runs,
    and claimed once it succeeded; it reads back the start time it was given."""
    async with handles(opener, 1) as (store,):
        asked = time.time() - 5
        init = await store.submit(TaskSpec.build(["init"]))
        apply = await store.submit(TaskSpec.build(["apply"], after=[init], not_before=asked))
        held = await store.get(apply)
        assert (held.status, held.spec.after, held.spec.not_before) == (
            Status.WAITING,
            (init,),
            asked,
        )
        claimed = await claim_ids(store)
        assert list(claimed) == [init]
        assert await claim_ids(store) == {}  # init runs: apply is still held
        await store.finish(init, claimed[init], EXITED_0)
        assert list(await claim_ids(store)) == [apply]
        released = await store.get(apply)
        assert released.spec.not_before == asked
        assert [e.to_status for e in await store.events(apply)] == [
            Status.WAITING,
            Status.RUNNING,
        ]


ENDS = {
    "failed": "failed",
    "timed_out": "timed out",
    "stalled": "stalled",
    "cancelled": "was cancelled",
    "lost": "was lost",
}


async def end_root(store: Store, root: int, how: str) -> None:
    """End the running or waiting task `root` in status `how`."""
    if how == "cancelled":
        await store.request_cancel(root)
        return
    claimed = await claim_ids(store, ttl_s=-1 if how == "lost" else 30)
    assert list(claimed) == [root]
    if how == "lost":  # its lease ran out (a TTL in the past) and it has no attempt left
        [rescued] = await store.rescue_expired()
        assert rescued.status is Status.LOST
        return
    outcome = {
        "failed": FAILED,
        "timed_out": Outcome(OutcomeKind.TIMED_OUT, "timed out after 1 s"),
        "stalled": Outcome(OutcomeKind.STALLED, "no output for 1 s"),
    }[how]
    await store.finish(root, claimed[root], outcome)


@pytest.mark.parametrize("how", sorted(ENDS))
async def test_an_unsuccessful_end_cancels_the_whole_chain_below_it_with_reasons(
    opener: Opener, how: str
) -> None:
    """A root ending failed, timed out, stalled, cancelled or lost cancels its
    dependant, and each task further down, naming the dependency and the root."""
    async with handles(opener, 1) as (store,):
        root = await store.submit(TaskSpec.build(["root"]))
        one = await store.submit(TaskSpec.build(["one"], after=[root]))
        two = await store.submit(TaskSpec.build(["two"], after=[one]))
        three = await store.submit(TaskSpec.build(["three"], after=[two, root]))
        bystander = await store.submit(TaskSpec.build(["other"], not_before=time.time() + 3600))
        await end_root(store, root, how)
        said = f"dependency {root} {ENDS[how]}"
        assert await status_and_reason(store, one) == (Status.CANCELLED, said)
        assert await status_and_reason(store, two) == (
            Status.CANCELLED,
            f"dependency {one} was cancelled: {said}",
        )
        # It names its own dependency below the root first: here the root itself.
        assert await status_and_reason(store, three) == (Status.CANCELLED, said)
        for task_id in (one, two, three):
            events = await store.events(task_id)
            assert [(e.from_status, e.to_status) for e in events] == [
                (None, Status.WAITING),
                (Status.WAITING, Status.CANCELLED),
            ]
            assert (await store.get(task_id)).finished_at == events[-1].at
        # The root's own end is logged before the cancels it caused.
        root_end = (await store.events(root))[-1]
        assert root_end.to_status.value == how
        for task_id in (one, two, three):
            assert root_end.id < (await store.events(task_id))[-1].id
        assert (await store.get(bystander)).status is Status.WAITING


async def test_a_chain_reason_names_the_lowest_dependency_below_the_root(opener: Opener) -> None:
    """Three deep: the third task's reason names the second, and the root."""
    async with handles(opener, 1) as (store,):
        root = await store.submit(TaskSpec.build(["root"]))
        one = await store.submit(TaskSpec.build(["one"], after=[root]))
        two = await store.submit(TaskSpec.build(["two"], after=[one]))
        three = await store.submit(TaskSpec.build(["three"], after=[two]))
        await end_root(store, root, "failed")
        assert await status_and_reason(store, three) == (
            Status.CANCELLED,
            f"dependency {two} was cancelled: dependency {root} failed",
        )


async def test_a_diamond_starts_only_when_both_dependencies_succeeded(opener: Opener) -> None:
    """A task after two others stays held when one of them succeeded, and is claimed
    once the other did too."""
    async with handles(opener, 1) as (store,):
        left = await store.submit(TaskSpec.build(["left"]))
        right = await store.submit(TaskSpec.build(["right"]))
        both = await store.submit(TaskSpec.build(["both"], after=[right, left, right]))
        assert (await store.get(both)).spec.after == (left, right)  # sorted, once each
        claimed = await claim_ids(store)
        assert sorted(claimed) == [left, right]
        await store.finish(left, claimed[left], EXITED_0)
        assert await claim_ids(store) == {}
        await store.finish(right, claimed[right], EXITED_0)
        assert list(await claim_ids(store)) == [both]


async def test_a_diamond_is_cancelled_when_either_dependency_fails(opener: Opener) -> None:
    """One failed dependency cancels the task at once, the other still running; the
    other's later success changes nothing."""
    async with handles(opener, 1) as (store,):
        left = await store.submit(TaskSpec.build(["left"]))
        right = await store.submit(TaskSpec.build(["right"]))
        both = await store.submit(TaskSpec.build(["both"], after=[left, right]))
        claimed = await claim_ids(store)
        await store.finish(right, claimed[right], FAILED)
        assert await status_and_reason(store, both) == (
            Status.CANCELLED,
            f"dependency {right} failed",
        )
        await store.finish(left, claimed[left], EXITED_0)
        assert await status_and_reason(store, both) == (
            Status.CANCELLED,
            f"dependency {right} failed",
        )
        assert await claim_ids(store) == {}


async def test_an_unknown_dependency_is_refused_and_nothing_is_stored(opener: Opener) -> None:
    """`after` naming no task is `InvalidTask` for submit and for a whole batch."""
    async with handles(opener, 1) as (store,):
        known = await store.submit(TaskSpec.build(["known"]))
        with pytest.raises(InvalidTask, match="after names no existing task: 999999"):
            await store.submit(TaskSpec.build(["x"], after=[known, 999999]))
        with pytest.raises(InvalidTask, match="999999"):
            await store.submit_many(
                [TaskSpec.build(["fine"]), TaskSpec.build(["x"], after=[999999])]
            )
        assert [t.id for t in await store.list_tasks()] == [known]
        assert len(await store.events(known)) == 1


async def test_dependencies_that_ended_before_the_submit(opener: Opener) -> None:
    """A dependency that already succeeded holds nothing; one that already failed
    cancels the new task at once, with the same reason as a cascade gives."""
    async with handles(opener, 1) as (store,):
        done = await store.submit(TaskSpec.build(["done"]))
        await succeed(store, done)
        broken = await store.submit(TaskSpec.build(["broken"]))
        claimed = await claim_ids(store)
        await store.finish(broken, claimed[broken], FAILED)
        ready, doomed = await store.submit_many(
            [
                TaskSpec.build(["ready"], after=[done]),
                TaskSpec.build(["doomed"], after=[done, broken]),
            ]
        )
        assert await status_and_reason(store, doomed) == (
            Status.CANCELLED,
            f"dependency {broken} failed",
        )
        assert [e.to_status for e in await store.events(doomed)] == [
            Status.WAITING,
            Status.CANCELLED,
        ]
        assert list(await claim_ids(store)) == [ready]
        # After a task a cascade cancelled: the cascade's own words, as if it had waited.
        late = await store.submit(TaskSpec.build(["late"], after=[doomed]))
        assert await status_and_reason(store, late) == (
            Status.CANCELLED,
            f"dependency {doomed} was cancelled: dependency {broken} failed",
        )


async def test_a_retried_failure_holds_its_dependants_until_its_last_attempt_fails(
    opener: Opener,
) -> None:
    """A failure that will be retried is not an end: the dependant stays held, and is
    cancelled only when the last attempt fails."""
    async with handles(opener, 1) as (store,):
        flaky = await store.submit(TaskSpec.build(["flaky"], max_attempts=2, retry_backoff_s=0))
        after = await store.submit(TaskSpec.build(["after"], after=[flaky]))
        claimed = await claim_ids(store)
        await store.finish(flaky, claimed[flaky], FAILED)
        assert (await store.get(flaky)).status is Status.WAITING  # to be retried
        assert await status_and_reason(store, after) == (Status.WAITING, "submitted")
        claimed = await claim_ids(store)
        assert list(claimed) == [flaky]
        await store.finish(flaky, claimed[flaky], FAILED)
        assert await status_and_reason(store, after) == (
            Status.CANCELLED,
            f"dependency {flaky} failed",
        )


@asynccontextmanager
async def reopened(opener: Opener, node: str) -> AsyncIterator[Store]:
    """A new handle onto the store, as a restarted pool's, registered as `node`."""
    async with opener() as store:
        await store.register_node(_node(node))
        store._test_node = node  # type: ignore[attr-defined]
        yield store


async def test_dependencies_survive_reopening_the_store(opener: Opener) -> None:
    """Every part of a dependency lives in the store: new handles release the
    dependant when the dependency succeeds, and cascade when one fails."""
    async with reopened(opener, "before") as store:
        first = await store.submit(TaskSpec.build(["first"]))
        second = await store.submit(TaskSpec.build(["second"], after=[first]))
        third = await store.submit(TaskSpec.build(["third"], after=[second]))
    async with reopened(opener, "one") as store:
        await succeed(store, first)
    async with reopened(opener, "two") as store:
        claimed = await claim_ids(store)
        assert list(claimed) == [second]
        assert (await store.get(third)).spec.after == (second,)
        await store.finish(second, claimed[second], FAILED)
    async with reopened(opener, "three") as store:
        assert await status_and_reason(store, third) == (
            Status.CANCELLED,
            f"dependency {second} failed",
        )
