"""The pure schedule decisions: ticks, misfire plans, overlap actions, DST."""

from __future__ import annotations

from calendar import timegm

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskpool import Status, TaskSpec
from taskpool._schedules import (
    Misfire,
    Overlap,
    Schedule,
    ScheduleError,
    Timing,
    overlap_action,
    plan_fires,
    plan_step,
    spec_from_json,
    spec_to_json,
)

MIDNIGHT = float(timegm((2024, 6, 3, 0, 0, 0)))
FIVE = Timing(cron="*/5 * * * *")


@given(
    every=st.sampled_from([1.0, 30.0, 300.0]),
    late=st.floats(0, 5000),
    misfire=st.sampled_from(list(Misfire)),
    bound=st.integers(1, 50),
)
def test_a_plan_never_fires_a_tick_twice_nor_one_in_the_future(
    every: float, late: float, misfire: Misfire, bound: int
) -> None:
    timing = Timing(every_s=every)
    now = MIDNIGHT + late
    plan = plan_fires(timing, MIDNIGHT, now, misfire=misfire, bound=bound, grace_s=60)
    assert plan.fire == sorted(set(plan.fire))
    assert all(MIDNIGHT <= t <= now for t in plan.fire)
    assert plan.next_fire_at > now
    assert len(plan.fire) <= (bound if misfire is Misfire.RUN_ALL else 1)
    due = int((now - MIDNIGHT) // every) + 1  # `now` as the plan sees it (rounded)
    assert plan.dropped == due - len(plan.fire)
    # The plan's next tick is the first after now: asking again at now fires nothing.
    again = plan_fires(timing, plan.next_fire_at, now, misfire=misfire, bound=bound, grace_s=60)
    assert again.fire == []


@given(steps=st.lists(st.floats(0, 900), min_size=1, max_size=60))
def test_run_all_with_room_fires_every_tick_once_however_the_steps_fall(
    steps: list[float],
) -> None:
    fired: list[float] = []
    next_fire_at, now = MIDNIGHT, MIDNIGHT - 1
    for gap in steps:
        now += gap
        plan = plan_fires(FIVE, next_fire_at, now, misfire=Misfire.RUN_ALL, bound=10**6, grace_s=60)
        fired += plan.fire
        next_fire_at = plan.next_fire_at
    expected = [MIDNIGHT + 300 * k for k in range(int((now - MIDNIGHT) // 300) + 1)]
    assert fired == (expected if now >= MIDNIGHT else [])


def test_skip_misfire_fires_only_a_tick_still_within_grace() -> None:
    late = plan_fires(FIVE, MIDNIGHT, MIDNIGHT + 7320, misfire=Misfire.SKIP, bound=1, grace_s=60)
    assert late.fire == []
    on_time = plan_fires(FIVE, MIDNIGHT, MIDNIGHT + 7230, misfire=Misfire.SKIP, bound=1, grace_s=60)
    assert on_time.fire == [MIDNIGHT + 7200]


def test_a_huge_outage_is_planned_without_walking_every_tick() -> None:
    minutely = Timing(cron="* * * * *")
    month = 31 * 86_400
    plan = plan_fires(
        minutely, MIDNIGHT, MIDNIGHT + month, misfire=Misfire.RUN_ALL, bound=3, grace_s=60
    )
    assert plan.fire == [MIDNIGHT + month - 120, MIDNIGHT + month - 60, MIDNIGHT + month]
    assert plan.dropped is None  # more than SCAN_CAP
    assert plan.next_fire_at == MIDNIGHT + month + 60


@pytest.mark.parametrize(
    ("previous", "overlap", "cancel", "submit"),
    [
        (None, Overlap.SKIP, False, True),
        (Status.SUCCEEDED, Overlap.SKIP, False, True),
        (Status.RUNNING, Overlap.SKIP, False, False),
        (Status.WAITING, Overlap.SKIP, False, False),
        (Status.RUNNING, Overlap.QUEUE, False, True),
        (Status.RUNNING, Overlap.CANCEL_PREVIOUS, True, True),
        (Status.FAILED, Overlap.CANCEL_PREVIOUS, False, True),
    ],
)
def test_overlap_actions(
    previous: Status | None, overlap: Overlap, cancel: bool, submit: bool
) -> None:
    action = overlap_action(previous, overlap)
    assert (action.cancel_previous, action.submit) == (cancel, submit)


def test_a_step_of_several_ticks_under_skip_submits_the_first_only() -> None:
    schedule = Schedule(
        "s", FIVE, TaskSpec(("true",)), misfire=Misfire.RUN_ALL, next_fire_at=MIDNIGHT
    )
    step = plan_step(schedule, None, MIDNIGHT + 900)
    assert [t.action.submit for t in step.ticks] == [True, False, False, False]


def test_dst_follows_debian_cron() -> None:
    berlin = Timing(cron="30 2 * * *", tz="Europe/Berlin")
    # 2024-03-31 02:30 does not exist in Berlin: it fires at 03:00 CEST (01:00 UTC).
    spring = berlin.after(float(timegm((2024, 3, 30, 12, 0, 0))))
    assert spring == float(timegm((2024, 3, 31, 1, 0, 0)))
    # 2024-10-27 02:30 happens twice: it fires once, at the first (00:30 UTC).
    autumn = Timing(cron="30 2 * * *", tz="Europe/Berlin")
    first = autumn.after(float(timegm((2024, 10, 26, 12, 0, 0))))
    assert first == float(timegm((2024, 10, 27, 0, 30, 0)))
    assert autumn.after(first) == float(timegm((2024, 10, 28, 1, 30, 0)))


@pytest.mark.parametrize(
    "timing",
    [
        Timing(),
        Timing(cron="* * * * *", every_s=5),
        Timing(cron="61 * * * *"),
        Timing(cron="* * * * *", tz="Mars/Olympus"),
        Timing(every_s=0),
    ],
)
def test_bad_timings_are_refused(timing: Timing) -> None:
    with pytest.raises(ScheduleError):
        timing.checked()


def test_a_spec_round_trips_through_json() -> None:
    spec = TaskSpec.build(["a", "b"], env={"K": "v"}, locks=["x", "y"], pass_env=["TOKEN"])
    assert spec_from_json(spec_to_json(spec)) == spec


def test_a_tick_that_rounding_puts_at_now_is_due() -> None:
    """`now` is a float: MIDNIGHT + 1.9999999999990905 is MIDNIGHT + 2.0 exactly, and the
    tick at 2 s is due (found by the property above)."""
    now = MIDNIGHT + 1.9999999999990905
    plan = plan_fires(
        Timing(every_s=1.0), MIDNIGHT, now, misfire=Misfire.RUN_ONCE, bound=1, grace_s=60
    )
    assert plan.fire == [MIDNIGHT + 2.0]
    assert plan.dropped == 2
