"""Tasks, statuses and the transitions between them. Pure: no I/O here."""

from __future__ import annotations

import enum
import itertools
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from ._errors import InvalidTask
from ._redact import MASK


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


#: Bounds on what one submit may carry, checked before the store sees it. A task is
#: a command line, not a payload: bulk data belongs in files the task reads. Linux
#: itself refuses more than about 2 MiB of argv and environment together.
MAX_ARGS = 4096  # items in argv
MAX_ARGV_BYTES = 256 * 1024  # argv items' UTF-8 bytes, summed (plus one per item)
MAX_ENV_VARS = 256  # env entries and pass_env names together
MAX_ENV_BYTES = 64 * 1024  # env names and values' UTF-8 bytes, summed
MAX_NAME_BYTES = 256  # one project, template, lock, env or pass_env name
MAX_LOCKS = 32  # named locks of one task
MAX_CWD_BYTES = 4096  # PATH_MAX
#: Integer fields are stored in 32-bit columns (PostgreSQL INTEGER); SQLite's are wider.
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

#: Prefixes of the variables that are taskpool's own: its settings and the attempt
#: marker (TASKPOOL_*), and libpq's connection settings (PG*), through which a worker
#: may hold its database credential. A task never inherits them; `env` may not set
#: TASKPOOL_* and `pass_env` may name neither.
TASKPOOL_ENV_PREFIX = "TASKPOOL_"
LIBPQ_ENV_PREFIX = "PG"


def is_taskpool_variable(name: str) -> bool:
    """True for a variable a task never inherits from its worker (see the prefixes)."""
    return name.startswith((TASKPOOL_ENV_PREFIX, LIBPQ_ENV_PREFIX))


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
#: Bounds of the resource limits a task may ask for.
MIN_MEMORY_MAX = 1024 * 1024  # below 1 MiB no process can even start
MAX_MEMORY_MAX = 2**62
MAX_CPU_MAX = 4096.0


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

    @property
    def limits(self) -> ResourceLimits:
        return ResourceLimits(self.memory_max, self.pids_max, self.cpu_max)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            if f.name != "env"
            else f"env={self.masked_env()!r}"
            for f in fields(self)
        )
        return f"TaskSpec({shown})"

    def masked_env(self) -> dict[str, str] | None:
        """`env` with every value replaced by a mask: what may be shown to anyone."""
        return None if self.env is None else dict.fromkeys(self.env, MASK)

    def checked(self) -> TaskSpec:
        """This spec validated as `build` validates caller input (for a spec made by
        hand): the normalised spec, or `InvalidTask`. Stores call it before writing."""
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
    ) -> TaskSpec:
        """Validate caller input and build a spec, or raise `InvalidTask` saying what is
        wrong. Any value in any field gives one or the other, never another exception;
        sizes are bounded by the `MAX_*` constants of this module."""
        argv_t = _argv(argv)
        cwd_s = _cwd(cwd)
        env_d = _env(env)
        pass_t = _names("pass_env", pass_env, MAX_ENV_VARS)
        for name in pass_t:
            _env_name("pass_env name", name)
            if is_taskpool_variable(name):
                raise InvalidTask(
                    f"pass_env name {name!r} is reserved: taskpool never hands a task its own"
                    f" variables ({TASKPOOL_ENV_PREFIX}*, {LIBPQ_ENV_PREFIX}*)"
                )
            if env_d is not None and name in env_d:
                raise InvalidTask(f"{name!r} is named in both env and pass_env")
        if len(pass_t) + len(env_d or ()) > MAX_ENV_VARS:
            raise InvalidTask(f"env and pass_env name more than MAX_ENV_VARS ({MAX_ENV_VARS})")
        _check_bool("inherit_env", inherit_env)
        _check_text("project", project, "MAX_NAME_BYTES")
        if not project:
            raise InvalidTask("project must not be empty")
        if template is not None:
            _check_text("template", template, "MAX_NAME_BYTES")
            if not template:
                raise InvalidTask("template must not be empty (None for no template)")
        _check_bool("template_parallel", template_parallel)
        locks_t = _names("locks", locks, MAX_LOCKS)
        for lock in locks_t:
            _check_text("lock name", lock, "MAX_NAME_BYTES")
            if not lock:
                raise InvalidTask("lock name must not be empty")
        seconds: dict[str, float | None] = {}
        for name, value in (("timeout_s", timeout_s), ("stall_timeout_s", stall_timeout_s)):
            number = _finite_float(value)
            if value is not None and not (number is not None and number > 0):
                raise InvalidTask(f"{name} must be a positive number of seconds or None")
            seconds[name] = number
        backoff = _finite_float(retry_backoff_s)
        if backoff is None or backoff < 0:
            raise InvalidTask("retry_backoff_s must be a non-negative number of seconds")
        start = _finite_float(not_before)
        if not_before is not None and start is None:
            raise InvalidTask("not_before must be a finite UNIX time")
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise InvalidTask("max_attempts must be an integer >= 1")
        if max_attempts > INT32_MAX:
            raise InvalidTask(f"max_attempts must be at most {INT32_MAX} (a 32-bit column)")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidTask("priority must be an integer")
        if not INT32_MIN <= priority <= INT32_MAX:
            raise InvalidTask(
                f"priority must be an integer from {INT32_MIN} to {INT32_MAX} (a 32-bit column)"
            )
        limits = check_limits(memory_max, pids_max, cpu_max)
        return cls(
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
            timeout_s=seconds["timeout_s"],
            stall_timeout_s=seconds["stall_timeout_s"],
            max_attempts=max_attempts,
            retry_backoff_s=backoff,
            memory_max=limits.memory_max,
            pids_max=limits.pids_max,
            cpu_max=limits.cpu_max,
        )


