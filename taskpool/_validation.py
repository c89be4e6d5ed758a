"""What a submit may carry: the bounds on a task's fields and the checks of caller
input that `TaskSpec.build` runs, in order, before any store sees it. Pure.

Every check takes any value and either returns it normalised or raises `InvalidTask`
naming the field or the bound, never another exception. The dataclasses these
values go into are in `_models`, which re-exports the bounds."""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

from ._errors import InvalidTask

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
MAX_AFTER = 100  # distinct dependencies of one task (`after`)
MAX_AFTER_ITEMS = 10 * MAX_AFTER  # items of `after`, duplicates included
#: Integer fields are stored in 32-bit columns (PostgreSQL INTEGER); SQLite's are wider.
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
#: Task ids are 64-bit (PostgreSQL BIGSERIAL, SQLite INTEGER).
INT64_MAX = 2**63 - 1
#: Bounds of the resource limits a task may ask for.
MIN_MEMORY_MAX = 1024 * 1024  # below 1 MiB no process can even start
MAX_MEMORY_MAX = 2**62
MAX_CPU_MAX = 4096.0

#: Prefixes of the variables that are taskpool's own: its settings and the attempt
#: marker (TASKPOOL_*), and libpq's connection settings (PG*), through which a worker
#: may hold its database credential. A task never inherits them; `env` may not set
#: TASKPOOL_* and `pass_env` may name neither.
TASKPOOL_ENV_PREFIX = "TASKPOOL_"
LIBPQ_ENV_PREFIX = "PG"


def is_taskpool_variable(name: str) -> bool:
    """True for a variable a task never inherits from its worker (see the prefixes)."""
    return name.startswith((TASKPOOL_ENV_PREFIX, LIBPQ_ENV_PREFIX))


def check_argv(argv: object) -> tuple[str, ...]:
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


def check_cwd(cwd: object) -> str | None:
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


def check_env(env: object) -> dict[str, str] | None:
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


def check_pass_env(pass_env: object, env_d: Mapping[str, str] | None) -> tuple[str, ...]:
    """The names of `pass_env`, given `env` as `check_env` returned it."""
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
    return pass_t


def check_name(what: str, value: object, *, empty_hint: str = "") -> None:
    """A project, template or lock name: text of at most MAX_NAME_BYTES, not empty."""
    _check_text(what, value, "MAX_NAME_BYTES")
    if not value:
        raise InvalidTask(f"{what} must not be empty{empty_hint}")


def check_locks(locks: object) -> tuple[str, ...]:
    locks_t = _names("locks", locks, MAX_LOCKS)
    for lock in locks_t:
        check_name("lock name", lock)
    return locks_t


def check_timeout(what: str, value: object) -> float | None:
    number = _finite_float(value)
    if value is not None and not (number is not None and number > 0):
        raise InvalidTask(f"{what} must be a positive number of seconds or None")
    return number


def check_backoff(retry_backoff_s: object) -> float:
    backoff = _finite_float(retry_backoff_s)
    if backoff is None or backoff < 0:
        raise InvalidTask("retry_backoff_s must be a non-negative number of seconds")
    return backoff


#: The longest a retry waits unless the task says otherwise (`retry_max_delay_s`).
DEFAULT_RETRY_MAX_DELAY_S = 3600.0
#: What `retry_on` may name: an outcome that retries today (`exited`: any failed exit,
#: a signal included), or one exit code (`exit:N`; negative: killed by signal N).
RETRY_ON_OUTCOMES = ("exited", "lost", "stalled", "timed_out")
RETRY_ON_EXIT_PREFIX = "exit:"
MAX_RETRY_ON = 64  # entries of one task's retry_on
#: `on_conflict` policies of a task with a `unique_key`.
ON_CONFLICT_POLICIES = ("reject", "replace_waiting")


def check_max_delay(retry_max_delay_s: object) -> float:
    delay = _finite_float(retry_max_delay_s)
    if delay is None or delay < 0:
        raise InvalidTask("retry_max_delay_s must be a non-negative number of seconds")
    return delay


def check_jitter(retry_jitter: object) -> float:
    jitter = _finite_float(retry_jitter)
    if jitter is None or not 0 <= jitter <= 1:
        raise InvalidTask("retry_jitter must be a fraction from 0 to 1")
    return jitter


