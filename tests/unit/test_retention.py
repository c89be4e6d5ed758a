"""The retention policy, pure: validation, ages as operators write them, selection."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskpool import Retention, Status
from taskpool._retention import FINISHED, FinishedTask, keep_boundary, parse_age, select_prunable


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"older_than_s": -1}, "Retention.older_than_s must be a number of seconds >= 0"),
        ({"older_than_s": "7d"}, "Retention.older_than_s must be a number of seconds >= 0"),
        ({"keep_last": -1}, "Retention.keep_last must be an integer >= 0"),
        ({"keep_last": True}, "Retention.keep_last must be an integer >= 0"),
        ({"per_status": {"waiting": 10}}, "'waiting' is not a finished status"),
        ({"per_status": {"done": 10}}, "'done' is not a task status"),
        ({"statuses": ["running"]}, "'running' is not a finished status"),
        ({"statuses": []}, "Retention.statuses is empty"),
        (
            {"statuses": ["succeeded"], "per_status": {"failed": 1}},
            "gives an age for 'failed', which Retention.statuses leaves out",
        ),
        ({"older_than_s": None}, "this Retention prunes nothing"),
    ],
)
def test_a_policy_that_cannot_work_is_refused_with_its_reason(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Retention(**kwargs)  # type: ignore[arg-type]


def test_the_default_keeps_finished_tasks_thirty_days() -> None:
    policy = Retention()
    assert policy.describe() == "finished tasks kept 30 d"
    plan = policy.plan(now=100 * 86400.0)
    assert set(plan.cutoffs) == FINISHED
    assert set(plan.cutoffs.values()) == {70 * 86400.0}
    assert (plan.keep_last, plan.output_cutoff) == (None, None)


def test_per_status_ages_override_and_strings_are_statuses() -> None:
    policy = Retention(older_than_s=10, per_status={"failed": None, "lost": 20}, keep_last=5)
    assert policy.age_of(Status.SUCCEEDED) == 10
    assert policy.age_of(Status.FAILED) is None
    assert policy.age_of(Status.LOST) == 20
    assert policy.describe() == "finished tasks kept 10 s; failed forever; lost 20 s; at most 5"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("7d", 604800.0),
        ("12h", 43200.0),
        ("30m", 1800.0),
        ("90s", 90.0),
        ("2w", 1209600.0),
        ("45", 45.0),
        ("1.5h", 5400.0),
        ("0s", 0.0),
    ],
)
def test_ages_as_operators_write_them(text: str, seconds: float) -> None:
    assert parse_age(text) == seconds


@pytest.mark.parametrize("text", ["", "7 parsecs", "-1d", "d"])
def test_what_is_not_an_age(text: str) -> None:
    with pytest.raises(ValueError, match="not an age"):
        parse_age(text)


def test_keep_boundary() -> None:
    newest_first = [(30.0, 3), (20.0, 2), (10.0, 1)]
    assert keep_boundary(newest_first, None) is None
    assert keep_boundary(newest_first, 2) == (20.0, 2)
    assert keep_boundary(newest_first, 5) is None
    assert keep_boundary(newest_first, 0) > (30.0, 3)  # type: ignore[operator]


tasks = st.lists(
    st.builds(
        FinishedTask,
        id=st.integers(1, 10**6),
        status=st.sampled_from(sorted(FINISHED)),
        finished_at=st.integers(0, 100).map(float),
        has_output=st.booleans(),
    ),
    unique_by=lambda t: t.id,
    max_size=30,
)


@given(
    tasks,
    st.one_of(st.none(), st.integers(0, 100).map(float)),
    st.one_of(st.none(), st.integers(0, 40)),
    st.one_of(st.none(), st.integers(0, 100).map(float)),
    st.frozensets(st.sampled_from(sorted(FINISHED)), min_size=1),
)
def test_selection_is_what_the_policy_says(
    finished: list[FinishedTask],
    older_than_s: float | None,
    keep_last: int | None,
    output_older_than_s: float | None,
    statuses: frozenset[Status],
) -> None:
    """A task is removed iff its status is pruned and it is too old or beyond the
    keep_last most recent of those statuses; output goes from kept old tasks only."""
    if older_than_s is None and keep_last is None and output_older_than_s is None:
        return
    policy = Retention(older_than_s, {}, keep_last, output_older_than_s, statuses)
    now = 100.0
    chosen = select_prunable(finished, policy.plan(now))
    mine = sorted(
        (t for t in finished if t.status in statuses), key=lambda t: (t.finished_at, t.id)
    )
    kept_by_count = mine[max(0, len(mine) - keep_last) :] if keep_last else []
    if keep_last is None:
        kept_by_count = mine
    removed = [
        t
        for t in mine
        if t not in kept_by_count
        or (older_than_s is not None and t.finished_at < now - older_than_s)
    ]
    assert chosen.tasks == sorted(t.id for t in removed)
    stripped = [
        t.id
        for t in mine
        if t not in removed
        and t.has_output
        and output_older_than_s is not None
        and t.finished_at < now - output_older_than_s
    ]
    assert chosen.output_only == sorted(stripped)
