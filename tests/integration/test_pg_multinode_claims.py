"""Several nodes claiming at once from one PostgreSQL database never overlap.

PostgreSQL's claim serializes only claims that share a blocking key (the claiming
node, a limited project, a template, a named lock), so races between nodes, and
between one node's own concurrent claims, are real here: random tasks go through
several `PostgresStore` handles (one per node) whose claims and finishes run
concurrently, in rounds. After each round, while nothing runs, one snapshot of the
database must satisfy every rule at once: each node within its `max_parallel`, each
limited project within its limit, a non-parallel template alone among its template's
tasks, each named lock held once, one live attempt per running task. Nothing ends a
task claimed in the same round, so an overlap a race made is still there to be seen.
At the end every task has run exactly once.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Sequence

import anyio
import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskpool import Limits, NodeInfo, Status, TaskSpec
from taskpool._models import Outcome, OutcomeKind
from taskpool.stores.postgres import PostgresStore
from tests.postgres import fresh_postgres_database

EXITED_0 = Outcome(OutcomeKind.EXITED, "exited with code 0", 0)

#: (project, template, template_parallel, locks, priority): few names, so tasks collide.
ROUTING = st.tuples(
    st.sampled_from(["p1", "p2", "p3"]),
    st.one_of(st.none(), st.sampled_from(["t1", "t2"])),
    st.booleans(),
    st.frozensets(st.sampled_from(["l1", "l2", "l3"]), max_size=2),
    st.integers(0, 2),
)
Routing = tuple[str, str | None, bool, frozenset[str], int]
#: Fair sharing's weights, ties (1 and 2) among them.
WEIGHTS = st.sampled_from([0.5, 1.0, 2.0, 3.0])


def _spec(routing: Routing) -> TaskSpec:
    project, template, parallel, locks, priority = routing
    return TaskSpec.build(
        ["true"],
        project=project,
        template=template,
        template_parallel=parallel,
        locks=sorted(locks),
        priority=priority,
    )


def _node(node_id: str, capacity: int) -> NodeInfo:
    now = time.time()
    return NodeInfo(node_id, "host", os.getpid(), now, now, now, None, capacity)


async def _check_snapshot(
    conn: asyncpg.Connection, capacities: Sequence[int], project_limits: dict[str, int]
) -> None:
    """Every rule holds in one snapshot of what runs."""
    rows = await conn.fetch(
        "SELECT t.id, t.owner_node, t.project, t.template, t.template_parallel, t.locks,"
        " (SELECT count(*) FROM taskpool_attempts a WHERE a.task_id = t.id"
        "  AND a.finished_at IS NULL) AS live_attempts"
        " FROM taskpool_tasks t WHERE t.status = 'running'"
    )
    per_node = Counter(r["owner_node"] for r in rows)
    for i, capacity in enumerate(capacities):
        assert per_node[f"node-{i}"] <= capacity, f"node-{i} runs more than {capacity}"
    per_project = Counter(r["project"] for r in rows)
    for project, limit in project_limits.items():
        assert per_project[project] <= limit, f"project {project} runs more than {limit}"
    held = [lock for r in rows for lock in r["locks"]]
    assert len(held) == len(set(held)), f"a lock is held twice: {sorted(held)}"
    for template in {r["template"] for r in rows} - {None}:
        of_template = [r for r in rows if r["template"] == template]
        if any(not r["template_parallel"] for r in of_template):
            assert len(of_template) == 1, f"template {template} runs alone: {of_template}"
    assert all(r["live_attempts"] == 1 for r in rows), "a running task without one attempt"


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    tasks=st.lists(ROUTING, min_size=1, max_size=30),
    capacities=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    project_limits=st.dictionaries(st.sampled_from(["p1", "p2"]), st.integers(1, 2)),
    claimers_per_node=st.integers(1, 3),
    finish_fraction=st.sampled_from([0.3, 0.6, 1.0]),
    fair_share=st.none() | st.just({}) | st.dictionaries(st.sampled_from(["p1", "p3"]), WEIGHTS),
)
def test_nodes_claiming_at_once_never_overlap(
    tasks: list[Routing],
    capacities: list[int],
    project_limits: dict[str, int],
    claimers_per_node: int,
    finish_fraction: float,
    fair_share: dict[str, float] | None,
) -> None:
    """Random tasks claimed and finished by racing nodes (queue order or fair sharing,
    the nodes' claims through `taskpool_claim` or `taskpool_claim_fair`): every
    snapshot keeps every rule, and every task runs exactly once."""
    anyio.run(
        _race, tasks, capacities, project_limits, claimers_per_node, finish_fraction, fair_share
    )


async def _race(
    tasks: list[Routing],
    capacities: list[int],
    project_limits: dict[str, int],
    claimers_per_node: int,
    finish_fraction: float,
    fair_share: dict[str, float] | None = None,
) -> None:
    async with fresh_postgres_database() as dsn:
        stores = [PostgresStore(dsn, max_size=4) for _ in capacities]
        conn = await asyncpg.connect(dsn)
        try:
            for i, store in enumerate(stores):
                await store.open()
                await store.register_node(_node(f"node-{i}", capacities[i]))
            ids = await stores[0].submit_many([_spec(t) for t in tasks])
            limits = [Limits(c, project_limits, fair_share) for c in capacities]
            owned: list[list[tuple[int, int]]] = [[] for _ in stores]  # (task id, fence)
            for _ in range(rounds := 4 * len(tasks) + 10):
                # Finish some of what each node holds (claimed in an earlier round),
                # claiming for the freed slots, while every node also claims.
                async with anyio.create_task_group() as tg:
                    for i, store in enumerate(stores):
                        cut = max(1, int(len(owned[i]) * finish_fraction))
                        ending, owned[i] = owned[i][:cut], owned[i][cut:]
                        for task_id, fence in ending:
                            tg.start_soon(
                                _finish_and_claim, store, i, limits[i], task_id, fence, owned
                            )
                        for _ in range(claimers_per_node):
                            tg.start_soon(_claim, store, i, limits[i], owned)
                await _check_snapshot(conn, capacities, project_limits)
                done = await stores[0].list_tasks(statuses=[Status.SUCCEEDED], limit=1000)
                if len(done) == len(ids):
                    break
            else:
                raise AssertionError(f"tasks left undone after {rounds} rounds")
            attempts = await conn.fetch(
                "SELECT task_id, count(*) FROM taskpool_attempts GROUP BY 1"
            )
            assert {r[0]: r[1] for r in attempts} == dict.fromkeys(ids, 1), "a task ran twice"
        finally:
            await conn.close()
            for store in stores:
                await store.close()


async def _claim(
    store: PostgresStore, i: int, limits: Limits, owned: list[list[tuple[int, int]]]
) -> None:
    claims = await store.claim(f"node-{i}", limits, lease_ttl_s=60)
    owned[i].extend((c.task.id, c.fence) for c in claims)


async def _finish_and_claim(
    store: PostgresStore,
    i: int,
    limits: Limits,
    task_id: int,
    fence: int,
    owned: list[list[tuple[int, int]]],
) -> None:
    claims = await store.finish_and_claim(
        task_id, fence, EXITED_0, node_id=f"node-{i}", limits=limits, lease_ttl_s=60
    )
    owned[i].extend((c.task.id, c.fence) for c in claims)
