"""Fair sharing in the pure rules: `plan_claims` with `fair_share`, its windows, its clock."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskpool import TaskPool
from taskpool._rules import (
    FairClock,
    Occupancy,
    Prefilter,
    Slot,
    blocked_by,
    check_fair_share,
    claim_fair_in_windows,
    fair_tags,
    plan_claims,
)
from tests.strategies import (
    PROJECTS,
    ClaimScenario,
    claim_scenarios,
    fair_claim_scenarios,
    projects,
    weights,
)

scenario_settings = settings(max_examples=300, deadline=None)


@st.composite
def fair_clocks(draw: st.DrawFn) -> FairClock:
    """A fair clock as a store holds it: tags from slots given by fair claims before."""
    clock = FairClock()
    share = draw(st.dictionaries(projects, weights))
    for project in draw(st.lists(projects, max_size=8)):
        clock = clock.given(project, share)
    return clock


def fair_plan(
    sc: ClaimScenario, share: Mapping[str, float], clock: FairClock | None = None
) -> list[Slot]:
    return plan_claims(
        sc.candidates,
        sc.running,
        node_running=sc.node_running,
        max_parallel=sc.max_parallel,
        project_limits=sc.project_limits,
        fair_share=share,
        clock=clock,
    )


def ids_of(slots: Sequence[Slot]) -> list[int]:
    return [s.task_id for s in slots]


@st.composite
def open_queues(draw: st.DrawFn) -> tuple[ClaimScenario, dict[str, float]]:
    """Only projects (no template, lock or limit): every project has at least as many
    waiting tasks as the node has slots, in a random interleaving; some already run."""
    max_parallel = draw(st.integers(min_value=1, max_value=8))
    running = [Slot(1000 + i, p) for i, p in enumerate(draw(st.lists(projects, max_size=8)))]
    node_running = draw(st.integers(min_value=0, max_value=min(len(running), max_parallel)))
    order = draw(st.permutations([p for p in PROJECTS for _ in range(max_parallel)]))
    share = draw(st.just({}) | st.dictionaries(projects, weights, min_size=1))
    candidates = [Slot(i + 1, p) for i, p in enumerate(order)]
    return ClaimScenario(candidates, running, node_running, max_parallel, {}), share


# --- properties -----------------------------------------------------------------------


@scenario_settings
@given(fair_claim_scenarios(), fair_clocks())
def test_a_fair_plan_never_chooses_a_blocked_task(
    case: tuple[ClaimScenario, Mapping[str, float]], clock: FairClock
) -> None:
    """Each task the fair plan chooses is runnable when its slot is given, counting
    what runs and what was chosen before it."""
    sc, share = case
    occ = Occupancy.of(sc.running, node_running=sc.node_running)
    for slot in fair_plan(sc, share, clock):
        assert (
            blocked_by(slot, occ, max_parallel=sc.max_parallel, project_limits=sc.project_limits)
            is None
        )
        occ.take(slot, on_this_node=True)


@scenario_settings
@given(fair_claim_scenarios(), fair_clocks())
def test_a_fair_plan_leaves_no_runnable_task_while_a_slot_is_free(
    case: tuple[ClaimScenario, Mapping[str, float]], clock: FairClock
) -> None:
    """Fair sharing changes which task gets a slot, not how many: it stops only with the
    node full or every other candidate blocked."""
    sc, share = case
    chosen = fair_plan(sc, share, clock)
    occ = Occupancy.of([*sc.running, *chosen], node_running=sc.node_running + len(chosen))
    if occ.node_running < sc.max_parallel:
        for slot in sc.candidates:
            if slot not in chosen:
                assert blocked_by(
                    slot, occ, max_parallel=sc.max_parallel, project_limits=sc.project_limits
                )


@scenario_settings
@given(claim_scenarios(), fair_clocks())
def test_without_fair_share_the_plan_is_queue_order_as_before(
    sc: ClaimScenario, clock: FairClock
) -> None:
    """`fair_share=None` is the plain plan, whatever the clock: the first runnable tasks
    in queue order."""
    plain = plan_claims(
        sc.candidates,
        sc.running,
        node_running=sc.node_running,
        max_parallel=sc.max_parallel,
        project_limits=sc.project_limits,
    )
    unfair = plan_claims(
        sc.candidates,
        sc.running,
        node_running=sc.node_running,
        max_parallel=sc.max_parallel,
        project_limits=sc.project_limits,
        fair_share=None,
        clock=clock,
    )
    assert unfair == plain
    occ = Occupancy.of(sc.running, node_running=sc.node_running)
    expected = []
    for slot in sc.candidates:
        if not blocked_by(
            slot, occ, max_parallel=sc.max_parallel, project_limits=sc.project_limits
        ):
            occ.take(slot, on_this_node=True)
            expected.append(slot)
    assert plain == expected


@scenario_settings
@given(fair_claim_scenarios(), fair_clocks())
def test_within_a_project_slots_go_in_queue_order(
    case: tuple[ClaimScenario, Mapping[str, float]], clock: FairClock
) -> None:
    """The tasks of one project are given slots in queue order, and a task of a project
    is passed over only if it was blocked when its project's slot was given."""
    sc, share = case
    chosen = fair_plan(sc, share, clock)
    position = {s.task_id: i for i, s in enumerate(sc.candidates)}
    occ = Occupancy.of(sc.running, node_running=sc.node_running)
    for slot in chosen:
        earlier = [
            c
            for c in sc.candidates
            if c.project == slot.project
            and position[c.task_id] < position[slot.task_id]
            and c not in chosen
        ]
        for passed in earlier:
            assert blocked_by(
                passed, occ, max_parallel=sc.max_parallel, project_limits=sc.project_limits
            )
        occ.take(slot, on_this_node=True)
    for project in PROJECTS:
        mine = [position[s.task_id] for s in chosen if s.project == project]
        assert mine == sorted(mine)


