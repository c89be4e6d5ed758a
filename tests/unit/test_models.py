"""Statuses, the decisions taken when an attempt ends, and validation of submitted tasks."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest

from taskpool import InvalidTask, TaskpoolError
from taskpool._decisions import Transition, decide_finish, decide_orphan, retry_delay_s
from taskpool._models import Outcome, OutcomeKind, Status, TaskSpec

NOW = 1_000.0


def finish(
    kind: OutcomeKind,
    exit_code: int | None = None,
    *,
    attempts_used: int = 1,
    max_attempts: int = 3,
    backoff_s: float = 2.0,
    cancel_requested: bool = False,
) -> Transition:
    return decide_finish(
        Outcome(kind, "why", exit_code),
        attempts_used=attempts_used,
        max_attempts=max_attempts,
        backoff_s=backoff_s,
        now=NOW,
        cancel_requested=cancel_requested,
    )


# --- Status -------------------------------------------------------------------


def test_only_waiting_and_running_are_not_terminal() -> None:
    """Every status except waiting and running is final."""
    assert {s for s in Status if not s.is_terminal} == {Status.WAITING, Status.RUNNING}


# --- retry_delay_s ------------------------------------------------------------


@pytest.mark.parametrize(
    ("backoff_s", "attempts_used", "delay"),
    [
        (2.0, 0, 2.0),
        (2.0, 1, 2.0),
        (2.0, 2, 4.0),
        (2.0, 3, 8.0),
        (2.0, 4, 16.0),
        (0.0, 5, 0.0),
        (1.0, 12, 2048.0),
        (1.0, 13, 3600.0),
        (1000.0, 3, 3600.0),
    ],
)
def test_retry_delay_doubles_per_attempt_up_to_an_hour(
    backoff_s: float, attempts_used: int, delay: float
) -> None:
    """The retry delay is the base, then twice it, four times it ... capped at one hour."""
    assert retry_delay_s(backoff_s, attempts_used) == delay


# --- decide_finish ------------------------------------------------------------


def test_exit_zero_succeeds() -> None:
    """A process that exits 0 makes the task succeed."""
    assert finish(OutcomeKind.EXITED, 0) == Transition(Status.SUCCEEDED, True, None, "why")


@pytest.mark.parametrize("exit_code", [1, 2, 255, -9, -15])
def test_failure_with_attempts_left_waits_for_backoff(exit_code: int) -> None:
    """A non-zero exit (or signal) with attempts left re-queues the task after the backoff."""
    t = finish(OutcomeKind.EXITED, exit_code, attempts_used=1, max_attempts=3, backoff_s=2.0)
    assert t.status is Status.WAITING
    assert t.consumes_attempt is True
    assert t.not_before == NOW + 2.0
    assert t.reason == "why; retrying in 2 s (attempt 2 of 3)"


def test_backoff_grows_exponentially_between_retries() -> None:
    """Each retry waits twice as long as the one before."""
    waits = [
        finish(OutcomeKind.EXITED, 1, attempts_used=n, max_attempts=5, backoff_s=1.5).not_before
        for n in (1, 2, 3, 4)
    ]
    assert waits == [NOW + 1.5, NOW + 3.0, NOW + 6.0, NOW + 12.0]


def test_failure_with_no_attempts_left_fails() -> None:
    """A non-zero exit on the last attempt makes the task fail for good."""
    t = finish(OutcomeKind.EXITED, 1, attempts_used=3, max_attempts=3)
    assert t == Transition(Status.FAILED, True, None, "why")


def test_single_attempt_task_fails_at_once() -> None:
    """With the default of one attempt, a failure is final."""
    t = finish(OutcomeKind.EXITED, 1, attempts_used=1, max_attempts=1)
    assert t.status is Status.FAILED


@pytest.mark.parametrize(
    ("kind", "status"),
    [(OutcomeKind.TIMED_OUT, Status.TIMED_OUT), (OutcomeKind.STALLED, Status.STALLED)],
)
def test_timeout_and_stall_map_to_their_statuses_when_no_attempts_left(
    kind: OutcomeKind, status: Status
) -> None:
    """A timed-out or stalled last attempt ends the task with that same status."""
    assert finish(kind, attempts_used=3, max_attempts=3) == Transition(status, True, None, "why")


@pytest.mark.parametrize("kind", [OutcomeKind.TIMED_OUT, OutcomeKind.STALLED])
def test_timeout_and_stall_are_retried_while_attempts_remain(kind: OutcomeKind) -> None:
    """A timed-out or stalled attempt is retried like a failure while attempts remain."""
    t = finish(kind, attempts_used=2, max_attempts=3, backoff_s=2.0)
    assert (t.status, t.consumes_attempt, t.not_before) == (Status.WAITING, True, NOW + 4.0)


def test_spawn_failure_is_never_retried() -> None:
    """A process that could not start fails at once, whatever attempts remain."""
    t = finish(OutcomeKind.SPAWN_FAILED, attempts_used=1, max_attempts=10)
    assert t == Transition(Status.FAILED, True, None, "why")


def test_shutdown_requeues_without_using_an_attempt() -> None:
    """A task stopped by the pool's shutdown waits again, at once, with its attempt given back."""
    t = finish(OutcomeKind.SHUTDOWN, attempts_used=3, max_attempts=3)
    assert t == Transition(Status.WAITING, False, None, "why")


