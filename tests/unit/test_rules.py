"""The blocking policy: `plan_claims` and `blocked_by` over plain data."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from taskpool._rules import (
    Group,
    Occupancy,
    Prefilter,
    QueueKey,
    Slot,
    blocked_by,
    claim_in_windows,
    merge_group_windows,
    plan_claims,
)
from tests.strategies import ClaimScenario, claim_scenarios, coexist

scenario_settings = settings(max_examples=200, deadline=None)


def plan(sc: ClaimScenario) -> list[Slot]:
    return plan_claims(
        sc.candidates,
        sc.running,
        node_running=sc.node_running,
        max_parallel=sc.max_parallel,
        project_limits=sc.project_limits,
    )


def occupancy(sc: ClaimScenario, started: Iterable[Slot]) -> Occupancy:
    """What is occupied once `started` have been claimed on this node on top of `running`."""
    occ = Occupancy.of(sc.running, node_running=sc.node_running)
    for slot in started:
        occ.take(slot, on_this_node=True)
    return occ


def why(sc: ClaimScenario, slot: Slot, occ: Occupancy) -> str | None:
    return blocked_by(slot, occ, max_parallel=sc.max_parallel, project_limits=sc.project_limits)


def chosen_before(chosen: Sequence[Slot], candidates: Sequence[Slot], index: int) -> list[Slot]:
    """The chosen slots that come before position `index` of the queue."""
    earlier = {slot.task_id for slot in candidates[:index]}
    return [slot for slot in chosen if slot.task_id in earlier]


# --- properties ---------------------------------------------------------------


@scenario_settings
@given(claim_scenarios())
def test_never_more_chosen_than_free_node_slots(sc: ClaimScenario) -> None:
    """At most `max_parallel - node_running` candidates are chosen (none when over)."""
    assert len(plan(sc)) <= max(0, sc.max_parallel - sc.node_running)


@scenario_settings
@given(claim_scenarios())
def test_project_limits_hold_counting_running_and_chosen(sc: ClaimScenario) -> None:
    """A limited project gets a new task only while running + chosen stays within its limit."""
    chosen = plan(sc)
    running = Counter(slot.project for slot in sc.running)
    started = Counter(slot.project for slot in chosen)
    for project, limit in sc.project_limits.items():
        if started[project]:
            assert running[project] + started[project] <= limit, project


@scenario_settings
@given(claim_scenarios())
def test_exclusive_templates_never_overlap(sc: ClaimScenario) -> None:
    """Across running + chosen, an exclusive task of a template is the only task of it."""
    together = [*sc.running, *plan(sc)]
    for template in {slot.template for slot in together if slot.template is not None}:
        of_template = [slot for slot in together if slot.template == template]
        exclusive = [slot for slot in of_template if not slot.template_parallel]
        assert len(exclusive) <= 1, template
        if exclusive:
            assert of_template == exclusive, template


@scenario_settings
@given(claim_scenarios())
def test_no_lock_is_held_twice(sc: ClaimScenario) -> None:
    """Across running + chosen, every lock is named by at most one task."""
    together = [*sc.running, *plan(sc)]
    holders = Counter(lock for slot in together for lock in slot.locks)
    assert all(count == 1 for count in holders.values()), holders


@scenario_settings
@given(claim_scenarios())
def test_chosen_tasks_coexist_with_running_and_each_other(sc: ClaimScenario) -> None:
    """Each chosen task is compatible (templates, locks) with everything else that runs."""
    chosen = plan(sc)
    for i, slot in enumerate(chosen):
        assert coexist(slot, [*sc.running, *chosen[:i], *chosen[i + 1 :]]), slot


@scenario_settings
@given(claim_scenarios())
def test_every_unchosen_candidate_is_blocked(sc: ClaimScenario) -> None:
    """No head-of-line blocking: a candidate left waiting is blocked, or the node is full."""
    chosen = plan(sc)
    occ = occupancy(sc, chosen)
    ids = {slot.task_id for slot in chosen}
    for slot in sc.candidates:
        if slot.task_id not in ids and occ.node_running < sc.max_parallel:
            assert why(sc, slot, occ) is not None, slot


@scenario_settings
@given(claim_scenarios())
def test_chosen_keeps_queue_order(sc: ClaimScenario) -> None:
    """The chosen tasks are a subsequence of the candidates, in the same order."""
    chosen = plan(sc)
    positions = {slot.task_id: i for i, slot in enumerate(sc.candidates)}
    indexes = [positions[slot.task_id] for slot in chosen]
    assert indexes == sorted(set(indexes))
    assert [sc.candidates[i] for i in indexes] == chosen


@scenario_settings
@given(claim_scenarios())
def test_skipped_candidate_was_blocked_when_its_turn_came(sc: ClaimScenario) -> None:
    """An unchosen candidate ahead of a chosen one was blocked by what ran or started before it."""
    chosen = plan(sc)
    ids = {slot.task_id for slot in chosen}
    last = max((i for i, s in enumerate(sc.candidates) if s.task_id in ids), default=-1)
    for i, slot in enumerate(sc.candidates[:last]):
        if slot.task_id not in ids:
            occ = occupancy(sc, chosen_before(chosen, sc.candidates, i))
            assert why(sc, slot, occ) is not None, slot


@scenario_settings
@given(claim_scenarios())
def test_free_candidate_is_chosen_in_its_turn(sc: ClaimScenario) -> None:
    """Greedy FIFO: a candidate free at its turn is chosen, so the earliest of a group wins."""
    chosen = plan(sc)
    ids = {slot.task_id for slot in chosen}
    for i, slot in enumerate(sc.candidates):
        occ = occupancy(sc, chosen_before(chosen, sc.candidates, i))
        assert (slot.task_id in ids) == (why(sc, slot, occ) is None), slot


@scenario_settings
@given(claim_scenarios())
def test_earlier_task_of_a_blocking_group_wins(sc: ClaimScenario) -> None:
    """An earlier task that conflicts with a chosen later one lost only because it was blocked."""
    chosen = plan(sc)
    ids = {slot.task_id for slot in chosen}
    for j, later in enumerate(sc.candidates):
        if later.task_id not in ids:
            continue
        for i, earlier in enumerate(sc.candidates[:j]):
            if earlier.task_id in ids or coexist(earlier, [later]):
                continue
            occ = occupancy(sc, chosen_before(chosen, sc.candidates, i))
            assert why(sc, earlier, occ) is not None, (earlier, later)


@scenario_settings
@given(claim_scenarios())
def test_blocked_by_agrees_with_the_rules_written_out(sc: ClaimScenario) -> None:
    """`blocked_by` finds a candidate free exactly when the rules, written out anew, do."""
    occ = Occupancy.of(sc.running, node_running=sc.node_running)
    per_project = Counter(slot.project for slot in sc.running)
    for slot in sc.candidates:
        limit = sc.project_limits.get(slot.project)
        free = (
            sc.node_running < sc.max_parallel
            and (limit is None or per_project[slot.project] < limit)
            and coexist(slot, sc.running)
        )
        assert (why(sc, slot, occ) is None) == free, slot


@given(claim_scenarios())
def test_plan_does_not_depend_on_running_order(sc: ClaimScenario) -> None:
    """Only the set of running attempts matters, not the order they are listed in."""
    backwards = ClaimScenario(
        sc.candidates,
        list(reversed(sc.running)),
        sc.node_running,
        sc.max_parallel,
        sc.project_limits,
    )
    assert plan(backwards) == plan(sc)


@given(st.lists(st.integers(min_value=-3, max_value=3), max_size=5))
def test_empty_queue_chooses_nothing(node_runnings: list[int]) -> None:
    """With no candidates nothing is chosen, whatever the node's load."""
    for node_running in node_runnings:
        assert (
            plan_claims([], [], node_running=node_running, max_parallel=2, project_limits={}) == []
        )