def _argv(argv: object) -> tuple[str, ...]:
    if isinstance(argv, str | bytes):
        raise InvalidTask("argv must be a list of strings, not a single string (no shell)")
    argv_t = _names("argv", argv, MAX_ARGS)
    if not argv_t:
        raise InvalidTask("argv must not be empty")
    total = 0
    for arg in argv_t:
        total += _check_text("argv item", arg, "MAX_ARGV_BYTES") + 1  # + its NUL in exec
        if total > MAX_ARGV_BYTES:
            raise InvalidTask(f"argv is larger than MAX_ARGV_BYTES ({MAX_ARGV_BYTES} bytes)")
    return argv_t


def _cwd(cwd: object) -> str | None:
    if cwd is None:
        return None
    if not isinstance(cwd, str | os.PathLike):
        raise InvalidTask(f"cwd must be a path string, got {type(cwd).__name__}")
    try:
        cwd_s = os.fspath(cwd)
    except TypeError as exc:  # an __fspath__ that returns neither str nor bytes
        raise InvalidTask(f"cwd must be a path string: {exc}") from None
    _check_text("cwd", cwd_s, "MAX_CWD_BYTES")
    assert isinstance(cwd_s, str)  # _check_text proved it
    return cwd_s


def _env(env: object) -> dict[str, str] | None:
    if env is None:
        return None
    if not isinstance(env, Mapping):
        raise InvalidTask("env must be a mapping of names to values, or None")
    if len(env) > MAX_ENV_VARS:
        raise InvalidTask(f"env has more than MAX_ENV_VARS ({MAX_ENV_VARS}) entries")
    env_d: dict[str, str] = {}
    total = 0
    for key, value in env.items():
        total += _env_name("env name", key)
        if key.startswith(TASKPOOL_ENV_PREFIX):
            raise InvalidTask(
                f"env name {key!r} is reserved: {TASKPOOL_ENV_PREFIX}* variables are taskpool's own"
            )
        # The value may be a secret: errors name the variable, never show the value.
        total += _check_text("env value", value, "MAX_ENV_BYTES", label=f"env value of {key!r}")
        if total > MAX_ENV_BYTES:
            raise InvalidTask(f"env is larger than MAX_ENV_BYTES ({MAX_ENV_BYTES} bytes)")
        env_d[key] = value
    return env_d


