"""The pure decisions around a node's runners and its end (`taskpool._runners`,
`taskpool._crash`)."""

from __future__ import annotations

import pytest

from taskpool._crash import crash_cause
from taskpool._errors import LeaseLost
from taskpool._models import Limits, Outcome, OutcomeKind, Status, TaskInfo, TaskSpec
from taskpool._runners import (
    Report,
    frees_for_others,
    how_to_report,
    refused_outcome,
    shutdown_reason,
)


class Cancelled(BaseException):
    """Stands for the async backend's cancellation class."""


@pytest.mark.parametrize(
    "kind",
    [
        OutcomeKind.EXITED,
        OutcomeKind.SPAWN_FAILED,
        OutcomeKind.TIMED_OUT,
        OutcomeKind.STALLED,
        OutcomeKind.CANCELLED,
        OutcomeKind.SHUTDOWN,
    ],
)
def test_a_running_pool_reports_an_outcome_and_claims_for_the_freed_slot_at_once(
    kind: OutcomeKind,
) -> None:
    assert how_to_report(Outcome(kind, "ended"), closing=False) is Report.FINISH_AND_CLAIM
    assert how_to_report(Outcome(kind, "ended"), closing=True) is Report.FINISH


def test_a_self_fenced_node_reports_the_outcome_but_claims_nothing_until_it_renews() -> None:
    outcome = Outcome(OutcomeKind.SELF_FENCED, "self-fenced")
    assert how_to_report(outcome, closing=False) is Report.FINISH
    assert how_to_report(outcome, closing=True) is Report.FINISH


def test_a_lost_lease_is_not_reported_the_task_is_another_nodes() -> None:
    outcome = Outcome(OutcomeKind.LEASE_LOST, "lease lost: another node owns the task")
    assert how_to_report(outcome, closing=False) is Report.NOTHING
    assert how_to_report(outcome, closing=True) is Report.NOTHING


def test_a_refused_result_is_a_lost_lease_that_says_how_the_attempt_ended() -> None:
    outcome = Outcome(OutcomeKind.EXITED, "exited with code 3", 3)
    refused = refused_outcome(outcome, LeaseLost("fence 2 is stale"))
    assert refused == Outcome(
        OutcomeKind.LEASE_LOST,
        "result refused (fence 2 is stale); the attempt had exited with code 3",
        3,
    )


def test_the_shutdown_reason_names_the_node_and_a_hurried_shutdown() -> None:
    assert shutdown_reason("n1") == "interrupted: node n1 shut down"
    assert shutdown_reason("n1", hurried=True) == "interrupted: node n1 shut down (hurried)"


def test_the_crash_is_the_first_error_in_the_group_depth_first() -> None:
    first, second = RuntimeError("store gone"), ValueError("bad row")
    raised = BaseExceptionGroup(
        "pool", [Cancelled(), BaseExceptionGroup("services", [Cancelled(), first]), second]
    )
    assert crash_cause(raised, None, Cancelled) is first


def test_cancellations_alone_are_no_crash() -> None:
    raised = BaseExceptionGroup("pool", [Cancelled(), BaseExceptionGroup("x", [Cancelled()])])
    assert crash_cause(raised, None, Cancelled) is None
    assert crash_cause(Cancelled(), None, Cancelled) is None


def test_the_exception_the_caller_left_with_is_theirs_not_the_pools_crash() -> None:
    theirs = KeyError("caller's")
    assert crash_cause(BaseExceptionGroup("pool", [theirs, Cancelled()]), theirs, Cancelled) is None
    ours = OSError("guard died")
    raised = BaseExceptionGroup("pool", [theirs, ours])
    assert crash_cause(raised, theirs, Cancelled) is ours


def test_a_bare_error_is_the_crash() -> None:
    error = RuntimeError("boom")
    assert crash_cause(error, None, Cancelled) is error


def test_an_end_that_frees_a_key_is_handed_off_when_asked_and_the_pool_runs_on() -> None:
    """`hand_off` turns a finish-and-claim into a hand-off; a closing or self-fenced
    pool still only finishes, and a lost lease is still not reported."""
    ended = Outcome(OutcomeKind.EXITED, "exited with code 0", 0)
    assert how_to_report(ended, closing=False, hand_off=True) is Report.HAND_OFF
    assert how_to_report(ended, closing=True, hand_off=True) is Report.FINISH
    fenced = Outcome(OutcomeKind.SELF_FENCED, "self-fenced")
    assert how_to_report(fenced, closing=False, hand_off=True) is Report.FINISH
    lost = Outcome(OutcomeKind.LEASE_LOST, "lease lost")
    assert how_to_report(lost, closing=False, hand_off=True) is Report.NOTHING


@pytest.mark.parametrize(
    ("options", "frees"),
    [
        ({}, False),
        ({"project": "infra"}, True),  # a project this node limits
        ({"project": "web"}, False),
        ({"template": "deploy"}, True),
        ({"template": "render", "template_parallel": True}, True),  # blocks exclusive ones
        ({"locks": ["db"]}, True),
    ],
)
def test_what_an_end_frees_for_other_nodes(options: dict[str, object], frees: bool) -> None:
    """Only a template, a named lock or a project under this node's limit can block a
    task on another node; any other end frees this node's slot alone."""
    task = TaskInfo(
        id=1,
        spec=TaskSpec.build(["true"], **options),  # type: ignore[arg-type]
        status=Status.RUNNING,
        submitted_at=0.0,
        attempts_used=1,
        fence=1,
        owner_node="n1",
        lease_expires_at=None,
        pid=None,
        started_at=None,
        finished_at=None,
        exit_code=None,
        reason=None,
        cancel_requested=None,
    )
    limits = Limits(max_parallel=4, project_limits={"infra": 1})
    assert frees_for_others(task, limits) is frees
