"""Submit-time trust: sizes bounded, every field checked, secrets never shown. Pure."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskpool import InvalidTask, Status, TaskInfo, TaskSpec
from taskpool._attempt_process import task_environment
from taskpool._models import (
    INT32_MAX,
    MAX_ARGS,
    MAX_ARGV_BYTES,
    MAX_CWD_BYTES,
    MAX_ENV_BYTES,
    MAX_ENV_VARS,
    MAX_LOCKS,
    MAX_NAME_BYTES,
)
from taskpool._procs import ATTEMPT_ENV

# --- size limits ------------------------------------------------------------

_LONG_NAME = "n" * (MAX_NAME_BYTES + 1)


@pytest.mark.parametrize(
    ("argv", "options", "limit"),
    [
        (["x" * MAX_ARGV_BYTES], {}, "MAX_ARGV_BYTES"),
        (["x" * 1000] * (MAX_ARGV_BYTES // 1000 + 1), {}, "MAX_ARGV_BYTES"),
        (["é" * (MAX_ARGV_BYTES // 2)], {}, "MAX_ARGV_BYTES"),  # counted in UTF-8 bytes
        (["x"] * (MAX_ARGS + 1), {}, "MAX_ARGS"),
        (["true"], {"env": {"A": "v" * MAX_ENV_BYTES}}, "MAX_ENV_BYTES"),
        (["true"], {"env": {f"V{i}": "v" * 1000 for i in range(70)}}, "MAX_ENV_BYTES"),
        (["true"], {"env": {f"V{i}": "" for i in range(MAX_ENV_VARS + 1)}}, "MAX_ENV_VARS"),
        (["true"], {"pass_env": [f"V{i}" for i in range(MAX_ENV_VARS + 1)]}, "MAX_ENV_VARS"),
        (
            ["true"],
            {"env": {"A": "1"}, "pass_env": [f"V{i}" for i in range(MAX_ENV_VARS)]},
            "MAX_ENV_VARS",
        ),
        (["true"], {"env": {_LONG_NAME: "1"}}, "MAX_NAME_BYTES"),
        (["true"], {"pass_env": [_LONG_NAME]}, "MAX_NAME_BYTES"),
        (["true"], {"project": _LONG_NAME}, "MAX_NAME_BYTES"),
        (["true"], {"template": _LONG_NAME}, "MAX_NAME_BYTES"),
        (["true"], {"locks": [_LONG_NAME]}, "MAX_NAME_BYTES"),
        (["true"], {"locks": [f"l{i}" for i in range(MAX_LOCKS + 1)]}, "MAX_LOCKS"),
        (["true"], {"cwd": "/" + "d" * MAX_CWD_BYTES}, "MAX_CWD_BYTES"),
    ],
)
def test_oversized_input_is_refused_naming_the_limit(
    argv: list[str], options: dict[str, Any], limit: str
) -> None:
    """Each bound on a submit's size refuses what is past it, with the constant's name."""
    with pytest.raises(InvalidTask, match=limit):
        TaskSpec.build(argv, **options)


def test_input_at_the_limits_is_accepted() -> None:
    """Exactly at every bound is still a valid task."""
    spec = TaskSpec.build(
        ["x" * (MAX_ARGV_BYTES - 1)],
        env={f"V{i}": "" for i in range(MAX_ENV_VARS)},
        project="p" * MAX_NAME_BYTES,
        locks=[f"l{i}" for i in range(MAX_LOCKS)],
        cwd="/" + "d" * (MAX_CWD_BYTES - 1),
    )
    assert len(spec.locks) == MAX_LOCKS
    assert len(TaskSpec.build(["x"] * MAX_ARGS).argv) == MAX_ARGS


def test_a_100_mb_argv_is_refused_without_being_copied() -> None:
    """The incident's 100 MB argv is an InvalidTask naming the limit (checked by length first)."""
    huge = "x" * (100 * 1024 * 1024)
    with pytest.raises(InvalidTask, match="MAX_ARGV_BYTES"):
        TaskSpec.build(["echo", huge])


