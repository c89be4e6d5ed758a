"""What a store decides inside a transaction (`taskpool._decisions`), over plain data."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskpool import LeaseLost, Status
from taskpool._decisions import (
    CancelRequest,
    Ending,
    Settlement,
    TaskState,
    check_fence,
    claim_reason,
    lease_live,
    logged_transition,
    plan_cancel,
    plan_finish,
    plan_handback,
    plan_orphan_settlement,
    plan_rescue,
    plan_start,
)
from taskpool._models import CancelMode, Outcome, OutcomeKind

NOW = 1_700_000_000.0

RUNNING = TaskState(
    id=7,
    status=Status.RUNNING,
    fence=3,
    attempts_used=2,
    max_attempts=3,
    retry_backoff_s=5.0,
    owner_node="n1",
    lease_expires_at=NOW + 30,
    cancel_requested=None,
)
WAITING = dataclasses.replace(
    RUNNING, status=Status.WAITING, owner_node=None, lease_expires_at=None, attempts_used=1
)


def test_a_stale_fence_is_refused_with_what_the_task_is_now() -> None:
    """A write under an older fence, or to a task no longer running, raises LeaseLost
    saying the task's status and fence."""
    check_fence(RUNNING, 3)
    with pytest.raises(LeaseLost, match=r"task 7: fence 2 is stale \(task is running, fence 3\)"):
        check_fence(RUNNING, 2)
    done = dataclasses.replace(RUNNING, status=Status.SUCCEEDED)
    with pytest.raises(LeaseLost, match=r"\(task is succeeded, fence 3\)"):
        check_fence(done, 3)


def test_a_lease_is_live_through_its_expiry_instant() -> None:
    """A lease counts up to and including its expiry, not after; no lease never counts."""
    assert lease_live(NOW, NOW)
    assert not lease_live(NOW, NOW + 0.5)
    assert not lease_live(None, NOW)


def test_a_claim_starts_the_next_attempt_under_the_next_fence() -> None:
    """A claim takes the next fence and attempt, a lease of its TTL, and says who and which."""
    start = plan_start(WAITING, "n2", NOW, 30)
    assert (start.fence, start.attempts_used, start.owner_node) == (4, 2, "n2")
    assert start.lease_expires_at == NOW + 30
    assert start.reason == claim_reason("n2", 2, 3) == "claimed by node n2 (attempt 2 of 3)"


def test_a_finished_attempt_closes_its_record_with_the_runners_outcome() -> None:
    """A success ends the task with its exit code, and the attempt's record says `exited`."""
    ending = plan_finish(RUNNING, 3, Outcome(OutcomeKind.EXITED, "exited with code 0", 0), NOW)
    assert (ending.status, ending.attempts_used, ending.exit_code) == (Status.SUCCEEDED, 2, 0)
    assert not ending.requeued
    assert ending.attempt is not None
    assert (ending.attempt.fence, ending.attempt.outcome) == (3, OutcomeKind.EXITED)


def test_a_failed_attempt_with_attempts_left_waits_out_its_backoff() -> None:
    """A failure is retried no earlier than the backoff for the attempts used."""
    ending = plan_finish(RUNNING, 3, Outcome(OutcomeKind.EXITED, "exited with code 1", 1), NOW)
    assert ending.requeued
    assert ending.not_before == NOW + 10  # 5 s doubled once: the second attempt failed
    assert ending.reason == "exited with code 1; retrying in 10 s (attempt 3 of 3)"


def test_a_finish_under_a_stale_fence_decides_nothing() -> None:
    """The fence is checked before anything is decided."""
    with pytest.raises(LeaseLost):
        plan_finish(RUNNING, 2, Outcome(OutcomeKind.EXITED, "exited with code 0", 0), NOW)


@pytest.mark.parametrize("kind", [OutcomeKind.SHUTDOWN, OutcomeKind.SELF_FENCED])
def test_an_attempt_the_node_ended_for_its_own_reasons_is_refunded(kind: OutcomeKind) -> None:
    """Shutdown and self-fencing re-queue the task at once with the attempt given back."""
    ending = plan_finish(RUNNING, 3, Outcome(kind, "not the task's fault"), NOW)
    assert (ending.status, ending.attempts_used, ending.not_before) == (Status.WAITING, 1, 0.0)


def test_a_handed_back_attempt_is_refunded_unless_a_cancel_was_asked() -> None:
    """A stopping node's attempt goes back refunded, recorded as handed back; one someone
    asked to cancel is cancelled instead."""
    ending = plan_handback(RUNNING, "n1", "shutdown", NOW)
    assert (ending.status, ending.attempts_used) == (Status.WAITING, 1)
    assert ending.reason.startswith("handed back without using an attempt: node n1 stopped")
    assert ending.attempt is not None
    assert ending.attempt.outcome is Settlement.HANDED_BACK
    asked = dataclasses.replace(RUNNING, cancel_requested=CancelMode.GRACEFUL)
    assert plan_handback(asked, "n1", "shutdown", NOW).status is Status.CANCELLED


