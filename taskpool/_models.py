"""Tasks, statuses and the transitions between them. Pure: no I/O here."""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Self

from ._redact import MASK
from ._validation import DEFAULT_RETRY_MAX_DELAY_S as DEFAULT_RETRY_MAX_DELAY_S

# The bounds and the reserved variables are defined in _validation with the checks
# that enforce them; the `X as X` imports keep them importable from here as before.
from ._validation import INT32_MAX as INT32_MAX
from ._validation import INT32_MIN as INT32_MIN
from ._validation import LIBPQ_ENV_PREFIX as LIBPQ_ENV_PREFIX
from ._validation import MAX_AFTER as MAX_AFTER
from ._validation import MAX_ARGS as MAX_ARGS
from ._validation import MAX_ARGV_BYTES as MAX_ARGV_BYTES
from ._validation import MAX_CPU_MAX as MAX_CPU_MAX
from ._validation import MAX_CWD_BYTES as MAX_CWD_BYTES
from ._validation import MAX_ENV_BYTES as MAX_ENV_BYTES
from ._validation import MAX_ENV_VARS as MAX_ENV_VARS
from ._validation import MAX_LOCKS as MAX_LOCKS
from ._validation import MAX_MEMORY_MAX as MAX_MEMORY_MAX
from ._validation import MAX_NAME_BYTES as MAX_NAME_BYTES
from ._validation import MIN_MEMORY_MAX as MIN_MEMORY_MAX
from ._validation import TASKPOOL_ENV_PREFIX as TASKPOOL_ENV_PREFIX
from ._validation import (
    check_after,
    check_argv,
    check_backoff,
    check_bool,
    check_cwd,
    check_env,
    check_jitter,
    check_limits,
    check_locks,
    check_max_attempts,
    check_max_delay,
    check_name,
    check_not_before,
    check_pass_env,
    check_priority,
    check_retry_on,
    check_timeout,
    check_unique_key,
)
from ._validation import is_taskpool_variable as is_taskpool_variable


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
class ResourceLimits:
    """Per-attempt resource limits; None means unlimited."""

    memory_max: int | None = None  # bytes
    pids_max: int | None = None  # processes (and threads) at once
    cpu_max: float | None = None  # CPUs, e.g. 0.5 for half of one

    def over(self, defaults: ResourceLimits) -> ResourceLimits:
        """These limits, with `defaults` filling in what these leave unset."""
        return ResourceLimits(
            memory_max=self.memory_max if self.memory_max is not None else defaults.memory_max,
            pids_max=self.pids_max if self.pids_max is not None else defaults.pids_max,
            cpu_max=self.cpu_max if self.cpu_max is not None else defaults.cpu_max,
        )

    def __bool__(self) -> bool:
        return self != ResourceLimits()

    def wanted(self) -> list[str]:
        """The controllers these limits need."""
        values = {"memory": self.memory_max, "pids": self.pids_max, "cpu": self.cpu_max}
        return [name for name in CONTROLLERS if values[name] is not None]


