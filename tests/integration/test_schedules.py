"""Durable schedules on both SQL stores (and MemoryStore where it applies): exactly
one run per tick across several nodes that die and come back, the overlap and
misfire policies, a restart of every handle, and a real pool firing a schedule.

The day simulations drive the store's scheduler step (`fire_due`) with a fake clock
from three store handles on one database (three nodes): PostgreSQL handles are
separate connection pools, SQLite handles separate writers on one file. Nodes are
killed (their step cancelled at a random moment, their handle closed) and reopened
at random; what was fired is read back from the database, never from the steps'
return values (a killed step's answer is lost, its transaction kept or not).
"""

from __future__ import annotations

import os
import random
import re
import time
from calendar import timegm

import anyio

from taskpool import Client, Limits, NodeInfo, Status, Store
from taskpool._models import Outcome, OutcomeKind
from taskpool._scheduler import schedules_of
from taskpool._schedules import ScheduledBy
from taskpool.stores._schedules_sql import SQLITE_IDS_PER_QUERY
from taskpool.testing import MemoryStore
from tests.helpers import eventually, fast_pool, open_store

MIDNIGHT = float(timegm((2024, 6, 3, 0, 0, 0)))  # a Monday, UTC
DAY_S = 86_400.0
EXITED_0 = Outcome(OutcomeKind.EXITED, "exited with code 0", 0)
TICK = re.compile(r"^schedule (\S+) at (\S+)$")


async def fired_ticks(store: Store, name: str) -> list[str]:
    """The tick each of the schedule's runs names in its first event, as stored."""
    client = Client(store)
    ids = await client.schedule_runs(name, limit=10_000)
    ticks = []
    for task_id in ids:
        first = (await client.events(task_id))[0].reason
        match = TICK.match(first)
        assert match is not None, first
        assert match.group(1) == name
        ticks.append(match.group(2))
    return sorted(ticks)


def expected_ticks(start: float, end: float, every_s: float) -> list[str]:
    count = int((end - start) // every_s) + 1
    return [
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start + k * every_s)) for k in range(count)
    ]


async def add(store: Store, now: float, name: str, **options: object) -> None:
    client = Client(store)
    client.schedule_clock = lambda: now
    await client.add_schedule(name, ["true"], **options)  # type: ignore[arg-type]


async def test_a_day_of_five_minute_ticks_on_three_dying_nodes_fires_each_once(
    database: str,
) -> None:
    rng = random.Random(288)
    async with open_store(database) as admin:
        await add(
            admin,
            MIDNIGHT - 1,
            "every5",
            cron="*/5 * * * *",
            overlap="queue",  # the runs never run here: every tick must submit
            misfire="run_all",
            misfire_bound=1000,  # all three nodes may be down for a while
        )
    nodes: list[Store | None] = [open_store(database) for _ in range(3)]
    for node in nodes:
        assert node is not None
        await node.open()
    kills = restarts = 0

    async def step(node: Store, now: float, dies: bool) -> None:
        if dies:
            # Killed at a random moment of its step: before, during or after its
            # transaction; what it did is only what the database kept.
            with anyio.move_on_after(rng.uniform(0, 0.02)):
                await schedules_of(node).fire_due(now)
        else:
            await schedules_of(node).fire_due(now)

    now = MIDNIGHT - 1
    end = MIDNIGHT + DAY_S - 1  # the last tick of the day is 23:55
    try:
        while now < end:
            now = min(end, now + rng.uniform(0, 420))
            doomed = set()
            for i, node in enumerate(nodes):
                if node is None and rng.random() < 0.4:
                    nodes[i] = open_store(database)
                    await nodes[i].open()  # type: ignore[union-attr]
                    restarts += 1
                elif node is not None and rng.random() < 0.1:
                    doomed.add(i)
            async with anyio.create_task_group() as tg:
                for i, node in enumerate(nodes):
                    if node is not None:
                        tg.start_soon(step, node, now, i in doomed)
            for i in doomed:
                node = nodes[i]
                assert node is not None
                await node.close()
                nodes[i] = None
                kills += 1
        # The day is over: one live node's step catches up on whatever is still due.
        last = open_store(database)
        async with last:
            await schedules_of(last).fire_due(end)
            ticks = await fired_ticks(last, "every5")
            tasks = await last.list_tasks(limit=10_000)
    finally:
        for node in nodes:
            if node is not None:
                await node.close()
    assert kills > 5
    assert restarts > 5
    assert len(ticks) == 288
    assert ticks == expected_ticks(MIDNIGHT, end, 300)  # none doubled, none missing
    assert len(tasks) == 288