# --- every field, every wrong value ------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "options", "field"),
    [
        (None, {}, "argv"),
        (123, {}, "argv"),
        ({"a": "b"}, {}, "argv"),
        (["true"], {"max_attempts": 10**30}, "max_attempts"),
        (["true"], {"max_attempts": INT32_MAX + 1}, "max_attempts"),
        (["true"], {"priority": 10**30}, "priority"),
        (["true"], {"priority": -(10**30)}, "priority"),
        (["true"], {"priority": INT32_MAX + 1}, "priority"),
        (["true"], {"timeout_s": 10**400}, "timeout_s"),
        (["true"], {"stall_timeout_s": 10**400}, "stall_timeout_s"),
        (["true"], {"retry_backoff_s": 10**400}, "retry_backoff_s"),
        (["true"], {"not_before": 10**400}, "not_before"),
        (["true"], {"cwd": 123}, "cwd"),
        (["true"], {"cwd": ["/tmp"]}, "cwd"),
        (["true"], {"locks": None}, "locks"),
        (["true"], {"locks": 5}, "locks"),
        (["true"], {"locks": {"a": 1}}, "locks"),
        (["true"], {"locks": [""]}, "lock name"),
        (["true"], {"template": ""}, "template"),
        (["true"], {"template_parallel": "yes"}, "template_parallel"),
        (["true"], {"template_parallel": 1}, "template_parallel"),
        (["true"], {"inherit_env": None}, "inherit_env"),
        (["true"], {"pass_env": "TOKEN"}, "pass_env"),
        (["true"], {"pass_env": None}, "pass_env"),
        (["true"], {"pass_env": [1]}, "pass_env name"),
        (["true"], {"pass_env": ["A=B"]}, "pass_env name"),
        (["\udcff"], {}, "argv item"),
        (["true"], {"project": "p\udcff"}, "project"),
        (["true"], {"env": {"A": "\udcff"}}, "env value of 'A'"),
    ],
)
def test_wrong_values_are_invalid_task_naming_the_field(
    argv: Any, options: dict[str, Any], field: str
) -> None:
    """No OverflowError, TypeError or UnicodeEncodeError escapes: an InvalidTask names the field."""
    with pytest.raises(InvalidTask) as excinfo:
        TaskSpec.build(argv, **options)
    assert field in str(excinfo.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pass_env": ["TASKPOOL_DB"]}, "pass_env name 'TASKPOOL_DB' is reserved"),
        ({"pass_env": ["PGPASSWORD"]}, "pass_env name 'PGPASSWORD' is reserved"),
        ({"env": {"TASKPOOL_ATTEMPT": "1:1"}}, "env name 'TASKPOOL_ATTEMPT' is reserved"),
        ({"env": {"A": "1"}, "pass_env": ["A"]}, "'A' is named in both env and pass_env"),
    ],
)
def test_taskpool_variables_cannot_be_asked_for(options: dict[str, Any], message: str) -> None:
    """A task cannot name taskpool's own variables to get the worker's credentials."""
    with pytest.raises(InvalidTask, match=message):
        TaskSpec.build(["true"], **options)


def test_an_env_value_never_appears_in_an_error() -> None:
    """A bad env value is reported by its name, never echoed (it may be a secret)."""
    with pytest.raises(InvalidTask) as excinfo:
        TaskSpec.build(["true"], env={"TOKEN": "hunter2\x00"})
    assert "hunter2" not in str(excinfo.value)
    assert "TOKEN" in str(excinfo.value)


def test_a_hand_made_spec_is_checked_like_built_input() -> None:
    """`checked()` (what every store calls) refuses a spec that bypassed `build`."""
    with pytest.raises(InvalidTask, match="max_attempts"):
        TaskSpec(argv=("true",), max_attempts=10**30).checked()
    with pytest.raises(InvalidTask, match="MAX_ARGV_BYTES"):
        TaskSpec(argv=("x" * (MAX_ARGV_BYTES + 1),)).checked()
    spec = TaskSpec.build(["true"], env={"A": "1"}, pass_env=["B"], timeout_s=5)
    assert spec.checked() == spec


def test_not_before_zero_means_no_delay() -> None:
    """0 (the epoch) is stored and read back as None, so a spec round-trips exactly."""
    assert TaskSpec.build(["true"], not_before=0).not_before is None
    assert TaskSpec.build(["true"], not_before=0.0).not_before is None


