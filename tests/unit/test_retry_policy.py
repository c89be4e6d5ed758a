"""The retry policy's pure decisions: jitter, a maximum delay, and `retry_on`."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskpool import InvalidTask, Status
from taskpool._decisions import TaskState, decide_finish, decide_orphan, plan_finish
from taskpool._models import Outcome, OutcomeKind, TaskSpec
from taskpool._retry import jitter_unit, retry_delay_s

NOW = 1_700_000_000.0
EXIT_1 = Outcome(OutcomeKind.EXITED, "exited with code 1", exit_code=1)
EXIT_3 = Outcome(OutcomeKind.EXITED, "exited with code 3", exit_code=3)
TIMED_OUT = Outcome(OutcomeKind.TIMED_OUT, "timed out after 5 s")
FAILURES = [
    EXIT_1,
    EXIT_3,
    TIMED_OUT,
    Outcome(OutcomeKind.STALLED, "no output for 5 s"),
    Outcome(OutcomeKind.EXITED, "killed by SIGKILL", exit_code=-9),
]


def finish(outcome: Outcome, **policy: object) -> object:
    return decide_finish(
        outcome,
        attempts_used=1,
        max_attempts=3,
        backoff_s=10.0,
        now=NOW,
        **policy,  # type: ignore[arg-type]
    )


def test_retry_on_leaves_out_an_exit_code_and_says_so() -> None:
    t = finish(EXIT_1, retry_on=frozenset({"lost", "timed_out"}))
    assert t.status is Status.FAILED  # type: ignore[attr-defined]
    assert t.reason == "exited with code 1; not retried: retry_on is lost, timed_out"  # type: ignore[attr-defined]


def test_retry_on_an_exit_code_retries_that_code_only() -> None:
    on = frozenset({"exit:3"})
    assert finish(EXIT_3, retry_on=on).status is Status.WAITING  # type: ignore[attr-defined]
    assert finish(EXIT_1, retry_on=on).status is Status.FAILED  # type: ignore[attr-defined]
    timed_out = finish(TIMED_OUT, retry_on=on)
    assert timed_out.status is Status.TIMED_OUT  # type: ignore[attr-defined]
    assert timed_out.reason == "timed out after 5 s; not retried: retry_on is exit:3"  # type: ignore[attr-defined]


def test_no_attempts_left_is_said_as_before_whatever_retry_on() -> None:
    t = decide_finish(
        EXIT_1, attempts_used=3, max_attempts=3, backoff_s=1.0, now=NOW, retry_on=frozenset()
    )
    assert (t.status, t.reason) == (Status.FAILED, "exited with code 1")


def test_lost_is_not_requeued_unless_retry_on_names_it() -> None:
    t = decide_orphan(
        attempts_used=1, max_attempts=3, reason="node gone", retry_on=frozenset({"exited"})
    )
    assert (t.status, t.reason) == (Status.LOST, "node gone; not retried: retry_on is exited")
    t = decide_orphan(attempts_used=1, max_attempts=3, reason="node gone", retry_on={"lost"})
    assert (t.status, t.reason) == (Status.WAITING, "node gone; re-queued (attempt 2 of 3)")


def test_max_delay_caps_and_jitter_takes_its_share_off() -> None:
    assert retry_delay_s(10.0, 5, max_delay_s=60.0) == 60.0  # 160 s capped
    assert retry_delay_s(10.0, 5, max_delay_s=60.0, jitter=0.5, unit=0.5) == 45.0
    assert retry_delay_s(10.0, 2, jitter=1.0, unit=0.25) == 15.0  # full jitter
    t = finish(EXIT_1, max_delay_s=4.0, jitter=0.5, unit=0.5)
    assert t.not_before == NOW + 3.0  # type: ignore[attr-defined]
    assert t.reason == "exited with code 1; retrying in 3 s (attempt 2 of 3)"  # type: ignore[attr-defined]


def test_plan_finish_draws_the_jitter_from_the_task_and_attempt() -> None:
    state = TaskState(
        id=41,
        status=Status.RUNNING,
        fence=1,
        attempts_used=1,
        max_attempts=3,
        retry_backoff_s=100.0,
        owner_node="n",
        lease_expires_at=NOW + 30,
        cancel_requested=None,
        retry_jitter=1.0,
        retry_max_delay_s=3600.0,
    )
    ending = plan_finish(state, 1, EXIT_1, NOW)
    assert ending.not_before == NOW + 100.0 * (1 - jitter_unit(41, 1))
    # Another task failing at the same moment comes back at another time.
    other = plan_finish(
        dataclasses.replace(state, id=42),
        1,
        EXIT_1,
        NOW,
    )
    assert other.not_before != ending.not_before


@given(
    backoff=st.floats(0, 1e6),
    attempts=st.integers(1, 100),
    max_delay=st.floats(0, 1e6),
    jitter=st.floats(0, 1),
    unit=st.floats(0, 1, exclude_max=True),
)
def test_a_delay_is_never_past_the_cap_nor_below_its_jittered_floor(
    backoff: float, attempts: int, max_delay: float, jitter: float, unit: float
) -> None:
    capped = retry_delay_s(backoff, attempts, max_delay_s=max_delay)
    delay = retry_delay_s(backoff, attempts, max_delay_s=max_delay, jitter=jitter, unit=unit)
    assert capped <= max_delay
    assert capped * (1 - jitter) - 1e-9 <= delay <= capped


@given(task_id=st.integers(1, 2**31), attempt=st.integers(0, 10_000))
def test_the_jitter_draw_is_a_fraction_and_the_same_every_time(task_id: int, attempt: int) -> None:
    unit = jitter_unit(task_id, attempt)
    assert 0 <= unit < 1
    assert unit == jitter_unit(task_id, attempt)


@given(
    outcome=st.sampled_from(FAILURES),
    attempts_used=st.integers(1, 5),
    max_attempts=st.integers(1, 5),
    cancel=st.booleans(),
)
def test_the_default_retry_on_is_every_failure_as_before(
    outcome: Outcome, attempts_used: int, max_attempts: int, cancel: bool
) -> None:
    every = frozenset({"exited", "timed_out", "stalled", "lost"})
    kwargs = dict(
        attempts_used=attempts_used,
        max_attempts=max_attempts,
        backoff_s=2.0,
        now=NOW,
        cancel_requested=cancel,
    )
    assert decide_finish(outcome, **kwargs) == decide_finish(outcome, retry_on=every, **kwargs)  # type: ignore[arg-type]
    assert decide_orphan(
        attempts_used=attempts_used, max_attempts=max_attempts, reason="r", cancel_requested=cancel
    ) == decide_orphan(
        attempts_used=attempts_used,
        max_attempts=max_attempts,
        reason="r",
        cancel_requested=cancel,
        retry_on=every,
    )


@given(
    outcome=st.sampled_from(FAILURES),
    chosen=st.frozensets(
        st.sampled_from(["exited", "timed_out", "stalled", "lost", "exit:1", "exit:3", "exit:-9"])
    ),
)
def test_a_failure_is_retried_exactly_when_retry_on_names_it(
    outcome: Outcome, chosen: frozenset[str]
) -> None:
    t = decide_finish(
        outcome, attempts_used=1, max_attempts=2, backoff_s=1.0, now=NOW, retry_on=chosen
    )
    name = {OutcomeKind.EXITED: "exited", OutcomeKind.TIMED_OUT: "timed_out"}.get(
        outcome.kind, "stalled"
    )
    named = name in chosen or f"exit:{outcome.exit_code}" in chosen
    assert (t.status is Status.WAITING) == named
    if not named:
        assert t.reason.endswith(f"; not retried: retry_on is {', '.join(sorted(chosen))}")


def test_the_spec_checks_and_normalises_the_policy() -> None:
    spec = TaskSpec.build(["x"], retry_on=["exit:+03", "lost"], retry_jitter=0.25)
    assert spec.retry_on == frozenset({"exit:3", "lost"})
    assert spec.retry_text() == "never (1 attempt)"
    spec = TaskSpec.build(
        ["x"], max_attempts=3, retry_on=["lost"], retry_jitter=0.25, retry_max_delay_s=60
    )
    assert spec.retry_text() == (
        "up to 3 attempts, on lost; after 1 s doubling to at most 60 s, less up to 25% at random"
    )
    for bad, message in [
        ({"retry_jitter": 1.5}, "retry_jitter must be a fraction from 0 to 1"),
        ({"retry_max_delay_s": -1}, "retry_max_delay_s must be a non-negative number of seconds"),
        ({"retry_on": "lost"}, "retry_on must be a list of names, not a single string"),
        (
            {"retry_on": ["exit:0"]},
            "retry_on item 'exit:0' must be one of exited, lost, stalled, timed_out"
            " or exit:N (N a non-zero exit code)",
        ),
        (
            {"retry_on": ["spawn_failed"]},
            "retry_on item 'spawn_failed' must be one of exited, lost, stalled, timed_out"
            " or exit:N (N a non-zero exit code)",
        ),
        ({"unique_key": ""}, "unique_key must not be empty (None for no key)"),
        ({"on_conflict": "queue"}, "on_conflict must be one of reject, replace_waiting"),
    ]:
        with pytest.raises(InvalidTask) as caught:
            TaskSpec.build(["x"], **bad)  # type: ignore[arg-type]
        assert str(caught.value) == message
