"""A client's waiters share one status read per change (`taskpool._waiters`).

The store is a `MemoryStore` that counts its reads; tasks are ended straight through
the store (no pool), and the client is told of the change with `notify_changed`, as a
pool or PostgreSQL's notifications tell it. Polling is backed off to an hour, so every
read counted here is one a change or a registration asked for.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterator

import anyio
import pytest

from taskpool import (
    Client,
    Limits,
    Status,
    StoreError,
    StoreUnavailable,
    TaskInfo,
    TaskNotFound,
    TaskSpec,
    _client,
)
from taskpool._models import Outcome, OutcomeKind
from taskpool.testing import MemoryStore
from tests.helpers import eventually

EXITED_0 = Outcome(OutcomeKind.EXITED, "exited with code 0", 0)


class CountingStore(MemoryStore):
    """Records its reads; the shared ones fail while `failing` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gets: list[int] = []
        self.status_reads: list[list[int]] = []  # the ids each `statuses` call asked for
        self.reads: list[list[int]] = []  # the ids each `get_many` call asked for
        self.fetches: list[list[int]] = []  # and the ids it found
        self.failing = False

    async def get_many(
        self, task_ids: Collection[int], *, ended_only: bool = False
    ) -> dict[int, TaskInfo]:
        self.reads.append(sorted(task_ids))
        if self.failing:
            raise StoreUnavailable("the shared read fails (test)")
        found = await super().get_many(task_ids, ended_only=ended_only)
        self.fetches.append(sorted(found))
        return found

    async def get(self, task_id: int) -> TaskInfo:
        self.gets.append(task_id)
        return await super().get(task_id)

    async def statuses(self, task_ids: Collection[int]) -> dict[int, Status]:
        self.status_reads.append(sorted(task_ids))
        if self.failing:
            raise StoreUnavailable("the shared read fails (test)")
        return await super().statuses(task_ids)


@pytest.fixture(autouse=True)
def no_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    def hour(first_s: float, max_s: float) -> Iterator[float]:
        return itertools.repeat(3600.0)

    monkeypatch.setattr(_client, "poll_delays", hour)


async def _running_tasks(store: MemoryStore, n: int) -> dict[int, int]:
    """`n` tasks claimed by one node: task id -> fence."""
    ids = [await store.submit(TaskSpec.build(["true"])) for _ in range(n)]
    claims = await store.claim("node", Limits(n), 3600.0)
    assert sorted(c.task.id for c in claims) == ids
    return {c.task.id: c.fence for c in claims}


async def _until(predicate: Callable[[], bool]) -> None:
    """Let the waiters run until `predicate()` holds (a safety timeout bounds it)."""

    async def check() -> bool:
        return predicate()

    await eventually(check)


async def test_a_change_costs_one_read_for_all_waiters_and_wakes_only_those_ended() -> None:
    """100 waiters, tasks ended 20 at a time: each change is one read for every watched
    id, which returns only the ended tasks, and only their waiters wake. Whether a task
    exists is checked once, when its waiter registers."""
    store = CountingStore()
    async with store:
        client = Client(store, min_poll_interval_s=0.001)
        fences = await _running_tasks(store, 100)
        ids = sorted(fences)
        returned: dict[int, Status] = {}

        async def wait(task_id: int) -> None:
            returned[task_id] = (await client.wait(task_id)).status

        async with anyio.create_task_group() as tg:
            for task_id in ids:
                tg.start_soon(wait, task_id)
            await _until(lambda: ids in store.reads)  # all registered, all read
            assert sorted(itertools.chain(*store.status_reads)) == ids  # each checked once
            for start in range(0, len(ids), 20):
                batch = ids[start : start + 20]
                reads_before, gets_before = len(store.reads), len(store.gets)
                for task_id in batch:
                    await store.finish(task_id, fences[task_id], EXITED_0)
                client.notify_changed()
                wanted = start + 20
                await _until(lambda: len(returned) == wanted)  # noqa: B023 (awaited here)
                assert sorted(returned) == ids[: start + 20]
                assert len(store.reads) == reads_before + 1
                assert store.fetches[-1] == batch  # only the ended tasks are returned
                assert store.gets[gets_before:] == []  # no waiter reads alone
        assert set(returned.values()) == {Status.SUCCEEDED}
        assert client._reads.reading_for == 0


async def test_a_cancelled_waiter_disturbs_no_other_and_leaves_no_reader_behind() -> None:
    """Whichever waiter is cancelled (the reader among them), the others still return
    when their task ends, and once all have left nothing is watched or read."""
    store = CountingStore()
    async with store:
        client = Client(store, min_poll_interval_s=0.001)
        fences = await _running_tasks(store, 4)
        ids = sorted(fences)
        returned: dict[int, Status] = {}
        scopes = {task_id: anyio.CancelScope() for task_id in ids}

        async def wait(task_id: int) -> None:
            with scopes[task_id]:
                returned[task_id] = (await client.wait(task_id)).status

        async with anyio.create_task_group() as tg:
            for task_id in ids:
                tg.start_soon(wait, task_id)
            await _until(lambda: ids in store.reads)
            reader = client._reads._reader
            assert reader is not None
            cancelled = [reader.task_id, next(t for t in ids if t != reader.task_id)]
            for task_id in cancelled:
                scopes[task_id].cancel()
            await _until(lambda: client._reads.reading_for == 2)
            for task_id in ids:
                await store.finish(task_id, fences[task_id], EXITED_0)
            client.notify_changed()
        assert returned == {t: Status.SUCCEEDED for t in ids if t not in cancelled}
        assert client._reads.reading_for == 0
        assert client._reads._reader is None
        reads = len(store.reads)
        client.notify_changed()  # nobody waits: nothing is read
        await anyio.sleep(0.01)
        assert len(store.reads) == reads