def test_cancelled_attempt_is_cancelled_even_with_attempts_left() -> None:
    """A cancelled attempt ends the task as cancelled; cancellation is never retried."""
    t = finish(OutcomeKind.CANCELLED, attempts_used=1, max_attempts=5)
    assert t == Transition(Status.CANCELLED, True, None, "why")


@pytest.mark.parametrize(
    ("kind", "exit_code"),
    [
        (OutcomeKind.EXITED, 1),
        (OutcomeKind.TIMED_OUT, None),
        (OutcomeKind.STALLED, None),
        (OutcomeKind.SHUTDOWN, None),
    ],
)
def test_cancel_requested_is_never_requeued(kind: OutcomeKind, exit_code: int | None) -> None:
    """Once someone asked to cancel, an outcome that would re-queue the task cancels it instead."""
    t = finish(kind, exit_code, attempts_used=1, max_attempts=5, cancel_requested=True)
    assert t == Transition(Status.CANCELLED, True, None, "cancelled; why")


@pytest.mark.parametrize(
    ("kind", "exit_code", "status"),
    [
        (OutcomeKind.EXITED, 0, Status.SUCCEEDED),
        (OutcomeKind.EXITED, 1, Status.FAILED),
        (OutcomeKind.SPAWN_FAILED, None, Status.FAILED),
        (OutcomeKind.TIMED_OUT, None, Status.TIMED_OUT),
    ],
)
def test_cancel_requested_keeps_a_final_outcome(
    kind: OutcomeKind, exit_code: int | None, status: Status
) -> None:
    """A cancel request does not rewrite an outcome that already ends the task."""
    t = finish(kind, exit_code, attempts_used=1, max_attempts=1, cancel_requested=True)
    assert t == Transition(status, True, None, "why")


# --- decide_orphan ------------------------------------------------------------


def test_orphan_with_attempts_left_is_requeued_using_an_attempt() -> None:
    """An attempt whose owner vanished counts as used, and the task waits again at once."""
    t = decide_orphan(attempts_used=1, max_attempts=2, reason="node gone")
    assert t == Transition(Status.WAITING, True, None, "node gone; re-queued (attempt 2 of 2)")


def test_orphan_with_no_attempts_left_is_lost() -> None:
    """An orphaned last attempt makes the task lost."""
    t = decide_orphan(attempts_used=2, max_attempts=2, reason="node gone")
    assert t == Transition(Status.LOST, True, None, "node gone; no attempts left")


def test_orphan_with_cancel_requested_is_cancelled() -> None:
    """An orphaned attempt of a task someone asked to cancel is cancelled, not re-queued."""
    t = decide_orphan(attempts_used=1, max_attempts=5, reason="node gone", cancel_requested=True)
    assert t == Transition(Status.CANCELLED, True, None, "node gone; cancel was requested")