@scenario_settings
@given(open_queues())
def test_slots_split_in_proportion_to_weights_within_one_slot(
    case: tuple[ClaimScenario, dict[str, float]],
) -> None:
    """With nothing blocking and work in every project, a project given a slot would,
    without its last one, run no more per weight than any other does after the claim."""
    sc, share = case
    chosen = fair_plan(sc, share)
    assert len(chosen) == sc.max_parallel - sc.node_running
    after = Counter(s.project for s in [*sc.running, *chosen])
    weight = {p: share.get(p, 1.0) for p in PROJECTS}
    for p in {s.project for s in chosen}:
        for q in PROJECTS:
            assert (after[p] - 1) / weight[p] <= after[q] / weight[q]


@scenario_settings
@given(open_queues())
def test_equal_shares_from_nothing_running_differ_by_at_most_one(
    case: tuple[ClaimScenario, dict[str, float]],
) -> None:
    """Equal weights, nothing running, enough work in every project: the slots of one
    claim split across the projects as evenly as they can."""
    sc, _ = case
    sc = replace(sc, running=[], node_running=0)
    counts = Counter(s.project for s in fair_plan(sc, {}))
    spread = [counts[p] for p in PROJECTS]
    assert max(spread) - min(spread) <= 1


def one_slot_claims(
    queue: list[Slot],
    share: Mapping[str, float],
    slots: int,
    ends: Callable[[list[Slot]], Slot | None],
) -> Iterator[tuple[Slot, list[Slot]]]:
    """Claims of one slot each on a node of `slots` until `queue` is empty, the clock
    kept as a store keeps it; before each, `ends` may pick a running task to end (one
    must end when the node is full). Yields each claim's task and what ran beside it."""
    running: list[Slot] = []
    tags: dict[str, tuple[float, float]] = {}
    while queue:
        ending = ends(running)
        if ending is None and len(running) >= slots:
            ending = running[0]
        if ending is not None:
            running.remove(ending)
        clock = FairClock.of(tags)
        chosen = plan_claims(
            queue,
            running,
            node_running=len(running),
            max_parallel=len(running) + 1,
            project_limits={},
            fair_share=share,
            clock=clock,
        )
        assert len(chosen) == 1
        tags.update(fair_tags(clock, chosen, share))
        yield chosen[0], list(running)
        queue.remove(chosen[0])
        running.append(chosen[0])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(projects, min_size=1, max_size=40),
    st.dictionaries(projects, weights),
    st.integers(min_value=1, max_value=4),
    st.data(),
)
def test_a_project_with_nothing_running_is_never_starved(
    order: list[str], share: dict[str, float], slots: int, data: st.DataObject
) -> None:
    """Slots claimed one at a time, any running task ending in between (as the draw
    says): a project with waiting work and nothing running is passed over at most
    floor(w/its weight) + 1 times for each other project of weight w (with equal
    weights, twice per other project; once, from a clock it has not run ahead of),
    however deep the others' queues; the clock's tags see to it."""
    weight = {p: share.get(p, 1.0) for p in PROJECTS}

    def ends(running: list[Slot]) -> Slot | None:
        return data.draw(st.none() | st.sampled_from(running)) if running else None

    passed_over: Counter[str] = Counter()  # while waiting with nothing running
    queue = [Slot(i + 1, p) for i, p in enumerate(order)]
    for slot, running in one_slot_claims(queue, share, slots, ends):
        idle = {s.project for s in queue} - {s.project for s in running} - {slot.project}
        for project in idle:
            passed_over[project] += 1
            bound = sum(
                math.floor(weight[other] / weight[project] + 1e-9) + 1
                for other in PROJECTS
                if other != project
            )
            assert passed_over[project] <= bound
        passed_over.pop(slot.project, None)
        for project in set(passed_over) - idle:
            del passed_over[project]  # it has something running again: not starved


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(projects, weights, min_size=1),
    st.integers(min_value=1, max_value=60),
)
def test_one_slot_at_a_time_goes_round_robin_by_weight(
    share: dict[str, float], claims: int
) -> None:
    """A node of one slot, every task ending before the next claim (nothing runs at any
    claim, so running counts tie): while every project has work, the slots given so far
    split by weight within one slot's worth of each, as start-time fair queuing does."""
    queue = [Slot(i * len(PROJECTS) + j + 1, p) for i in range(60) for j, p in enumerate(PROJECTS)]
    weight = {p: share.get(p, 1.0) for p in PROJECTS}
    given: Counter[str] = Counter()
    for n, (slot, _) in enumerate(one_slot_claims(queue, share, 1, lambda r: None)):
        if n == claims:
            break
        given[slot.project] += 1
        for p in PROJECTS:
            for q in PROJECTS:
                assert given[p] / weight[p] - given[q] / weight[q] <= (
                    1 / weight[p] + 1 / weight[q] + 1e-9
                )