async def _claimed(store: Store, node_id: str) -> int:
    now = 0.0
    await store.register_node(NodeInfo(node_id, "host", os.getpid(), now, now, now, None, 4))
    claims = await store.claim(node_id, Limits(max_parallel=4), 3600.0)
    assert len(claims) == 1
    return claims[0].task.id


async def test_skip_overlap_submits_nothing_while_the_previous_run_runs(database: str) -> None:
    async with open_store(database) as store:
        await add(store, MIDNIGHT - 1, "long", cron="*/5 * * * *", overlap="skip")
        schedules = schedules_of(store)
        [first] = await schedules.fire_due(MIDNIGHT)
        assert first.task_id is not None
        running = await _claimed(store, "node-a")
        assert running == first.task_id
        # The run lasts 40 minutes: eight ticks fall while it runs, each on time.
        for minute in range(5, 45, 5):
            fired = await schedules.fire_due(MIDNIGHT + minute * 60 + 1)
            assert [f.task_id for f in fired] == [None]
        assert await schedules.runs("long") == [running]
        await store.finish(running, 1, EXITED_0)
        [after] = await schedules.fire_due(MIDNIGHT + 45 * 60)
        assert after.task_id is not None
        assert await schedules.runs("long") == [after.task_id, running]


async def test_cancel_previous_cancels_the_running_run_and_submits(database: str) -> None:
    async with open_store(database) as store:
        await add(store, MIDNIGHT - 1, "fresh", every_s=300, overlap="cancel_previous")
        schedules = schedules_of(store)
        [first] = await schedules.fire_due(MIDNIGHT - 1 + 300)
        assert first.task_id is not None
        await _claimed(store, "node-a")
        [second] = await schedules.fire_due(MIDNIGHT - 1 + 600)
        assert second.cancelled == first.task_id
        assert second.task_id is not None
        old = await store.get(first.task_id)
        assert old.status is Status.RUNNING
        assert old.cancel_requested is not None
        assert (await store.get(second.task_id)).status is Status.WAITING


async def test_misfire_policies_after_a_two_hour_outage(database: str) -> None:
    async with open_store(database) as store:
        for name, misfire, bound in [
            ("once", "run_once", 10),
            ("all", "run_all", 100),
            ("all-bounded", "run_all", 10),
            ("skipped", "skip", 10),
        ]:
            await add(
                store,
                MIDNIGHT - 1,
                name,
                cron="*/5 * * * *",
                overlap="queue",
                misfire=misfire,
                misfire_bound=bound,
            )
        schedules = schedules_of(store)
        assert len(await schedules.fire_due(MIDNIGHT)) == 4  # 00:00, on time, for all
        # No node runs from 00:01 to 02:02: the ticks 00:05 .. 02:00 (24) are missed.
        back = MIDNIGHT + 2 * 3600 + 120
        fired = await schedules.fire_due(back)
        by_name: dict[str, list[float]] = {}
        for f in fired:
            by_name.setdefault(f.schedule, []).append(f.tick)
        missed = [MIDNIGHT + k * 300 for k in range(1, 25)]
        assert by_name["once"] == missed[-1:]  # one run, for the newest missed tick
        assert by_name["all"] == missed  # every missed tick, in order
        assert by_name["all-bounded"] == missed[-10:]  # the newest ten
        assert "skipped" not in by_name  # none: it waits for 02:05
        for s in await schedules.all():
            assert s.next_fire_at == MIDNIGHT + 2 * 3600 + 300
        assert (await fired_ticks(store, "skipped")) == expected_ticks(MIDNIGHT, MIDNIGHT, 300)
        nothing_more = await schedules.fire_due(back + 60)
        assert nothing_more == []
        [next_one] = [f for f in await schedules.fire_due(back + 180) if f.schedule == "skipped"]
        assert next_one.tick == MIDNIGHT + 2 * 3600 + 300


