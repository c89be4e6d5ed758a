"""One oracle for the blocking policy: every backend's claim chooses what `plan_claims`
chooses, in the same order.

The contract suite checks that a backend's choice is safe and leaves nothing runnable
behind; this checks it is the same choice. The same random world (tasks with their
routing and priority, attempts held by three nodes, some with a lease that has run
out, tasks not ready yet, limits) is built in a fresh store of each backend through
the public store API, then one claim is compared with `plan_claims` over the same
world. A lease that has run out is given with a TTL in the past, which every backend
(PostgreSQL on its own clock) reads as expired at once.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, example, given, settings

from taskpool import Limits, Store, TaskSpec
from taskpool._decisions import claim_reason
from taskpool._rules import FairClock, Slot, plan_claims
from tests.integration.test_store_contract import BACKENDS, handles
from tests.strategies import (
    CLAIMING_NODE,
    NODES,
    ClaimWorld,
    RunningAttempt,
    WaitingTask,
    claim_worlds,
    fair_claim_worlds,
)


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _spec(slot: Slot, *, priority: int = 0, not_before: float | None = None) -> TaskSpec:
    return TaskSpec.build(
        ["true"],
        project=slot.project,
        template=slot.template,
        template_parallel=slot.template_parallel,
        locks=sorted(slot.locks),
        priority=priority,
        not_before=not_before,
    )


def expected_claim(world: ClaimWorld) -> list[int]:
    """The oracle: `plan_claims` over the world, as slot ids."""
    (chosen,) = expected_claims(world, [world.max_parallel])
    return chosen


def expected_claims(world: ClaimWorld, max_parallels: Sequence[int]) -> list[list[int]]:
    """The oracle for claims in a row by `CLAIMING_NODE`, each with its `max_parallel`:
    each `plan_claims` over the world as the claims before it left it (what they chose
    running on the claiming node; with fair sharing, the clock's tags they recorded)."""
    queue = [
        w.slot
        for w in sorted(
            (w for w in world.waiting if w.ready), key=lambda w: (-w.priority, w.slot.task_id)
        )
    ]
    live = [r.slot for r in world.running if r.live]
    node_running = sum(1 for r in world.running if r.live and r.owner == CLAIMING_NODE)
    clock = FairClock()
    claims = []
    for max_parallel in max_parallels:
        chosen = plan_claims(
            queue,
            live,
            node_running=node_running,
            max_parallel=max_parallel,
            project_limits=world.project_limits,
            fair_share=world.fair_share,
            clock=clock,
        )
        for slot in chosen:
            clock = clock.given(slot.project, world.fair_share or {})
        queue = [s for s in queue if s not in chosen]
        live += chosen
        node_running += len(chosen)
        claims.append([s.task_id for s in chosen])
    return claims


async def build(stores: list[Store], world: ClaimWorld) -> dict[int, int]:
    """Make the world in the store: each held attempt claimed by its node while it is the
    only waiting task; then the waiting tasks. Returns store task id -> slot id."""
    slot_of: dict[int, int] = {}
    for attempt in world.running:
        store = stores[NODES.index(attempt.owner)]
        task = await store.submit(_spec(attempt.slot))
        slot_of[task] = attempt.slot.task_id
        ttl = 30.0 if attempt.live else -3600.0  # run out an hour ago
        claimed = await store.claim(attempt.owner, Limits(max_parallel=1000), lease_ttl_s=ttl)
        assert [c.task.id for c in claimed] == [task], "the world could not be built"
    later = time.time() + 3600
    for waiting in world.waiting:
        task = await stores[0].submit(
            _spec(
                waiting.slot, priority=waiting.priority, not_before=None if waiting.ready else later
            )
        )
        slot_of[task] = waiting.slot.task_id
    return slot_of


#: A parallel task that blocks the exclusive tasks of its template behind it, more of
#: them than SQLite reads in one window: SQLite's claim once chose the first task again
#: from its second window (claimed twice, the first claim's fence stale at once).
PARALLEL_BEFORE_A_FULL_WINDOW = ClaimWorld(
    running=[],
    waiting=[
        WaitingTask(Slot(1, "alpha", "build", True), 0, True),
        *(WaitingTask(Slot(i, "alpha", "build"), 0, True) for i in range(2, 8)),
        WaitingTask(Slot(8, "alpha", "lint"), 0, True),
    ],
    max_parallel=2,
    project_limits={},
)


# A fresh database per example: minutes on a loaded host, so a wider safety net.
@pytest.mark.timeout(900)
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(world=claim_worlds())
@example(world=PARALLEL_BEFORE_A_FULL_WINDOW)
def test_every_backend_claims_what_plan_claims_chooses(backend: str, world: ClaimWorld) -> None:
    """The same world through `plan_claims` and through the backend's claim gives the
    same ordered task ids, each claimed once, as a first attempt with its reason."""
    assert claimed_by(backend, world) == expected_claim(world)


def _deep_queue(ahead: int, behind: int, *, running: int = 0) -> ClaimWorld:
    """`ahead` tasks of alpha submitted first, then `behind` of beta (more than a window
    of alpha before beta's first); `running` of alpha already held by another node."""
    held = [RunningAttempt(Slot(i, "alpha"), "node-1", True) for i in range(1, running + 1)]
    first = running + 1
    return ClaimWorld(
        running=held,
        waiting=[
            *(WaitingTask(Slot(first + i, "alpha"), 0, True) for i in range(ahead)),
            *(WaitingTask(Slot(first + ahead + i, "beta"), 0, True) for i in range(behind)),
        ],
        max_parallel=4,
        project_limits={},
        fair_share={},
    )


#: Beta's first task lies behind 150 of alpha's, past every backend's first window.
BETA_BEHIND_A_DEEP_QUEUE = _deep_queue(150, 3)
#: The same, weighted 3:1 for alpha, with alpha already running twice elsewhere.
WEIGHTED_BEHIND_A_DEEP_QUEUE = replace(_deep_queue(140, 3, running=2), fair_share={"alpha": 3})
#: Alpha's first 138 tasks wait for its exclusive template, which runs: alpha's head is
#: its first task the prefilter leaves, deep in the queue; beta weighs 0.5.
BLOCKED_HEADS = ClaimWorld(
    running=[RunningAttempt(Slot(1, "alpha", "build"), "node-1", True)],
    waiting=[
        *(WaitingTask(Slot(i, "alpha", "build"), 0, True) for i in range(2, 140)),
        WaitingTask(Slot(140, "alpha", None, locks=frozenset({"gpu"})), 0, True),
        *(WaitingTask(Slot(i, "alpha"), 0, True) for i in range(141, 143)),
        WaitingTask(Slot(143, "beta", None, locks=frozenset({"gpu"})), 0, True),
        *(WaitingTask(Slot(i, "beta"), 0, True) for i in range(144, 146)),
    ],
    max_parallel=4,
    project_limits={},
    fair_share={"beta": 0.5},
)


@pytest.mark.timeout(900)
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(world=fair_claim_worlds())
@example(world=BETA_BEHIND_A_DEEP_QUEUE)
@example(world=WEIGHTED_BEHIND_A_DEEP_QUEUE)
@example(world=BLOCKED_HEADS)
def test_every_backend_claims_what_the_fair_plan_chooses(backend: str, world: ClaimWorld) -> None:
    """With fair sharing (equal or drawn weights), the backend's claims give the ordered
    choices of `plan_claims` over the whole queue, however deep a project's first task:
    a first claim of one slot, then one of the world's, which breaks ties by the clock
    the first moved on."""
    node_running = sum(1 for r in world.running if r.live and r.owner == CLAIMING_NODE)
    max_parallels = [min(node_running + 1, world.max_parallel), world.max_parallel]
    assert claimed_in_turn(backend, world, max_parallels) == expected_claims(world, max_parallels)


def claimed_by(backend: str, world: ClaimWorld) -> list[int]:
    """One claim by `CLAIMING_NODE` in a fresh store of `backend` holding `world`, as
    slot ids in the order the claim returned them."""
    (claimed,) = claimed_in_turn(backend, world, [world.max_parallel])
    return claimed


def claimed_in_turn(
    backend: str, world: ClaimWorld, max_parallels: Sequence[int]
) -> list[list[int]]:
    """Claims in a row by `CLAIMING_NODE`, each with its `max_parallel`, in a fresh
    store of `backend` holding `world`: each as slot ids in the order it returned them."""

    async def run() -> list[list[int]]:
        with tempfile.TemporaryDirectory() as tmp:
            async with BACKENDS[backend](Path(tmp)) as opener, handles(opener, 3) as stores:
                slot_of = await build(stores, world)
                claims = []
                for max_parallel in max_parallels:
                    limits = Limits(max_parallel, dict(world.project_limits), world.fair_share)
                    claims.append(await stores[0].claim(CLAIMING_NODE, limits, lease_ttl_s=30))
        for claim in (c for each in claims for c in each):
            assert (claim.fence, claim.task.attempts_used) == (1, 1)
            assert claim.task.reason == claim_reason(CLAIMING_NODE, 1, 1)
        return [[slot_of[c.task.id] for c in each] for each in claims]

    return anyio.run(run)