# --- env values are never shown ------------------------------------------------------


def test_repr_shows_env_names_never_values() -> None:
    """Neither a TaskSpec's nor a TaskInfo's repr prints an env value."""
    spec = TaskSpec.build(["true"], env={"API_TOKEN": "hunter2"}, pass_env=["DB_URL"])
    info = TaskInfo(
        1, spec, Status.WAITING, 0.0, 0, 0, None, None, None, None, None, None, None, None
    )
    for text in (repr(spec), repr(info), str(info)):
        assert "hunter2" not in text
        assert "'API_TOKEN': '***'" in text
        assert "DB_URL" in text
    assert spec.env == {"API_TOKEN": "hunter2"}  # the value itself is intact


# --- the environment a task gets (pure) ----------------------------------------------

_WORKER_ENV = {
    b"PATH": b"/usr/bin",
    b"HOME": b"/home/w",
    b"API_TOKEN": b"from-worker",
    b"TASKPOOL_DB": b"postgresql://u:hunter2@db/app",
    b"TASKPOOL_MAX_PARALLEL": b"4",
    b"TASKPOOL_ATTEMPT": b"outer:1",  # the worker itself runs as another pool's task
    b"PGPASSWORD": b"hunter2",
    b"PGHOST": b"db",
}


def test_a_task_inherits_the_worker_environment_minus_taskpools_own() -> None:
    """TASKPOOL_* and PG* are stripped; the marker is taskpool's; the rest is inherited."""
    env = task_environment(
        _WORKER_ENV, env=None, pass_env=frozenset(), inherit_env=True, marker="3:7"
    )
    assert env == {
        b"PATH": b"/usr/bin",
        b"HOME": b"/home/w",
        b"API_TOKEN": b"from-worker",
        ATTEMPT_ENV.encode(): b"3:7",
    }


def test_pass_env_and_env_are_layered_over_the_inherited_environment() -> None:
    """pass_env takes the worker's value (a missing one stays unset), env adds, the marker wins."""
    env = task_environment(
        _WORKER_ENV,
        env={"HOME": "/tmp/h", "X": "1"},
        pass_env=frozenset({"API_TOKEN", "NOT_SET_ON_WORKER", "PGPASSWORD"}),
        inherit_env=False,
        marker="3:7",
    )
    # PGPASSWORD in a hand-made spec's pass_env is still never handed over.
    assert env == {
        b"API_TOKEN": b"from-worker",
        b"HOME": b"/tmp/h",
        b"X": b"1",
        ATTEMPT_ENV.encode(): b"3:7",
    }


# --- fuzz: any JSON-like value in any field -----------------------------------------

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text()
    | st.sampled_from(["", "a\x00b", "\udcff", "TASKPOOL_DB", "PGPASSWORD", "/tmp"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=8,
)
_FIELDS = (
    "cwd",
    "env",
    "pass_env",
    "inherit_env",
    "project",
    "template",
    "template_parallel",
    "locks",
    "priority",
    "not_before",
    "timeout_s",
    "stall_timeout_s",
    "max_attempts",
    "retry_backoff_s",
)


@settings(max_examples=2000, deadline=None)
@given(
    argv=_JSON | st.lists(st.text(), max_size=3),
    options=st.dictionaries(st.sampled_from(_FIELDS), _JSON),
)
def test_build_is_an_invalid_task_or_a_valid_spec_for_any_json(
    argv: Any, options: dict[str, Any]
) -> None:
    """Whatever JSON-like value lands in whatever field, `build` raises InvalidTask or
    returns a spec that passes its own check unchanged; never another exception."""
    try:
        spec = TaskSpec.build(argv, **options)
    except InvalidTask:
        return
    assert spec.checked() == spec
    assert all(isinstance(a, str) for a in spec.argv)
    assert spec.max_attempts <= INT32_MAX
    for seconds in (spec.timeout_s, spec.stall_timeout_s, spec.not_before, spec.retry_backoff_s):
        assert seconds is None or (isinstance(seconds, float) and math.isfinite(seconds))