# --- the prefilter and the claim windows (what SQLite's claim runs) ---------------


@scenario_settings
@given(claim_scenarios())
def test_the_prefilter_never_drops_a_task_plan_claims_would_choose(sc: ClaimScenario) -> None:
    """Every task the prefilter drops is blocked by the rules for a reason other than the
    node's own limit (so it stays blocked while the claim goes on), and none is chosen."""
    occ = occupancy(sc, [])
    prefilter = Prefilter.of(occ, sc.project_limits)
    chosen = ids_of(plan(sc))
    unlimited = Occupancy.of(sc.running, node_running=0)
    for candidate in sc.candidates:
        if prefilter.drops(candidate):
            assert candidate.task_id not in chosen
            assert blocked_by(
                candidate, unlimited, max_parallel=1, project_limits=sc.project_limits
            )


def windowed(sc: ClaimScenario, max_window: int, reads: list[int] | None = None) -> list[Slot]:
    """`claim_in_windows` over the scenario's queue, read as SQLite's query reads it."""

    def fetch(prefilter: Prefilter, taken: Sequence[int], window: int) -> list[Slot]:
        if reads is not None:
            reads.append(window)
        kept = [c for c in sc.candidates if not prefilter.drops(c) and c.task_id not in taken]
        return kept[:window]

    return claim_in_windows(
        fetch,
        sc.running,
        node_running=sc.node_running,
        max_parallel=sc.max_parallel,
        project_limits=sc.project_limits,
        max_window=max_window,
    )