async def test_a_waiters_timeout_leaves_the_task_and_the_other_waiters_alone() -> None:
    store = CountingStore()
    async with store:
        client = Client(store, min_poll_interval_s=0.001)
        fences = await _running_tasks(store, 2)
        short, long = sorted(fences)
        async with anyio.create_task_group() as tg:
            results: list[Status] = []

            async def wait_long() -> None:
                results.append((await client.wait(long)).status)

            tg.start_soon(wait_long)
            with pytest.raises(TimeoutError):
                await client.wait(short, timeout_s=0.05)
            assert (await store.get(short)).status is Status.RUNNING
            assert (await store.get(short)).cancel_requested is None
            await store.finish(long, fences[long], EXITED_0)
            client.notify_changed()
        assert results == [Status.SUCCEEDED]
        assert client._reads.reading_for == 0


async def test_an_unknown_task_raises_for_its_waiter_only() -> None:
    store = CountingStore()
    async with store:
        client = Client(store, min_poll_interval_s=0.001)
        fences = await _running_tasks(store, 1)
        (known,) = fences
        results: list[Status] = []
        async with anyio.create_task_group() as tg:

            async def wait_known() -> None:
                results.append((await client.wait(known)).status)

            tg.start_soon(wait_known)
            with pytest.raises(TaskNotFound):
                await client.wait(9999)
            await store.finish(known, fences[known], EXITED_0)
            client.notify_changed()
        assert results == [Status.SUCCEEDED]
        with pytest.raises(TaskNotFound):
            async for _ in client.follow(9999):
                pass


async def test_a_failed_shared_read_reaches_each_waiter_as_its_own_read() -> None:
    """When the shared read fails, every waiter reads its task itself: one whose read
    succeeds (its task still runs) waits on; had it failed, it would have raised."""
    store = CountingStore()
    async with store:
        client = Client(store, min_poll_interval_s=0.001)
        fences = await _running_tasks(store, 3)
        ids = sorted(fences)
        returned: list[int] = []

        async def wait(task_id: int) -> None:
            await client.wait(task_id)
            returned.append(task_id)

        async with anyio.create_task_group() as tg:
            for task_id in ids:
                tg.start_soon(wait, task_id)
            await _until(lambda: ids in store.reads)
            store.failing = True
            client.notify_changed()
            await _until(lambda: sorted(store.gets) == ids)  # each read its own task
            store.failing = False
            assert returned == []
            for task_id in ids:
                await store.finish(task_id, fences[task_id], EXITED_0)
            client.notify_changed()
        assert sorted(returned) == ids

    store = CountingStore()
    async with store:
        client = Client(store, min_poll_interval_s=0.001)
        fences = await _running_tasks(store, 1)
        (task,) = fences
        async with anyio.create_task_group() as tg:

            async def break_the_store() -> None:
                await _until(lambda: [task] in store.reads)
                store.failing = True
                await store.close()  # the waiter's own read fails too: it raises
                client.notify_changed()

            tg.start_soon(break_the_store)
            with pytest.raises(StoreError, match="closed"):
                await client.wait(task)


async def test_followers_and_waiters_share_the_read_and_see_all_output() -> None:
    """A follower's status check is the shared read: it ends after the output written
    before the end, and a waiter of the same task costs no read of its own."""
    store = CountingStore()
    async with store:
        client = Client(store, min_poll_interval_s=0.001)
        fences = await _running_tasks(store, 1)
        (task,) = fences
        seen: list[str] = []
        ended: list[Status] = []
        async with anyio.create_task_group() as tg:

            async def follow() -> None:
                async for text in client.follow(task):
                    seen.append(text)

            async def wait() -> None:
                ended.append((await client.wait(task)).status)

            tg.start_soon(follow)
            tg.start_soon(wait)
            await _until(lambda: client._reads.reading_for == 1 and [task] in store.reads)
            await store.append_output(task, fences[task], ["one\n"])
            client.notify_output()
            await _until(lambda: seen == ["one\n"])
            await store.append_output(task, fences[task], ["two\n"])
            await store.finish(task, fences[task], EXITED_0)
            client.notify_changed()
        assert seen == ["one\n", "two\n"]
        assert ended == [Status.SUCCEEDED]
        assert store.gets == []  # the shared read fetched the ended task for both
        assert store.fetches[-1] == [task]