def test_a_rescue_names_the_owner_and_when_it_was_last_heard_of() -> None:
    """A rescued attempt counts as used, and its reason says whose it was and when."""
    ending = plan_rescue(RUNNING, NOW - 60, NOW + 31)
    assert (ending.status, ending.attempts_used) == (Status.WAITING, 2)
    assert ending.reason.startswith("owner node n1 stopped heartbeating at 2023-11-14T22:12:20Z")
    assert ending.attempt is not None
    assert ending.attempt.outcome is Settlement.RESCUED
    last = dataclasses.replace(RUNNING, attempts_used=3)
    assert plan_rescue(last, None, NOW + 31).status is Status.LOST


def test_an_orphan_is_settled_once() -> None:
    """An orphan under its fence is settled; once the fence moved on, nothing is."""
    ending = plan_orphan_settlement(RUNNING, 3, "owner died", NOW)
    assert ending is not None
    assert ending.attempt is not None
    assert ending.attempt.outcome is Settlement.ORPHANED
    assert ending.reason == "owner died; re-queued (attempt 3 of 3)"
    assert plan_orphan_settlement(RUNNING, 2, "owner died", NOW) is None


def test_a_cancel_ends_a_waiting_task_and_asks_a_running_ones_owner() -> None:
    """Waiting: cancelled at once, no attempt to close, none used. Running: a request,
    never weakened from force to graceful. Finished: nothing."""
    ending = plan_cancel(WAITING, force=False, now=NOW)
    assert isinstance(ending, Ending)
    assert (ending.status, ending.attempts_used, ending.attempt) == (Status.CANCELLED, 1, None)
    request = plan_cancel(RUNNING, force=False, now=NOW)
    assert isinstance(request, CancelRequest)
    assert request.mode is CancelMode.GRACEFUL
    assert (request.event.fence, request.event.node_id) == (3, "n1")
    assert request.event.reason == "cancel requested (graceful)"
    forced = dataclasses.replace(RUNNING, cancel_requested=CancelMode.FORCE)
    again = plan_cancel(forced, force=False, now=NOW)
    assert isinstance(again, CancelRequest)
    assert again.mode is CancelMode.FORCE
    assert (
        plan_cancel(dataclasses.replace(RUNNING, status=Status.FAILED), force=True, now=NOW) is None
    )


def test_transitions_log_the_attempt_they_start_or_end() -> None:
    """A submission logs no attempt; a claim logs the new fence and node; an end logs the
    attempt that ended; a change of neither status nor fence logs nothing."""
    submitted = logged_transition(None, WAITING, NOW, "submitted")
    assert submitted is not None
    assert (submitted.from_status, submitted.fence, submitted.node_id) == (None, None, None)
    claimed = dataclasses.replace(WAITING, status=Status.RUNNING, fence=4, owner_node="n2")
    start = logged_transition(WAITING, claimed, NOW, "claimed")
    assert start is not None
    assert (start.from_status, start.to_status, start.fence, start.node_id) == (
        Status.WAITING,
        Status.RUNNING,
        4,
        "n2",
    )
    requeued = dataclasses.replace(claimed, status=Status.WAITING, owner_node=None)
    end = logged_transition(claimed, requeued, NOW, "retry")
    assert end is not None
    assert (end.fence, end.node_id) == (4, "n2")
    renewed = dataclasses.replace(claimed, lease_expires_at=1.0)
    assert logged_transition(claimed, renewed, NOW, "") is None


@given(
    attempts_used=st.integers(1, 5),
    extra=st.integers(0, 3),
    kind=st.sampled_from([k for k in OutcomeKind if k is not OutcomeKind.LEASE_LOST]),
    cancel=st.sampled_from([None, CancelMode.GRACEFUL, CancelMode.FORCE]),
    code=st.one_of(st.none(), st.integers(-9, 3)),
)
def test_every_ending_of_an_attempt_is_consistent(
    attempts_used: int, extra: int, kind: OutcomeKind, cancel: str | None, code: int | None
) -> None:
    """Whatever ends an attempt: attempts never go negative or past the limit, a task
    that waits again has no finish, a cancel-requested task is never re-queued, and the
    attempt's record is closed under its own fence."""
    state = dataclasses.replace(
        RUNNING,
        attempts_used=attempts_used,
        max_attempts=attempts_used + extra,
        cancel_requested=cancel,
    )
    outcome = Outcome(kind, "why", code)
    endings = [
        plan_finish(state, state.fence, outcome, NOW),
        plan_handback(state, "n1", "stopped", NOW),
        plan_rescue(state, None, NOW),
    ]
    for ending in endings:
        assert 0 <= ending.attempts_used <= state.max_attempts
        assert ending.attempt is not None
        assert ending.attempt.fence == state.fence
        if cancel is not None:
            assert not ending.requeued
        if ending.requeued:
            assert ending.not_before == 0.0 or ending.not_before > NOW