@scenario_settings
@given(claim_scenarios(), st.integers(min_value=1, max_value=6))
def test_claiming_in_windows_chooses_what_plan_claims_chooses(
    sc: ClaimScenario, max_window: int
) -> None:
    """Whatever the window size, reading the queue a window at a time behind the
    prefilter gives the same choice, in the same order, as planning over all of it."""
    assert ids_of(windowed(sc, max_window)) == ids_of(plan(sc))


def test_a_task_chosen_from_one_window_is_never_read_again() -> None:
    """A parallel task blocks the exclusive ones of its template behind it but not
    itself: the next window must leave it out, or it would be claimed twice."""
    sc = ClaimScenario(
        candidates=[
            slot(1, template="t", parallel=True),
            *(slot(i, template="t") for i in range(2, 8)),
            slot(8, template="u"),
        ],
        running=[],
        node_running=0,
        max_parallel=2,
        project_limits={},
    )
    reads: list[int] = []
    assert ids_of(windowed(sc, max_window=64, reads=reads)) == [1, 8]
    assert len(reads) == 2  # a full first window, and a second one behind it


# --- reading a window group by group (what SQLite's claim runs when blocked tasks
# crowd the head of the queue) ------------------------------------------------------


@scenario_settings
@given(claim_scenarios())
def test_a_group_the_prefilter_blocks_whole_holds_only_tasks_it_drops(sc: ClaimScenario) -> None:
    """Skipping a blocked group without reading it never skips a task the prefilter
    would keep; what it keeps of other groups it decides by their locks alone."""
    prefilter = Prefilter.of(occupancy(sc, []), sc.project_limits)
    for candidate in sc.candidates:
        lock_clash = not candidate.locks.isdisjoint(prefilter.locks_held)
        blocked_whole = prefilter.blocks_group(Group.of(candidate))
        assert prefilter.drops(candidate) == (blocked_whole or lock_clash)


def by_groups(
    queue: Sequence[tuple[QueueKey, Slot]], prefilter: Prefilter, taken: Sequence[int], window: int
) -> list[Slot]:
    """The window as SQLite reads it group by group: the groups listed (every group of
    the queue, a loose index scan does not read them), those `blocks_group` rules out
    skipped whole, the rest ranked by their first task the task filters (locks held,
    taken) leave; then `merge_group_windows` reads from the ranked groups only."""

    def task_left(slot: Slot) -> bool:
        return slot.locks.isdisjoint(prefilter.locks_held) and slot.task_id not in taken

    reads: list[tuple[Group, int]] = []

    def fetch_group(group: Group, n: int) -> list[tuple[QueueKey, Slot]]:
        assert not prefilter.blocks_group(group), "a blocked group was read"
        reads.append((group, n))
        return [(k, s) for k, s in queue if Group.of(s) == group and task_left(s)][:n]

    heads: dict[Group, QueueKey] = {}
    for key, slot in queue:  # in queue order: the first one left is the group's head
        group = Group.of(slot)
        if not prefilter.blocks_group(group) and task_left(slot):
            heads.setdefault(group, key)
    ranked = sorted(heads, key=heads.__getitem__)
    merged = merge_group_windows(ranked, fetch_group, lambda entry: entry[0], window)
    assert len(reads) <= window
    return [slot for _, slot in merged]


