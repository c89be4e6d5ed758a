"""Run-after dependencies, the pure parts: `after`'s checks, how a submit starts a
dependant, a cascade's reasons, and what `why` says of a held task."""

from __future__ import annotations

import pytest

from taskpool import InvalidTask, Status, TaskSpec, WaitKind
from taskpool._decisions import cascade_reasons, plan_dependencies
from taskpool._explain import explain_waiting
from taskpool._models import MAX_AFTER
from taskpool._reasons import dependency_root
from tests.unit.test_explain import NOW, node, task


def test_after_is_sorted_and_each_id_kept_once() -> None:
    """Duplicates collapse and the ids come back ascending, from any iterable."""
    assert TaskSpec.build(["x"], after=iter([5, 3, 5, 1])).after == (1, 3, 5)
    assert TaskSpec.build(["x"]).after == ()
    assert TaskSpec.build(["x"], after=[7] * (MAX_AFTER + 5)).after == (7,)


@pytest.mark.parametrize(
    ("after", "message"),
    [
        ("12", "after must be a list of task ids, got str"),
        (12, "after must be a list of task ids, got int"),
        ({1: 2}, "after must be a list of task ids, got dict"),
        ([0], "positive integers"),
        ([True], "positive integers"),
        ([1.0], "positive integers"),
        ([2**63], "positive integers"),
        (range(1, MAX_AFTER + 2), f"more than MAX_AFTER ({MAX_AFTER})"),
    ],
)
def test_bad_after_is_invalid_task(after: object, message: str) -> None:
    """Anything but a bounded list of positive ids is refused, naming the field."""
    with pytest.raises(InvalidTask, match=message.replace("(", r"\(").replace(")", r"\)")):
        TaskSpec.build(["x"], after=after)  # type: ignore[arg-type]
    spec = TaskSpec(argv=("x",), after=after)  # type: ignore[arg-type]
    with pytest.raises(InvalidTask):
        spec.checked()


def test_a_submit_holds_starts_or_cancels_as_the_dependencies_stand() -> None:
    """Held while one has not succeeded, free once all did, cancelled naming the
    lowest that ended otherwise (a cascaded one in the cascade's words)."""
    ok, run, bad = Status.SUCCEEDED, Status.RUNNING, Status.FAILED
    assert plan_dependencies((1, 2), {1: ok, 2: run}).held
    free = plan_dependencies((1, 2), {1: ok, 2: ok})
    assert (free.held, free.cancel_reason) == (False, None)
    doomed = plan_dependencies((1, 2, 3), {1: run, 2: bad, 3: Status.LOST})
    assert (doomed.held, doomed.cancel_reason) == (False, "dependency 2 failed")
    chained = plan_dependencies(
        (4,), {4: Status.CANCELLED}, {4: "dependency 2 was cancelled: dependency 1 timed out"}
    )
    assert chained.cancel_reason == "dependency 4 was cancelled: dependency 1 timed out"
    by_hand = plan_dependencies((4,), {4: Status.CANCELLED}, {4: "cancelled while waiting"})
    assert by_hand.cancel_reason == "dependency 4 was cancelled"
    with pytest.raises(InvalidTask, match="after names no existing task: 3, 9"):
        plan_dependencies((1, 3, 9), {1: ok})


def test_dependency_root_reads_back_the_first_reason_of_a_cascade() -> None:
    """A direct reason is its own root; a chain's ends with it; others have none."""
    assert dependency_root("dependency 3 was lost") == "dependency 3 was lost"
    assert dependency_root("dependency 5 was cancelled: dependency 3 was cancelled") == (
        "dependency 3 was cancelled"
    )
    assert dependency_root("cancelled while waiting") is None
    assert dependency_root(None) is None


def test_a_cascade_names_the_root_or_the_lowest_cancelled_dependency_below_it() -> None:
    """Down a chain and a diamond: direct dependants name the root, the others their
    lowest dependency cancelled in the same cascade; non-waiting tasks stop it."""
    after = {2: (1,), 3: (2,), 4: (1, 3), 5: (3, 2), 6: (5,), 7: (1,)}
    waiting = {2, 3, 4, 5, 6}  # 7 ended before
    dependants: dict[int, list[int]] = {}
    for task_id, deps in after.items():
        for dep in deps:
            dependants.setdefault(dep, []).append(task_id)
    reasons = cascade_reasons(
        1,
        Status.STALLED,
        lambda i: [d for d in dependants.get(i, []) if d in waiting],
        lambda i: after[i],
    )
    root = "dependency 1 stalled"
    assert reasons == {
        2: root,
        3: f"dependency 2 was cancelled: {root}",
        4: root,
        5: f"dependency 2 was cancelled: {root}",
        6: f"dependency 5 was cancelled: {root}",
    }


def test_why_names_each_dependency_that_has_not_succeeded() -> None:
    """A held task is waiting for its dependencies, with their status, before any
    start time; one pruned (unknown) or succeeded holds nothing."""
    held = task(20, after=[10, 11, 12, 13], not_before=NOW + 60)
    statuses = {10: Status.RUNNING, 11: Status.WAITING, 12: Status.SUCCEEDED}
    reasons = explain_waiting(
        [held], queue=[], running=[], nodes=[node()], now=NOW, dependencies=statuses
    )[20]
    assert [(r.kind, r.subject, r.text) for r in reasons] == [
        (WaitKind.DEPENDENCY, "10", "waiting for dependency 10 (running)"),
        (WaitKind.DEPENDENCY, "11", "waiting for dependency 11 (waiting)"),
        (WaitKind.NOT_BEFORE, None, reasons[-1].text),
    ]
    assert reasons[-1].text.startswith("not before ")
    released = task(21, after=[12, 13])
    assert explain_waiting(
        [released], queue=[], running=[], nodes=[node()], now=NOW, dependencies=statuses
    ) == {21: []}


def test_a_held_task_takes_no_place_in_the_queue() -> None:
    """With one free slot, a held task ahead does not keep a ready one behind it."""
    held, ready = task(30, after=[1]), task(31)
    reasons = explain_waiting(
        [held, ready],
        queue=[],
        running=[],
        nodes=[node(max_parallel=1)],
        now=NOW,
        dependencies={1: Status.RUNNING},
    )
    assert [r.kind for r in reasons[30]] == [WaitKind.DEPENDENCY]
    assert reasons[31] == []
