"""SQLite's claim read group by group: when blocked tasks crowd the head of the queue
it lists the blocking groups with a loose index scan and reads only those that may
run. The choice must stay `plan_claims`'s: the differential worlds are run again with
every window read that way, and a queue whose head is a full project's long backlog
is claimed through the default path. A fair claim reads the head of every project
the same way, or walks the whole queue past too many groups.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, example, given, settings

from taskpool import Limits, SQLiteStore, TaskSpec
from taskpool._models import Outcome, OutcomeKind
from taskpool._rules import Slot, plan_claims
from taskpool.stores import _sqlite_claim
from tests.integration.test_claim_differential import (
    BLOCKED_HEADS,
    PARALLEL_BEFORE_A_FULL_WINDOW,
    build,
    claimed_by,
    expected_claim,
)
from tests.integration.test_store_contract import BACKENDS, handles
from tests.strategies import CLAIMING_NODE, ClaimWorld, claim_worlds, fair_claim_worlds


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(world=claim_worlds())
@example(world=PARALLEL_BEFORE_A_FULL_WINDOW)
def test_every_window_read_group_by_group_claims_what_plan_claims_chooses(
    world: ClaimWorld,
) -> None:
    """With no plain window at all (it reads nothing, so every window is read group by
    group), SQLite's claim still gives `plan_claims`'s ordered choice."""

    async def run() -> list[int]:
        with tempfile.TemporaryDirectory() as tmp:
            async with BACKENDS["sqlite"](Path(tmp)) as opener, handles(opener, 3) as stores:
                slot_of = await build(stores, world)
                limits = Limits(world.max_parallel, dict(world.project_limits))
                claims = await stores[0].claim(CLAIMING_NODE, limits, lease_ttl_s=30)
        return [slot_of[c.task.id] for c in claims]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_sqlite_claim, "PLAIN_SCAN_PER_CANDIDATE", 0)
        assert anyio.run(run) == expected_claim(world)


def _routing(spec: TaskSpec, task_id: int) -> Slot:
    return Slot(task_id, spec.project, spec.template, spec.template_parallel, spec.locks)


async def test_a_full_projects_backlog_ahead_is_skipped_and_the_choice_kept(
    tmp_path: Path,
) -> None:
    """A project at its limit has far more tasks waiting at the head of the queue than a
    plain window reads; behind them wait tasks of several groups (an exclusive
    template, a parallel one, a lock, another full project). Each claim, until the
    queue behind is empty, makes `plan_claims`'s choice over the whole queue."""
    full = TaskSpec.build(["true"], project="full")
    behind = [
        TaskSpec.build(["true"], project="p", template="t"),
        TaskSpec.build(["true"], project="p", template="t", template_parallel=True),
        TaskSpec.build(["true"], project="q", locks=["db"]),
        TaskSpec.build(["true"], project="full"),
        TaskSpec.build(["true"], project="q", priority=1),
        TaskSpec.build(["true"], project="r", template="t"),
    ] * 4
    limits = Limits(3, {"full": 1})
    async with SQLiteStore(tmp_path / "groups.db") as store:
        (holder,) = await store.submit_many([full])
        assert [c.task.id for c in await store.claim("other-node", limits, 60)] == [holder]
        ids = await store.submit_many([full] * 500 + behind)
        routing = {
            task_id: _routing(spec, task_id)
            for task_id, spec in zip(ids, [full] * 500 + behind, strict=True)
        }
        priority = {
            task_id: spec.priority for task_id, spec in zip(ids, [full] * 500 + behind, strict=True)
        }
        running = {holder: Slot(holder, "full")}
        mine: set[int] = set()
        waiting = set(ids)
        claimed_any = True
        while claimed_any:
            queue = sorted(waiting, key=lambda i: (-priority[i], i))
            expected = plan_claims(
                [routing[i] for i in queue],
                list(running.values()),
                node_running=len(mine),
                max_parallel=limits.max_parallel,
                project_limits=limits.project_limits,
            )
            claims = await store.claim(CLAIMING_NODE, limits, 60)
            assert [c.task.id for c in claims] == [s.task_id for s in expected]
            for claim in claims:
                waiting.discard(claim.task.id)
                running[claim.task.id] = routing[claim.task.id]
                mine.add(claim.task.id)
            # End them all, so the next claim has free slots again.
            for claim in claims:
                await store.finish(claim.task.id, claim.fence, _exited())
                del running[claim.task.id]
                mine.discard(claim.task.id)
            claimed_any = bool(claims)
        assert all(routing[i].project == "full" for i in waiting)
        assert len(waiting) == 500 + 4  # the full project's tasks, never claimable


def _exited() -> Outcome:
    return Outcome(OutcomeKind.EXITED, "exited with 0", 0)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(world=fair_claim_worlds())
@example(world=BLOCKED_HEADS)
def test_a_fair_claim_past_too_many_groups_walks_the_queue_to_the_same_choice(
    world: ClaimWorld,
) -> None:
    """With more blocking groups than SQLite lists (as if `MAX_GROUPS` were 1), a fair
    claim reads every project's head by walking the whole queue instead, and still
    gives the fair plan's ordered choice."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_sqlite_claim, "MAX_GROUPS", 1)
        assert claimed_by("sqlite", world) == expected_claim(world)