def _env_name(what: str, name: object) -> int:
    size = _check_text(what, name, "MAX_NAME_BYTES")
    assert isinstance(name, str)
    if not name or "=" in name:
        raise InvalidTask(f"{what} {name!r} must be non-empty and contain no '='")
    return size


def _names(what: str, values: object, limit: int) -> tuple[Any, ...]:
    """A list-like input as a tuple of at most `limit` items (each checked by the caller)."""
    if isinstance(values, str | bytes):
        raise InvalidTask(f"{what} must be a list of names, not a single string")
    if isinstance(values, Mapping) or not isinstance(values, Iterable):
        raise InvalidTask(f"{what} must be a list of strings, got {type(values).__name__}")
    items = tuple(itertools.islice(values, limit + 1))
    if len(items) > limit:
        raise InvalidTask(f"{what} has more than {_LIMIT_NAMES[what]} ({limit}) items")
    return items


_LIMIT_NAMES = {"argv": "MAX_ARGS", "locks": "MAX_LOCKS", "pass_env": "MAX_ENV_VARS"}


def check_limits(memory_max: object, pids_max: object, cpu_max: object) -> ResourceLimits:
    """Resource limits from caller input, or `InvalidTask` naming the field."""
    if memory_max is not None and (
        isinstance(memory_max, bool)
        or not isinstance(memory_max, int)
        or not MIN_MEMORY_MAX <= memory_max <= MAX_MEMORY_MAX
    ):
        raise InvalidTask(
            f"memory_max must be a number of bytes from {MIN_MEMORY_MAX} to {MAX_MEMORY_MAX}"
            " or None"
        )
    if pids_max is not None and (
        isinstance(pids_max, bool)
        or not isinstance(pids_max, int)
        or not 1 <= pids_max <= INT32_MAX
    ):
        raise InvalidTask(f"pids_max must be an integer from 1 to {INT32_MAX} or None")
    cpus = _finite_float(cpu_max)
    if cpu_max is not None and (cpus is None or not 0.01 <= cpus <= MAX_CPU_MAX):
        raise InvalidTask(f"cpu_max must be a number of CPUs from 0.01 to {MAX_CPU_MAX:g} or None")
    return ResourceLimits(memory_max, pids_max, cpus)


def _finite_float(value: object) -> float | None:
    """A finite int or float as a float, else None; bools are refused (True is not a
    duration), and so is an int too large for a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _check_bool(what: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidTask(f"{what} must be true or false, got {type(value).__name__}")


def _check_text(what: str, value: object, limit: str, *, label: str | None = None) -> int:
    """Check a string field and return its size in UTF-8 bytes; `limit` names the
    module constant that bounds it."""
    max_bytes: int = globals()[limit]
    if not isinstance(value, str):
        raise InvalidTask(f"{what} must be a string, got {type(value).__name__}")
    label = label or f"{what} {_short(value)}"
    if len(value) > max_bytes:  # never fewer bytes than characters: no need to encode it
        raise InvalidTask(f"{what} is longer than {limit} ({max_bytes} bytes)")
    if "\x00" in value:
        raise InvalidTask(f"{label} contains a NUL byte")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate: neither database can store it
        raise InvalidTask(f"{label} is not valid Unicode text (a lone surrogate)") from None
    if size > max_bytes:
        raise InvalidTask(f"{what} is longer than {limit} ({max_bytes} bytes)")
    return size


def _short(value: str) -> str:
    """A repr short enough for an error message."""
    return repr(value) if len(value) <= 60 else repr(value[:57]) + "..."


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
    across every node sharing the store.
    """

    max_parallel: int = 4
    project_limits: Mapping[str, int] = field(default_factory=dict)