queue_priorities = st.lists(st.integers(min_value=-2, max_value=2), min_size=12, max_size=12)


def queue_of(sc: ClaimScenario, priorities: Sequence[int]) -> list[tuple[QueueKey, Slot]]:
    """The scenario's candidates with the drawn priorities, in queue order."""
    keyed = [((-p, s.task_id), s) for s, p in zip(sc.candidates, priorities, strict=False)]
    return sorted(keyed, key=lambda entry: entry[0])


@scenario_settings
@given(
    claim_scenarios(),
    queue_priorities,
    st.integers(min_value=1, max_value=8),
    st.lists(st.integers(min_value=1, max_value=12), max_size=4),
)
def test_a_window_read_group_by_group_is_the_plain_window(
    sc: ClaimScenario, priorities: list[int], window: int, taken: list[int]
) -> None:
    """Whatever the priorities, the window and the tasks taken already, reading group by
    group gives the same tasks, in the same order, as filtering the whole queue."""
    queue = queue_of(sc, priorities)
    prefilter = Prefilter.of(occupancy(sc, []), sc.project_limits)
    plain = [s for _, s in queue if not prefilter.drops(s) and s.task_id not in taken]
    assert ids_of(by_groups(queue, prefilter, taken, window)) == ids_of(plain[:window])


@scenario_settings
@given(claim_scenarios(), st.integers(min_value=1, max_value=6))
def test_claiming_with_windows_read_group_by_group_chooses_what_plan_claims_chooses(
    sc: ClaimScenario, max_window: int
) -> None:
    """`claim_in_windows` whose every window is read group by group (as SQLite reads it
    when blocked tasks crowd the queue) still makes `plan_claims`'s choice."""
    queue = [((0, s.task_id), s) for s in sc.candidates]

    def fetch(prefilter: Prefilter, taken: Sequence[int], window: int) -> list[Slot]:
        return by_groups(queue, prefilter, taken, window)

    chosen = claim_in_windows(
        fetch,
        sc.running,
        node_running=sc.node_running,
        max_parallel=sc.max_parallel,
        project_limits=sc.project_limits,
        max_window=max_window,
    )
    assert ids_of(chosen) == ids_of(plan(sc))


def test_a_group_ranked_late_is_read_only_as_far_as_it_can_reach() -> None:
    """Of three groups, the first is read for the whole window, the second for one task
    fewer, the third for two fewer; the merged window keeps queue order across them."""
    queue = [
        ((0, 1), slot(1, "a")),
        ((0, 2), slot(2, "b")),
        ((0, 3), slot(3, "a")),
        ((0, 4), slot(4, "c")),
        ((0, 5), slot(5, "b")),
    ]
    reads: list[tuple[str, int]] = []

    def fetch_group(project: str, n: int) -> list[tuple[QueueKey, Slot]]:
        reads.append((project, n))
        return [(k, s) for k, s in queue if s.project == project][:n]

    merged = merge_group_windows(["a", "b", "c"], fetch_group, lambda e: e[0], window=3)
    assert [s.task_id for _, s in merged] == [1, 2, 3]
    assert reads == [("a", 3), ("b", 2), ("c", 1)]


# --- examples that read like documentation ---------------------------------------


def slot(
    task_id: int,
    project: str = "p",
    *,
    template: str | None = None,
    parallel: bool = False,
    locks: Iterable[str] = (),
) -> Slot:
    return Slot(task_id, project, template, parallel, frozenset(locks))


def ids_of(slots: Iterable[Slot]) -> list[int]:
    return [s.task_id for s in slots]


