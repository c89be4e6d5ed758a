"""Tasks, statuses and the transitions between them. Pure: no I/O here."""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ._errors import InvalidTask


class Status(enum.StrEnum):
    """Where a task is in its life. Terminal statuses are final."""

    WAITING = "waiting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    STALLED = "stalled"
    CANCELLED = "cancelled"
    LOST = "lost"

    @property
    def is_terminal(self) -> bool:
        return self not in (Status.WAITING, Status.RUNNING)


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """What to run and under which rules: everything `submit` stores.

    `argv` is executed directly (no shell); pass `["sh", "-c", "..."]` to get one.
    `env` replaces the child's environment when given; `None` inherits the pool's.
    `template` tasks are exclusive per template unless `template_parallel` is set;
    `locks` are named resources, each held by at most one running task.
    Times are in seconds; `None` disables a timeout.
    """

    argv: tuple[str, ...]
    cwd: str | None = None
    env: Mapping[str, str] | None = None
    project: str = "default"
    template: str | None = None
    template_parallel: bool = False
    locks: frozenset[str] = frozenset()
    priority: int = 0
    not_before: float | None = None
    timeout_s: float | None = None
    stall_timeout_s: float | None = None
    max_attempts: int = 1
    retry_backoff_s: float = 1.0

    @classmethod
    def build(
        cls,
        argv: Sequence[str],
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        project: str = "default",
        template: str | None = None,
        template_parallel: bool = False,
        locks: Sequence[str] = (),
        priority: int = 0,
        not_before: float | None = None,
        timeout_s: float | None = None,
        stall_timeout_s: float | None = None,
        max_attempts: int = 1,
        retry_backoff_s: float = 1.0,
    ) -> TaskSpec:
        """Validate caller input and build a spec, or raise `InvalidTask` saying what is wrong."""
        if isinstance(argv, str | bytes):
            raise InvalidTask("argv must be a list of strings, not a single string (no shell)")
        argv_t = tuple(argv)
        if not argv_t:
            raise InvalidTask("argv must not be empty")
        for arg in argv_t:
            _check_text("argv item", arg)
        cwd_s = os.fspath(cwd) if cwd is not None else None
        if cwd_s is not None:
            _check_text("cwd", cwd_s)
        env_d: dict[str, str] | None = None
        if env is not None:
            if not isinstance(env, Mapping):
                raise InvalidTask("env must be a mapping of names to values, or None")
            env_d = {}
            for key, value in env.items():
                _check_text("env name", key)
                _check_text("env value", value)
                if not key or "=" in key:
                    raise InvalidTask(f"env name {key!r} must be non-empty and contain no '='")
                env_d[key] = value
        _check_text("project", project)
        if not project:
            raise InvalidTask("project must not be empty")
        if template is not None:
            _check_text("template", template)
        if isinstance(locks, str):
            raise InvalidTask("locks must be a list of names, not a single string")
        for lock in locks:
            _check_text("lock name", lock)
        for name, seconds in (("timeout_s", timeout_s), ("stall_timeout_s", stall_timeout_s)):
            if seconds is not None and not (_is_number(seconds) and seconds > 0):
                raise InvalidTask(f"{name} must be a positive number of seconds or None")
        if not (_is_number(retry_backoff_s) and retry_backoff_s >= 0):
            raise InvalidTask("retry_backoff_s must be a non-negative number of seconds")
        if not_before is not None and not _is_number(not_before):
            raise InvalidTask("not_before must be a finite UNIX time")
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise InvalidTask("max_attempts must be an integer >= 1")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidTask("priority must be an integer")
        return cls(
            argv=argv_t,
            cwd=cwd_s,
            env=env_d,
            project=project,
            template=template,
            template_parallel=bool(template_parallel),
            locks=frozenset(locks),
            priority=priority,
            not_before=not_before,
            timeout_s=timeout_s,
            stall_timeout_s=stall_timeout_s,
            max_attempts=max_attempts,
            retry_backoff_s=retry_backoff_s,
        )


def _is_number(value: object) -> bool:
    """A finite int or float; bools are refused (True is not a duration)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_text(what: str, value: object) -> None:
    if not isinstance(value, str):
        raise InvalidTask(f"{what} must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise InvalidTask(f"{what} {value!r} contains a NUL byte")


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """A snapshot of one task as the store holds it."""

    id: int
    spec: TaskSpec
    status: Status
    submitted_at: float
    attempts_used: int
    fence: int
    owner_node: str | None
    lease_expires_at: float | None
    pid: int | None
    started_at: float | None
    finished_at: float | None
    exit_code: int | None
    reason: str | None  # why the task is in its current status, e.g. "killed by SIGKILL"
    cancel_requested: str | None

    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One recorded transition of a task, with the human reason for it."""

    id: int
    task_id: int
    at: float
    fence: int | None
    node_id: str | None
    from_status: Status | None
    to_status: Status
    reason: str


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One pool incarnation as registered in the store."""

    id: str
    host: str
    pid: int
    pid_started_at: float
    started_at: float
    heartbeat_at: float
    stopped_at: float | None
    max_parallel: int


@dataclass(frozen=True, slots=True)
class Claim:
    """An attempt a node now owns: run it, and carry `fence` on every write."""

    task: TaskInfo
    fence: int


class OutcomeKind(enum.StrEnum):
    """Why a runner stopped."""

    EXITED = "exited"  # the process ended on its own (any exit code or signal)
    SPAWN_FAILED = "spawn_failed"  # the process could never start
    TIMED_OUT = "timed_out"
    STALLED = "stalled"
    CANCELLED = "cancelled"
    SHUTDOWN = "shutdown"  # the pool stopped it while shutting down: not the task's fault
    # The node could not renew the lease and stopped the attempt before it expired, so
    # that a rescuer's copy never overlaps it: not the task's fault either.
    SELF_FENCED = "self_fenced"
    LEASE_LOST = "lease_lost"  # another owner holds the task: nothing may be written


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt ended, as the runner saw it."""

    kind: OutcomeKind
    reason: str
    exit_code: int | None = None  # negative: killed by that signal number


