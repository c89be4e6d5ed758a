"""The operator's command line: a thin layer over the public API.

Every option can also be set by an environment variable, named with its default on
its help line (`TASKPOOL_DB`, `TASKPOOL_MAX_PARALLEL`, `TASKPOOL_SUBMIT_PROJECT`, ...);
the global options (`--db`, `--json`, `--show-env`) are accepted before or after the
command. Errors print their cause chain and exit 1 (a missing optional dependency
names the extra that brings it); bad usage exits 2; so does a worker whose pool
crashed exit 1, so a supervisor restarts it. Output cut short by its reader
(`taskpool ls | head -1`) ends the command quietly, exit 0.

What the CLI prints never holds a password (DSNs, errors and log lines go through
`redact`) nor a task's env values (masked unless `--show-env`), and never a terminal
control sequence from a task, a name or an argv (see `taskpool._terminal`). Only
`worker` and `submit` may create a database; every other command opens an existing
one, so a mistyped `--db` is an error, not a new empty file.

This module holds the entry point and the global options; each command lives in the
module of its concern (`_worker`, `_tasks`, `_admin`, `_completion`), which adds its
own subparser and names its handler (`run`); `_format` renders what they print. A new
command module goes in `_COMMAND_MODULES`: it gets the global options, `--help` lines
and shell completion with nothing more.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from importlib import metadata
from typing import Any

import anyio

from .._errors import TaskpoolError
from .._redact import redact
from . import _admin, _completion, _prune, _schedule, _tasks, _web, _why, _worker
from ._options import UsageError, add_global_options

#: Exit codes: 1 for an error (a crashed worker included), 2 for bad usage.
EXIT_ERROR = 1
EXIT_USAGE = 2

#: In this order in `--help`: the worker, the commands on tasks, the store-wide ones,
#: then the shell's.
_COMMAND_MODULES = (_worker, _tasks, _why, _schedule, _admin, _prune, _web, _completion)

#: Optional dependencies, by the module a missing one fails to import: the extra
#: that installs it, and what needs it.
EXTRAS = {
    "asyncpg": ("postgres", "a postgresql:// store"),
    "prometheus_client": ("metrics", "--metrics-port"),
    "starlette": ("web", "taskpool web"),
    "uvicorn": ("web", "taskpool web"),
}

DISTRIBUTION = "taskpool-anyio"


def version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a source tree never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskpool",
        description="Run and inspect taskpool tasks. Options go before or after the"
        " command; each is also an environment variable, named on its help line.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {version()}", help="print the version"
    )
    add_global_options(parser, on_subcommand=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMAND_MODULES:
        module.add_commands(commands)
    for subparser in commands.choices.values():
        add_global_options(subparser, on_subcommand=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `taskpool` and `python -m taskpool`; returns the exit code."""
    args = build_parser().parse_args(argv)
    command: Callable[[argparse.Namespace], Awaitable[Any]] = args.run
    try:
        code = anyio.run(command, args)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        if _broken_pipe(exc):
            return _reader_gone()
        if isinstance(exc, UsageError):  # as argparse says its own
            _print_error(args, str(exc), prefix=f"taskpool {args.command}: error: ")
            return EXIT_USAGE
        missing = _missing_extra(exc)
        if missing is not None:
            _print_error(args, missing)
            return EXIT_ERROR
        if not isinstance(exc, TaskpoolError | OSError | ValueError):
            raise  # a bug: its traceback (as JSON from a `--log-format json` worker)
        _print_error(args, _cause_chain(exc))
        return EXIT_ERROR
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return _reader_gone()
    return code if isinstance(code, int) else 0  # only the worker returns its own


def _errors_in(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, its causes and contexts, and the members of any exception group."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)


def _broken_pipe(exc: BaseException) -> bool:
    return any(isinstance(e, BrokenPipeError) for e in _errors_in(exc))


def _reader_gone() -> int:
    """Our reader went away (`| head -1`): what it did not read is nobody's; exit 0,
    and send whatever is still buffered nowhere instead of failing again at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 0


def _missing_extra(exc: BaseException) -> str | None:
    for error in _errors_in(exc):
        if isinstance(error, ModuleNotFoundError) and error.name in EXTRAS:
            extra, needs = EXTRAS[error.name]
            return (
                f"{needs} needs the `{extra}` extra, which is not installed (no module"
                f" {error.name!r}): install {DISTRIBUTION}[{extra}]"
            )
    return None


def _cause_chain(exc: BaseException) -> str:
    chain = []
    current: BaseException | None = exc
    while current is not None:
        chain.append(f"{type(current).__name__}: {current}")
        context = None if current.__suppress_context__ else current.__context__
        current = current.__cause__ or context
    return "\n  caused by ".join(chain)


def _print_error(args: argparse.Namespace, text: str, *, prefix: str = "taskpool: error: ") -> None:
    if getattr(args, "log_format", "text") == "json":  # the worker's stderr is all JSON
        logging.getLogger("taskpool.cli").error("%s%s", prefix, text)
    else:
        print(redact(prefix + text), file=sys.stderr)