# --- TaskSpec.build -----------------------------------------------------------


def test_build_normalises_valid_input() -> None:
    """A valid task is stored as immutable, plain values."""
    spec = TaskSpec.build(
        ["echo", "hi"],
        cwd=Path("/tmp"),
        env={"A": "1"},
        locks=["db", "db", "gpu"],
        template="t",
        template_parallel=True,
        timeout_s=1.5,
        max_attempts=3,
    )
    assert spec.argv == ("echo", "hi")
    assert spec.cwd == "/tmp"
    assert spec.env == {"A": "1"}
    assert spec.locks == frozenset({"db", "gpu"})
    assert (spec.template, spec.template_parallel) == ("t", True)
    assert (spec.timeout_s, spec.stall_timeout_s, spec.max_attempts) == (1.5, None, 3)


def test_build_copies_env() -> None:
    """Changing the caller's env mapping afterwards does not change the spec."""
    env = {"A": "1"}
    spec = TaskSpec.build(["true"], env=env)
    env["B"] = "2"
    assert spec.env == {"A": "1"}


def test_build_accepts_empty_env_and_env_values() -> None:
    """An empty environment and empty values are allowed."""
    assert TaskSpec.build(["true"], env={}).env == {}
    assert TaskSpec.build(["true"], env={"A": ""}).env == {"A": ""}


def test_invalid_task_is_a_value_error_and_a_taskpool_error() -> None:
    """`InvalidTask` can be caught as ValueError or as the taskpool root error."""
    assert issubclass(InvalidTask, ValueError)
    assert issubclass(InvalidTask, TaskpoolError)


@pytest.mark.parametrize(
    ("argv", "kwargs", "fragment"),
    [
        ("echo hi", {}, "argv must be a list of strings, not a single string (no shell)"),
        (b"echo hi", {}, "argv must be a list of strings, not a single string (no shell)"),
        ([], {}, "argv must not be empty"),
        ((), {}, "argv must not be empty"),
        (["echo", "a\x00b"], {}, r"argv item 'a\x00b' contains a NUL byte"),
        (["echo", 3], {}, "argv item must be a string, got int"),
        (["echo", b"x"], {}, "argv item must be a string, got bytes"),
        (["echo", None], {}, "argv item must be a string, got NoneType"),
        (["true"], {"cwd": "/tmp\x00x"}, r"cwd '/tmp\x00x' contains a NUL byte"),
        (["true"], {"cwd": Path("/tmp\x00x")}, r"cwd '/tmp\x00x' contains a NUL byte"),
        (["true"], {"env": {"A\x00": "1"}}, r"env name 'A\x00' contains a NUL byte"),
        (["true"], {"env": {"A": "1\x002"}}, "env value of 'A' contains a NUL byte"),
        (["true"], {"env": {"A": 1}}, "env value must be a string, got int"),
        (["true"], {"env": {1: "1"}}, "env name must be a string, got int"),
        (["true"], {"env": {"A=B": "1"}}, "env name 'A=B' must be non-empty and contain no '='"),
        (["true"], {"env": {"=": "1"}}, "env name '=' must be non-empty and contain no '='"),
        (["true"], {"env": {"": "1"}}, "env name '' must be non-empty and contain no '='"),
        (["true"], {"project": ""}, "project must not be empty"),
        (["true"], {"project": "p\x00"}, r"project 'p\x00' contains a NUL byte"),
        (["true"], {"template": "t\x00"}, r"template 't\x00' contains a NUL byte"),
        (["true"], {"template": 1}, "template must be a string, got int"),
        (["true"], {"locks": "db"}, "locks must be a list of names, not a single string"),
        (["true"], {"locks": ["d\x00b"]}, r"lock name 'd\x00b' contains a NUL byte"),
        (["true"], {"locks": [1]}, "lock name must be a string, got int"),
        (["true"], {"retry_backoff_s": -1.0}, "retry_backoff_s must be a non-negative number"),
        (["true"], {"retry_backoff_s": math.nan}, "retry_backoff_s must be a non-negative number"),
        (["true"], {"retry_backoff_s": math.inf}, "retry_backoff_s must be a non-negative number"),
        (["true"], {"not_before": math.nan}, "not_before must be a finite UNIX time"),
        (["true"], {"not_before": math.inf}, "not_before must be a finite UNIX time"),
        (["true"], {"priority": True}, "priority must be an integer"),
        (["true"], {"priority": 1.5}, "priority must be an integer"),
    ],
)
def test_build_rejects(argv: Any, kwargs: dict[str, Any], fragment: str) -> None:
    """Malformed input raises `InvalidTask` saying exactly what is wrong."""
    with pytest.raises(InvalidTask) as excinfo:
        TaskSpec.build(argv, **kwargs)
    assert fragment in str(excinfo.value)