CONTROLLERS = ("memory", "pids", "cpu")


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """What to run and under which rules: everything `submit` stores.

    `argv` is executed directly (no shell); pass `["sh", "-c", "..."]` to get one.
    A task's environment is the worker's own minus taskpool's variables (every
    `TASKPOOL_*` and libpq's `PG*`), or nothing with `inherit_env=False`; then the
    worker's values of the names in `pass_env`; then `env`. `env` values are stored
    in the database as given: a secret goes in `pass_env`, which stores only the
    name and takes the value from the worker's environment at spawn time (a name
    the worker lacks stays unset). `repr` never shows `env` values.
    `template` tasks are exclusive per template unless `template_parallel` is set;
    `locks` are named resources, each held by at most one running task.
    Times are in seconds; `None` disables a timeout.

    A failed attempt is retried while attempts remain, after `retry_backoff_s`
    doubling per attempt, capped at `retry_max_delay_s`, less a random part of up to
    `retry_jitter` of it (0: none; 1: anywhere from 0 to the whole delay), and only
    on the outcomes in `retry_on` (None: every failure that retries by default:
    `exited` with a failure code or a signal, `timed_out`, `stalled`, `lost`;
    `exit:N`: that exit code only).
    While a task with a `unique_key` is waiting or running, a submit with the same
    key stores nothing and returns that task's id (`on_conflict="reject"`), or, with
    `on_conflict="replace_waiting"`, cancels a waiting one and is stored (a running
    one still rejects).
    `after` names tasks (their ids, ascending, each once) that must all succeed
    before this one may start; when one of them ends otherwise, this one is
    cancelled, naming it. They must exist when this one is submitted.
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
    pass_env: frozenset[str] = frozenset()
    inherit_env: bool = True
    memory_max: int | None = None  # bytes; the attempt is OOM-killed past it
    pids_max: int | None = None  # processes at once (forks past it fail)
    cpu_max: float | None = None  # CPUs, e.g. 0.5
    retry_jitter: float = 0.0
    retry_max_delay_s: float = DEFAULT_RETRY_MAX_DELAY_S
    retry_on: frozenset[str] | None = None
    unique_key: str | None = None
    on_conflict: str = "reject"
    after: tuple[int, ...] = ()
    # True only on what `build` returned: its fields were validated then, and a frozen
    # spec cannot change, so `checked` need not validate them again (a `submit_many` of
    # 100,000 built specs would spend more time re-checking them than storing them).
    # Not an init field: `dataclasses.replace` and a spec made by hand start unchecked.
    _checked: bool = field(default=False, init=False, repr=False, compare=False)

    @property
    def limits(self) -> ResourceLimits:
        return ResourceLimits(self.memory_max, self.pids_max, self.cpu_max)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            if f.name != "env"
            else f"env={self.masked_env()!r}"
            for f in fields(self)
            if f.repr
        )
        return f"TaskSpec({shown})"

    def retry_text(self) -> str:
        """The retry policy in words, as `taskpool show` and the dashboard give it."""
        if self.max_attempts == 1:
            return "never (1 attempt)"
        on = "any failure" if self.retry_on is None else ", ".join(sorted(self.retry_on))
        jitter = f", less up to {self.retry_jitter:.0%} at random" if self.retry_jitter else ""
        return (
            f"up to {self.max_attempts} attempts, on {on}; after {self.retry_backoff_s:g} s"
            f" doubling to at most {self.retry_max_delay_s:g} s{jitter}"
        )

    def masked_env(self) -> dict[str, str] | None:
        """`env` with every value replaced by a mask: what may be shown to anyone."""
        return None if self.env is None else dict.fromkeys(self.env, MASK)

    def checked(self) -> TaskSpec:
        """This spec validated as `build` validates caller input (for a spec made by
        hand): the normalised spec, or `InvalidTask`. Stores call it before writing."""
        if self._checked:
            return self
        return TaskSpec.build(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            pass_env=self.pass_env,
            inherit_env=self.inherit_env,
            project=self.project,
            template=self.template,
            template_parallel=self.template_parallel,
            locks=self.locks,
            priority=self.priority,
            not_before=self.not_before,
            timeout_s=self.timeout_s,
            stall_timeout_s=self.stall_timeout_s,
            max_attempts=self.max_attempts,
            retry_backoff_s=self.retry_backoff_s,
            memory_max=self.memory_max,
            pids_max=self.pids_max,
            cpu_max=self.cpu_max,
            retry_jitter=self.retry_jitter,
            retry_max_delay_s=self.retry_max_delay_s,
            retry_on=self.retry_on,
            unique_key=self.unique_key,
            on_conflict=self.on_conflict,
            after=self.after,
        )

    @classmethod
    def build(
        cls,
        argv: Sequence[str],
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        pass_env: Iterable[str] = (),
        inherit_env: bool = True,
        project: str = "default",
        template: str | None = None,
        template_parallel: bool = False,
        locks: Iterable[str] = (),
        priority: int = 0,
        not_before: float | None = None,
        timeout_s: float | None = None,
        stall_timeout_s: float | None = None,
        max_attempts: int = 1,
        retry_backoff_s: float = 1.0,
        memory_max: int | None = None,
        pids_max: int | None = None,
        cpu_max: float | None = None,
        retry_jitter: float = 0.0,
        retry_max_delay_s: float = DEFAULT_RETRY_MAX_DELAY_S,
        retry_on: Iterable[str] | None = None,
        unique_key: str | None = None,
        on_conflict: str = "reject",
        after: Iterable[int] = (),
    ) -> TaskSpec:
        """Validate caller input and build a spec, or raise `InvalidTask` saying what is
        wrong. Any value in any field gives one or the other, never another exception;
        sizes are bounded by the `MAX_*` constants (of `_validation`, importable
        from here too)."""
        # In this order: of several bad fields, the first checked is the one named.
        argv_t = check_argv(argv)
        cwd_s = check_cwd(cwd)
        env_d = check_env(env)
        pass_t = check_pass_env(pass_env, env_d)
        check_bool("inherit_env", inherit_env)
        check_name("project", project)
        if template is not None:
            check_name("template", template, empty_hint=" (None for no template)")
        check_bool("template_parallel", template_parallel)
        locks_t = check_locks(locks)
        timeout = check_timeout("timeout_s", timeout_s)
        stall_timeout = check_timeout("stall_timeout_s", stall_timeout_s)
        backoff = check_backoff(retry_backoff_s)
        start = check_not_before(not_before)
        check_max_attempts(max_attempts)
        check_priority(priority)
        memory, pids, cpus = check_limits(memory_max, pids_max, cpu_max)
        jitter = check_jitter(retry_jitter)
        max_delay = check_max_delay(retry_max_delay_s)
        retry_on_set = check_retry_on(retry_on)
        check_unique_key(unique_key, on_conflict)
        after_t = check_after(after)
        spec = cls(
            argv=argv_t,
            cwd=cwd_s,
            env=env_d,
            pass_env=frozenset(pass_t),
            inherit_env=inherit_env,
            project=project,
            template=template,
            template_parallel=template_parallel,
            locks=frozenset(locks_t),
            priority=priority,
            # 0 is "no earlier than the epoch", i.e. no delay: stored and read back as None.
            not_before=start or None,
            timeout_s=timeout,
            stall_timeout_s=stall_timeout,
            max_attempts=max_attempts,
            retry_backoff_s=backoff,
            memory_max=memory,
            pids_max=pids,
            cpu_max=cpus,
            retry_jitter=jitter,
            retry_max_delay_s=max_delay,
            retry_on=retry_on_set,
            unique_key=unique_key,
            on_conflict=on_conflict,
            after=after_t,
        )
        object.__setattr__(spec, "_checked", True)  # frozen: set as __init__ sets fields
        return spec


class SubmitResult(int):
    """What `submit` returns: a task id (an `int`, as ever) that also says whether
    the submit stored a new task. `created` is False when a task with the spec's
    `unique_key` was waiting or running and the submit was rejected: the id is
    that task's. `replaced` is the id of the waiting task a `replace_waiting`
    submit cancelled, if any."""

    created: bool
    replaced: int | None

    def __new__(cls, task_id: int, *, created: bool = True, replaced: int | None = None) -> Self:
        result = super().__new__(cls, task_id)
        result.created = created
        result.replaced = replaced
        return result

    @classmethod
    def of(cls, task_id: int) -> SubmitResult:
        """What a submit returned, as a `SubmitResult` (a store that returns a plain
        int stored a new task)."""
        return task_id if isinstance(task_id, SubmitResult) else cls(task_id)

    @property
    def task_id(self) -> int:
        return int(self)

    def __repr__(self) -> str:
        return f"SubmitResult({int(self)}, created={self.created}, replaced={self.replaced})"

    __str__ = int.__repr__


class CancelMode(enum.StrEnum):
    """How a running task is cancelled; the values are what the stores keep."""

    GRACEFUL = "graceful"  # SIGTERM, the node's kill grace period, then SIGKILL
    FORCE = "force"  # SIGKILL at once


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
    cancel_requested: CancelMode | None  # a cancel asked of the running attempt's owner

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
    containment: str | None = None  # how it contains its attempts, as it said at start
    # Its running tasks per project at most, as configured when it started (the
    # explanation of a waiting task reads it: the claim takes the node's own).
    project_limits: Mapping[str, int] = field(default_factory=dict)
    # How it hands its free slots across projects, as configured when it started
    # (`Limits.fair_share`): None, in queue order; else by these weights, 1 for a
    # project not listed ({}: every project 1). Operators read it (`nodes`, `why`);
    # the claim takes the node's own.
    fair_share: Mapping[str, float] | None = None


@dataclass(frozen=True, slots=True)
class Claim:
    """An attempt a node now owns: run it, and carry `fence` on every write."""

    task: TaskInfo  # as the claim left it: running, under the attempt's fence

    @property
    def fence(self) -> int:
        """The attempt's fencing token (the claimed task's own)."""
        return self.task.fence


class OutcomeKind(enum.StrEnum):
    """How an attempt's run ended, as its runner reports it."""

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
class Limits:
    """Blocking limits the claim rules enforce.

    `max_parallel` is per node; `project_limits` caps running tasks per project
    across every node sharing the store. `fair_share`, if not None, hands free slots
    across projects by the weights it gives (1 for a project not listed; see
    `taskpool._rules.plan_claims`); None hands them in queue order.
    """

    max_parallel: int = 4
    project_limits: Mapping[str, int] = field(default_factory=dict)
    fair_share: Mapping[str, float] | None = None