async def test_schedules_survive_a_restart_of_every_handle(database: str) -> None:
    async with open_store(database) as store:
        client = Client(store)
        client.schedule_clock = lambda: MIDNIGHT
        await client.add_schedule("nightly", ["true"], cron="0 3 * * *", tz="Europe/Berlin")
        await client.add_schedule("often", ["true"], every_s=60, overlap="queue")
        await client.pause_schedule("often")
        before = await client.list_schedules()
    async with open_store(database) as store:
        client = Client(store)
        after = await client.list_schedules()
        assert after == before
        assert [s.name for s in after] == ["nightly", "often"]
        assert after[1].paused
        nightly = await client.next_fires("nightly", 3)
        # 03:00 in Berlin is 01:00 UTC in June (summer time).
        assert nightly == [MIDNIGHT + 3600 + k * DAY_S for k in range(3)]
        client.schedule_clock = lambda: MIDNIGHT + 3600
        resumed = await client.resume_schedule("often")
        assert not resumed.paused
        assert resumed.next_fire_at == MIDNIGHT + 3600 + 60
        await client.remove_schedule("often")
        assert [s.name for s in await client.list_schedules()] == ["nightly"]


async def test_scheduled_by_names_each_runs_schedule_and_tick(any_store: Store) -> None:
    """`scheduled_by` answers, for a whole list of ids in one call, the schedule and
    tick of each run a schedule fired, and leaves out tasks submitted by hand and ids
    of no task; more ids than SQLite binds in one statement are answered as well."""
    store = any_store
    await add(store, MIDNIGHT - 1, "a", cron="*/5 * * * *", overlap="queue")
    await add(store, MIDNIGHT - 1, "b", every_s=600, overlap="queue")
    schedules = schedules_of(store)
    fired = await schedules.fire_due(MIDNIGHT)  # a: 00:00
    fired += await schedules.fire_due(MIDNIGHT + 599)  # a: 00:05; b: 00:09:59
    by_hand = await Client(store).submit(["true"])
    runs = {f.task_id: ScheduledBy(f.schedule, f.tick) for f in fired if f.task_id is not None}
    assert sorted((s.schedule, s.tick) for s in runs.values()) == [
        ("a", MIDNIGHT),
        ("a", MIDNIGHT + 300),
        ("b", MIDNIGHT - 1 + 600),
    ]
    asked = [*runs, by_hand, 10**9]
    assert await schedules.scheduled_by(asked) == runs
    assert await Client(store).scheduled_by(iter(asked)) == runs
    assert await schedules.scheduled_by([]) == {}
    many = [*range(1, 2 * SQLITE_IDS_PER_QUERY + 7), *runs]
    assert await schedules.scheduled_by(many) == runs
    newest_a = max(i for i, s in runs.items() if s.schedule == "a")
    assert await Client(store).latest_schedule_runs(["a", "b"], 1) == {
        "a": [(newest_a, Status.WAITING)],
        "b": [(next(i for i, s in runs.items() if s.schedule == "b"), Status.WAITING)],
    }


async def test_memory_store_fires_each_tick_once() -> None:
    store = MemoryStore()
    async with store:
        await add(store, MIDNIGHT - 1, "m", cron="*/5 * * * *", overlap="queue")
        schedules = schedules_of(store)
        now = MIDNIGHT - 1
        while now < MIDNIGHT + 3600:
            now += 100
            await schedules.fire_due(now)
        assert await fired_ticks(store, "m") == expected_ticks(MIDNIGHT, now, 300)


async def test_a_pool_fires_a_one_second_schedule_and_its_run_succeeds(database: str) -> None:
    async with fast_pool(database, schedule_interval_s=0.1), Client(database) as client:
        await client.add_schedule("beat", ["sh", "-c", "echo tick"], every_s=1.0)

        async def first_run() -> int | None:
            runs = await client.schedule_runs("beat")
            return runs[-1] if runs else None

        task_id = await eventually(first_run)
        info = await client.wait(task_id, timeout_s=30)
        assert info.status is Status.SUCCEEDED
        assert (await client.output(task_id)).strip() == "tick"
        await client.remove_schedule("beat")