@pytest.mark.parametrize("name", ["timeout_s", "stall_timeout_s"])
@pytest.mark.parametrize("seconds", [0, 0.0, -1.0, -math.inf, math.inf, math.nan])
def test_build_rejects_bad_timeouts(name: str, seconds: float) -> None:
    """A timeout must be a positive, finite number of seconds (or None to disable it)."""
    kwargs: dict[str, Any] = {name: seconds}
    with pytest.raises(InvalidTask) as excinfo:
        TaskSpec.build(["true"], **kwargs)
    assert str(excinfo.value) == f"{name} must be a positive number of seconds or None"


@pytest.mark.parametrize("max_attempts", [0, -1, True, False, 1.0, "2", None])
def test_build_rejects_bad_max_attempts(max_attempts: Any) -> None:
    """`max_attempts` must be a real integer of at least one (bools are refused)."""
    with pytest.raises(InvalidTask) as excinfo:
        TaskSpec.build(["true"], max_attempts=max_attempts)
    assert str(excinfo.value) == "max_attempts must be an integer >= 1"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout_s": None, "stall_timeout_s": None},
        {"timeout_s": 1e-9, "stall_timeout_s": 86400.0},
        {"retry_backoff_s": 0.0},
        {"max_attempts": 1},
        {"not_before": 1.0},
        {"priority": -5},
    ],
)
def test_build_accepts_boundary_values(kwargs: dict[str, Any]) -> None:
    """Values at the edge of what is allowed are accepted unchanged."""
    spec = TaskSpec.build(["true"], **kwargs)
    for name, value in kwargs.items():
        assert getattr(spec, name) == value


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"timeout_s": "5"}, "timeout_s must be a positive number of seconds or None"),
        ({"timeout_s": True}, "timeout_s must be a positive number of seconds or None"),
        ({"retry_backoff_s": None}, "retry_backoff_s must be a non-negative number of seconds"),
        ({"env": [("A", "1")]}, "env must be a mapping of names to values, or None"),
        ({"not_before": "soon"}, "not_before must be a finite UNIX time"),
    ],
)
def test_build_rejects_wrong_types_with_invalid_task(options: dict[str, Any], message: str) -> None:
    """Wrong types are an InvalidTask with a clear message, never a TypeError from inside."""
    with pytest.raises(InvalidTask, match=re.escape(message)):
        TaskSpec.build(["x"], **options)


def test_a_built_spec_is_checked_once_and_anything_else_is_checked_again() -> None:
    """`checked` returns what `build` made as it is, but validates a spec made by hand
    or derived with `dataclasses.replace`, and the mark never shows or compares."""
    import dataclasses

    built = TaskSpec.build(["true"], project="p")
    assert built.checked() is built
    by_hand = TaskSpec(argv=("true",), project="p")
    assert by_hand.checked() is not by_hand
    assert by_hand.checked() == built
    with pytest.raises(InvalidTask, match="argv"):
        dataclasses.replace(built, argv=()).checked()
    with pytest.raises(InvalidTask, match="project"):
        TaskSpec(argv=("true",), project="").checked()
    assert by_hand == built
    assert "_checked" not in repr(built)