def test_later_task_of_another_project_starts_while_earlier_one_waits_for_its_template() -> None:
    """A task blocked by its running template does not hold up an unrelated task behind it."""
    running = [slot(100, "web", template="deploy")]
    candidates = [slot(1, "web", template="deploy"), slot(2, "batch", template="report")]
    chosen = plan_claims(candidates, running, node_running=1, max_parallel=4, project_limits={})
    assert ids_of(chosen) == [2]


def test_lock_held_by_running_task_blocks_every_task_naming_it() -> None:
    """While a running task holds a lock, no task naming that lock starts; others do."""
    running = [slot(100, locks={"db"})]
    candidates = [
        slot(1, "a", locks={"db"}),
        slot(2, "b", locks={"db", "gpu"}),
        slot(3, "c", template="t", locks={"db"}),
        slot(4, "d", locks={"gpu"}),
    ]
    chosen = plan_claims(candidates, running, node_running=0, max_parallel=10, project_limits={})
    assert ids_of(chosen) == [4]
    occ = Occupancy.of(running, node_running=0)
    for candidate in candidates[:3]:
        reason = blocked_by(candidate, occ, max_parallel=10, project_limits={})
        assert reason == "lock 'db' is held"


def test_candidates_start_in_queue_order_when_the_node_has_few_slots() -> None:
    """Candidates come in priority order, and the free slots go to the first of them."""
    candidates = [slot(7), slot(3), slot(5), slot(1)]
    chosen = plan_claims(candidates, [], node_running=0, max_parallel=2, project_limits={})
    assert ids_of(chosen) == [7, 3]


def test_first_of_two_exclusive_tasks_of_a_template_wins() -> None:
    """Of two waiting tasks of an exclusive template, only the earlier one starts."""
    candidates = [slot(1, template="t"), slot(2, template="t")]
    chosen = plan_claims(candidates, [], node_running=0, max_parallel=4, project_limits={})
    assert ids_of(chosen) == [1]


def test_parallel_tasks_of_a_template_run_together_but_not_beside_an_exclusive_one() -> None:
    """Parallel tasks of one template start together; an exclusive one of it waits for them."""
    candidates = [
        slot(1, template="t", parallel=True),
        slot(2, template="t", parallel=True),
        slot(3, template="t"),
    ]
    chosen = plan_claims(candidates, [], node_running=0, max_parallel=4, project_limits={})
    assert ids_of(chosen) == [1, 2]
    occ = Occupancy.of(chosen, node_running=2)
    reason = blocked_by(candidates[2], occ, max_parallel=4, project_limits={})
    assert reason == "template 't' does not allow parallel runs"


def test_running_exclusive_task_blocks_parallel_tasks_of_its_template() -> None:
    """A running exclusive task of a template keeps even parallel tasks of it waiting."""
    running = [slot(100, template="t")]
    candidates = [slot(1, template="t", parallel=True)]
    assert plan_claims(candidates, running, node_running=1, max_parallel=4, project_limits={}) == []
    reason = blocked_by(
        candidates[0], Occupancy.of(running, node_running=1), max_parallel=4, project_limits={}
    )
    assert reason == "template 't' is running and does not allow parallel runs"


def test_project_limit_counts_tasks_running_on_every_node() -> None:
    """A project at its limit across the cluster starts nothing more, even on an idle node."""
    running = [slot(100, "web"), slot(101, "web")]
    candidates = [slot(1, "web"), slot(2, "api")]
    chosen = plan_claims(
        candidates, running, node_running=0, max_parallel=4, project_limits={"web": 2}
    )
    assert ids_of(chosen) == [2]
    occ = Occupancy.of(running, node_running=0)
    reason = blocked_by(candidates[0], occ, max_parallel=4, project_limits={"web": 2})
    assert reason == "project 'web' is at its limit of 2 running"


def test_full_node_starts_nothing() -> None:
    """A node already running `max_parallel` attempts claims nothing."""
    running = [slot(100), slot(101)]
    chosen = plan_claims([slot(1)], running, node_running=2, max_parallel=2, project_limits={})
    assert chosen == []
    occ = Occupancy.of(running, node_running=2)
    reason = blocked_by(slot(1), occ, max_parallel=2, project_limits={})
    assert reason == "node is at its limit of 2 running"