@scenario_settings
@given(fair_claim_scenarios(), fair_clocks(), st.integers(min_value=1, max_value=6))
def test_claiming_fairly_in_windows_chooses_what_the_fair_plan_chooses(
    case: tuple[ClaimScenario, Mapping[str, float]], clock: FairClock, max_window: int
) -> None:
    """Reading each project's head a window at a time behind the prefilter gives the
    same choice, in the same order, as the fair plan over the whole queue."""
    sc, share = case
    reads: list[int] = []

    def fetch_heads(prefilter: Prefilter, taken: Sequence[int], n: int) -> list[Slot]:
        reads.append(n)
        kept = [c for c in sc.candidates if not prefilter.drops(c) and c.task_id not in taken]
        per_project: Counter[str] = Counter()
        heads = []
        for slot in kept:
            if per_project[slot.project] < n:
                per_project[slot.project] += 1
                heads.append(slot)
        return heads

    chosen = claim_fair_in_windows(
        fetch_heads,
        sc.running,
        node_running=sc.node_running,
        max_parallel=sc.max_parallel,
        project_limits=sc.project_limits,
        fair_share=share,
        clock=clock,
        max_window=max_window,
    )
    assert ids_of(chosen) == ids_of(fair_plan(sc, share, clock))
    assert all(n <= max_window for n in reads)


# --- examples -------------------------------------------------------------------------


def test_a_shallow_project_behind_a_deep_one_is_interleaved() -> None:
    """200 tasks of A submitted before 20 of B: four slots go A, B, A, B."""
    queue = [Slot(i, "A") for i in range(1, 201)] + [Slot(i, "B") for i in range(201, 221)]
    chosen = plan_claims(
        queue, [], node_running=0, max_parallel=4, project_limits={}, fair_share={}
    )
    assert ids_of(chosen) == [1, 201, 2, 202]


