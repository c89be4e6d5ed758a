"""The operator's command line: a thin layer over the public API.

Every option can also be set by an environment variable, named on its help line
(`TASKPOOL_DB`, `TASKPOOL_MAX_PARALLEL`, ...). Errors print their cause chain and
exit non-zero; so does a worker whose pool crashed, so a supervisor restarts it.

What the CLI prints never holds a password (DSNs, errors and log lines go through
`redact`) nor a task's env values (masked unless `--show-env`). Only `worker` and
`submit` may create a database; every other command opens an existing one, so a
mistyped `--db` is an error, not a new empty file.

This module holds the entry point and the global options; each command lives in the
module of its concern (`_worker`, `_tasks`, `_admin`), which adds its own subparser
and names its handler (`run`); `_format` renders what they print.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio

from .._errors import TaskpoolError
from .._redact import redact
from . import _admin, _tasks, _why, _worker
from ._options import option

#: Exit codes: 1 for an error (a crashed worker included), 2 for bad usage.
EXIT_ERROR = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskpool", description="Run and inspect taskpool tasks.")
    option(
        parser,
        "--db",
        "DB",
        "SQLite file or postgresql:// URL (default: taskpool.db)",
        default="taskpool.db",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument(
        "--show-env",
        action="store_true",
        help="show tasks' env values (masked by default: they may be secrets)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    # In this order in `--help`: the worker, the commands on tasks, the store-wide ones.
    for group in (_worker, _tasks, _why, _admin):
        group.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `taskpool` and `python -m taskpool`; returns the exit code."""
    args = build_parser().parse_args(argv)
    command: Callable[[argparse.Namespace], Awaitable[Any]] = args.run
    try:
        code = anyio.run(command, args)
    except KeyboardInterrupt:
        return 130
    except (TaskpoolError, OSError, ValueError) as exc:
        _print_error(exc)
        return EXIT_ERROR
    return code if isinstance(code, int) else 0  # only the worker returns its own


def _print_error(exc: BaseException) -> None:
    chain = []
    current: BaseException | None = exc
    while current is not None:
        chain.append(f"{type(current).__name__}: {current}")
        current = current.__cause__ or current.__context__
    print(redact("taskpool: error: " + "\n  caused by ".join(chain)), file=sys.stderr)