@dataclass(frozen=True, slots=True)
class Transition:
    """What the store must write when an attempt ends."""

    status: Status
    consumes_attempt: bool
    not_before: float | None = None
    reason: str = ""


_STATUS_OF_STOP = {
    OutcomeKind.TIMED_OUT: Status.TIMED_OUT,
    OutcomeKind.STALLED: Status.STALLED,
    OutcomeKind.CANCELLED: Status.CANCELLED,
}


def retry_delay_s(backoff_s: float, attempts_used: int) -> float:
    """Exponential backoff: base, 2x base, 4x base ... capped at one hour."""
    doublings = min(max(attempts_used - 1, 0), 32)  # 2**32 s is past any cap: no overflow
    return float(min(backoff_s * 2**doublings, 3600.0))


def decide_finish(
    outcome: Outcome,
    *,
    attempts_used: int,
    max_attempts: int,
    backoff_s: float,
    now: float,
    cancel_requested: bool = False,
) -> Transition:
    """Decide the next status of a task whose attempt ended with `outcome`.

    `attempts_used` counts the attempt that just ended. Shutdown and self-fencing
    (stopped before a lease that could not be renewed ran out) never use up an
    attempt; cancellation and spawn failures are never retried (retrying a missing
    program only wastes time); other failures are retried while attempts remain.
    A task someone asked to cancel is never re-queued.
    """
    transition = _decide_finish(outcome, attempts_used, max_attempts, backoff_s, now)
    if cancel_requested and transition.status is Status.WAITING:
        return Transition(Status.CANCELLED, True, reason=f"cancelled; {outcome.reason}")
    return transition


def _decide_finish(
    outcome: Outcome, attempts_used: int, max_attempts: int, backoff_s: float, now: float
) -> Transition:
    assert outcome.kind is not OutcomeKind.LEASE_LOST, "a lost lease is never written"
    if outcome.kind in (OutcomeKind.SHUTDOWN, OutcomeKind.SELF_FENCED):
        return Transition(Status.WAITING, consumes_attempt=False, reason=outcome.reason)
    if outcome.kind is OutcomeKind.EXITED and outcome.exit_code == 0:
        return Transition(Status.SUCCEEDED, consumes_attempt=True, reason=outcome.reason)
    if outcome.kind is OutcomeKind.CANCELLED:
        return Transition(Status.CANCELLED, consumes_attempt=True, reason=outcome.reason)
    final = _STATUS_OF_STOP.get(outcome.kind, Status.FAILED)
    if outcome.kind is not OutcomeKind.SPAWN_FAILED and attempts_used < max_attempts:
        delay = retry_delay_s(backoff_s, attempts_used)
        return Transition(
            Status.WAITING,
            consumes_attempt=True,
            not_before=now + delay,
            reason=f"{outcome.reason}; retrying in {delay:g} s "
            f"(attempt {attempts_used + 1} of {max_attempts})",
        )
    return Transition(final, consumes_attempt=True, reason=outcome.reason)


def decide_orphan(
    *, attempts_used: int, max_attempts: int, reason: str, cancel_requested: bool = False
) -> Transition:
    """Decide what happens to an attempt whose owner vanished (crash, kill, host loss).

    The attempt counts as used: the task itself may be what took its owner down.
    """
    if cancel_requested:
        return Transition(Status.CANCELLED, True, reason=f"{reason}; cancel was requested")
    if attempts_used < max_attempts:
        return Transition(
            Status.WAITING,
            consumes_attempt=True,
            reason=f"{reason}; re-queued (attempt {attempts_used + 1} of {max_attempts})",
        )
    return Transition(Status.LOST, consumes_attempt=True, reason=f"{reason}; no attempts left")


def decide_handback(reason: str, *, cancel_requested: bool = False) -> Transition:
    """Decide what happens to an attempt its node gives up without having run it to
    an end: the node stopped (or never started the task) and its processes are dead.

    Not the task's fault, so the attempt is refunded; a task someone asked to cancel
    is cancelled instead of re-queued, as in `decide_finish`.
    """
    if cancel_requested:
        return Transition(Status.CANCELLED, True, reason=f"cancelled; {reason}")
    return Transition(Status.WAITING, consumes_attempt=False, reason=reason)


@dataclass(frozen=True, slots=True)
class Limits:
    """Blocking limits the claim rules enforce.

    `max_parallel` is per node; `project_limits` caps running tasks per project
    across every node sharing the store.
    """

    max_parallel: int = 4
    project_limits: Mapping[str, int] = field(default_factory=dict)