def check_retry_on(retry_on: object) -> frozenset[str] | None:
    """None (retry every failure that retries by default), or a set of outcomes and
    `exit:N` codes; `exit:N` is normalised (`exit:+03` is `exit:3`)."""
    if retry_on is None:
        return None
    items = _names("retry_on", retry_on, MAX_RETRY_ON)
    chosen: set[str] = set()
    for item in items:
        _check_text("retry_on item", item, "MAX_NAME_BYTES")
        if item in RETRY_ON_OUTCOMES:
            chosen.add(item)
            continue
        code = item[len(RETRY_ON_EXIT_PREFIX) :] if item.startswith(RETRY_ON_EXIT_PREFIX) else ""
        try:
            number = int(code)
        except ValueError:
            number = None
        if number is None or not INT32_MIN <= number <= INT32_MAX or number == 0:
            raise InvalidTask(
                f"retry_on item {_short(item)} must be one of "
                f"{', '.join(RETRY_ON_OUTCOMES)} or exit:N (N a non-zero exit code)"
            )
        chosen.add(f"{RETRY_ON_EXIT_PREFIX}{number}")
    return frozenset(chosen)


def check_unique_key(unique_key: object, on_conflict: object) -> None:
    if unique_key is not None:
        check_name("unique_key", unique_key, empty_hint=" (None for no key)")
    if on_conflict not in ON_CONFLICT_POLICIES or not isinstance(on_conflict, str):
        raise InvalidTask(f"on_conflict must be one of {', '.join(ON_CONFLICT_POLICIES)}")


def check_batch_keys(keys: Iterable[str | None]) -> None:
    """One batch may not carry a unique key twice: which of the two would win is
    not the caller's to leave to the store."""
    seen: set[str] = set()
    for key in keys:
        if key is None:
            continue
        if key in seen:
            raise InvalidTask(f"unique_key {_short(key)} appears twice in one batch")
        seen.add(key)


def check_after(after: object) -> tuple[int, ...]:
    """The ids of the tasks a task runs after: ascending, each once, at most
    MAX_AFTER. Whether they exist is the store's to check, in the submit's own
    transaction."""
    if isinstance(after, str | bytes | Mapping) or not isinstance(after, Iterable):
        raise InvalidTask(f"after must be a list of task ids, got {type(after).__name__}")
    if not after and isinstance(after, tuple | list):
        return ()  # the hot path of submit_many: most tasks depend on nothing
    items = tuple(itertools.islice(after, MAX_AFTER_ITEMS + 1))
    if len(items) > MAX_AFTER_ITEMS:
        raise InvalidTask(f"after has more than {MAX_AFTER_ITEMS} items")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= INT64_MAX:
            raise InvalidTask(f"after must be a list of task ids (positive integers), got {item!r}")
    ids = tuple(sorted(set(items)))
    if len(ids) > MAX_AFTER:
        raise InvalidTask(f"after names more than MAX_AFTER ({MAX_AFTER}) tasks")
    return ids


def check_not_before(not_before: object) -> float | None:
    start = _finite_float(not_before)
    if not_before is not None and start is None:
        raise InvalidTask("not_before must be a finite UNIX time")
    return start


def check_max_attempts(max_attempts: object) -> None:
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise InvalidTask("max_attempts must be an integer >= 1")
    if max_attempts > INT32_MAX:
        raise InvalidTask(f"max_attempts must be at most {INT32_MAX} (a 32-bit column)")


def check_priority(priority: object) -> None:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidTask("priority must be an integer")
    if not INT32_MIN <= priority <= INT32_MAX:
        raise InvalidTask(
            f"priority must be an integer from {INT32_MIN} to {INT32_MAX} (a 32-bit column)"
        )


def check_limits(
    memory_max: object, pids_max: object, cpu_max: object
) -> tuple[int | None, int | None, float | None]:
    """Resource limits from caller input (memory, pids, CPUs), or `InvalidTask` naming
    the field."""
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
    return memory_max, pids_max, cpus


def check_bool(what: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidTask(f"{what} must be true or false, got {type(value).__name__}")


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


_LIMIT_NAMES = {
    "argv": "MAX_ARGS",
    "locks": "MAX_LOCKS",
    "pass_env": "MAX_ENV_VARS",
    "retry_on": "MAX_RETRY_ON",
}


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