def test_weights_three_to_one() -> None:
    """A weighing 3 and B 1 split eight slots six to two."""
    queue = [Slot(i, "A") for i in range(1, 21)] + [Slot(i, "B") for i in range(21, 41)]
    chosen = plan_claims(
        queue, [], node_running=0, max_parallel=8, project_limits={}, fair_share={"A": 3}
    )
    assert Counter(s.project for s in chosen) == {"A": 6, "B": 2}


def test_running_tasks_on_other_nodes_count() -> None:
    """A project already running elsewhere waits for the others to catch up."""
    queue = [Slot(1, "A"), Slot(2, "A"), Slot(3, "B")]
    running = [Slot(100, "A"), Slot(101, "A")]
    chosen = plan_claims(
        queue, running, node_running=0, max_parallel=2, project_limits={}, fair_share={}
    )
    assert ids_of(chosen) == [3, 1]


def test_a_tie_goes_to_the_earliest_start_tag() -> None:
    """With as many running per weight, the project whose start tag is earliest wins,
    whatever the queue says; one that waited idle starts at the clock's now."""
    queue = [Slot(1, "A"), Slot(2, "B"), Slot(3, "C")]

    def first(clock: FairClock) -> list[int]:
        return ids_of(
            plan_claims(
                queue,
                [],
                node_running=0,
                max_parallel=1,
                project_limits={},
                fair_share={},
                clock=clock,
            )
        )

    assert first(FairClock(2.0, {"A": 4.0, "B": 3.0, "C": 5.0})) == [2]
    assert first(FairClock(2.0, {"A": 4.0, "B": 3.0})) == [3]  # C starts at 2
    assert first(FairClock(2.0, {"A": 1.0, "B": 0.5})) == [1]  # both at 2: the queue
    assert first(FairClock()) == [1]


def test_a_claim_records_each_projects_latest_tags() -> None:
    """The tags a claim records: per project, its latest slot's start and finish, each
    slot starting at max(now, the project's finish) and lasting 1 / weight."""
    chosen = [Slot(1, "A"), Slot(3, "C"), Slot(4, "A")]
    tags = fair_tags(FairClock(1.0, {"A": 2.0}), chosen, {"A": 2.0, "C": 0.5})
    assert tags == {"A": (2.5, 3.0), "C": (2.0, 4.0)}
    assert FairClock.of(tags) == FairClock(2.5, {"A": 3.0, "C": 4.0})


def test_fair_share_option_values() -> None:
    """True weighs every project 1, None and False turn fair sharing off, a mapping
    keeps its weights as floats."""
    assert check_fair_share(True) == {}
    assert check_fair_share(None) is None
    assert check_fair_share(False) is None
    assert check_fair_share({"a": 3, "b": 0.5}) == {"a": 3.0, "b": 0.5}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"a": 0}, "the weight of project 'a' must be a finite number above 0, got 0"),
        ({"a": -1.5}, "the weight of project 'a' must be a finite number above 0, got -1.5"),
        ({"a": math.inf}, "the weight of project 'a' must be a finite number above 0, got inf"),
        ({"a": math.nan}, "the weight of project 'a' must be a finite number above 0, got nan"),
        ({"a": "2"}, "the weight of project 'a' must be a finite number above 0, got '2'"),
        ({"a": True}, "the weight of project 'a' must be a finite number above 0, got True"),
        ({"": 1}, "a project must be a non-empty string, got ''"),
        ("yes", "fair_share must be None, True or a mapping of project to weight, got 'yes'"),
    ],
)
def test_a_bad_fair_share_is_refused_when_the_pool_is_made(
    value: object, message: str, tmp_path: Path
) -> None:
    """A weight that is not a finite number above 0 is a ValueError naming the project,
    raised by TaskPool before it opens (or creates) any store."""
    with pytest.raises(ValueError, match=re.escape(message)):
        TaskPool(tmp_path / "never.db", fair_share=value)  # type: ignore[arg-type]
    assert not (tmp_path / "never.db").exists()
