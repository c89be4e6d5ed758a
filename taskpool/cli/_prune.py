"""Retention from the command line: `taskpool prune`, and the worker's `--retention-*`
options (the background pruning of `TaskPool(retention=...)`).

Ages are written as an operator writes them (`7d`, `12h`, `30m`, `90s`, `2w`); every
option is also a `TASKPOOL_*` variable, named with its default on its help line.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._retention import (
    DAY_S,
    DEFAULT_INTERVAL_S,
    DEFAULT_OLDER_THAN_S,
    FINISHED,
    PruneReport,
    Retention,
    parse_age,
)
from ._format import emit
from ._options import open_client

if TYPE_CHECKING:
    from ._options import Commands


def _age(text: str) -> float:
    try:
        return parse_age(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (an integer >= 0)")
    return int(text)


def _statuses(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    finished = sorted(s.value for s in FINISHED)
    for name in names:
        if name not in finished:
            raise argparse.ArgumentTypeError(
                f"not a finished status: {name!r} (one of {', '.join(finished)})"
            )
    return names


def _option(
    parser: argparse.ArgumentParser,
    flag: str,
    variable: str,
    help: str,
    *,
    type: Callable[[str], Any] = str,
    default: Any = None,
    shown: str | None = None,
    **kwargs: Any,
) -> None:
    """An option whose default comes from `variable` when set, both on its help line."""
    from_env = os.environ.get(variable)
    if from_env is not None:
        default = type(from_env)
        shown = f"{from_env} from {variable}"
    else:
        shown = f"{shown or default or 'none'}; env {variable}"
    action = parser.add_argument(
        flag, type=type, default=default, help=f"{help} [default: {shown}]", **kwargs
    )
    action.env_variable = variable  # type: ignore[attr-defined]


def _flag(parser: argparse.ArgumentParser, flag: str, variable: str, help: str) -> None:
    on = os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on")
    action = parser.add_argument(
        flag, action="store_true", default=on, help=f"{help} [default: {on}; env {variable}]"
    )
    action.env_variable = variable  # type: ignore[attr-defined]


def add_commands(commands: Commands) -> None:
    prune = commands.add_parser(
        "prune",
        help="remove finished tasks and output by age or count",
        description="Remove finished tasks (with their attempts, events and output) that"
        " finished longer ago than --older-than, or beyond the --keep-last most recent;"
        " --output-older-than drops only the output of older tasks. Waiting and running"
        " tasks are never touched. Deletes in transactions of 1,000 tasks, so workers"
        " keep claiming meanwhile. An SQLite file created by this version shrinks"
        " afterwards; an older one shrinks once converted by --vacuum. PostgreSQL reuses"
        " the space freed for new rows; its files do not shrink.",
    )
    prune.set_defaults(run=cmd_prune)
    _option(
        prune,
        "--older-than",
        "TASKPOOL_PRUNE_OLDER_THAN",
        "finished this long ago, e.g. 7d",
        type=_age,
        metavar="AGE",
    )
    _option(
        prune,
        "--status",
        "TASKPOOL_PRUNE_STATUS",
        "only tasks of these finished statuses, comma-separated (e.g. failed,lost)",
        type=_statuses,
        shown="every finished status",
        metavar="STATUSES",
    )
    _option(
        prune,
        "--keep-last",
        "TASKPOOL_PRUNE_KEEP_LAST",
        "keep at most N finished tasks, the most recent",
        type=_count,
        metavar="N",
    )
    _option(
        prune,
        "--output-older-than",
        "TASKPOOL_PRUNE_OUTPUT_OLDER_THAN",
        "drop the output (not the task) of tasks finished this long ago",
        type=_age,
        metavar="AGE",
    )
    _flag(prune, "--dry-run", "TASKPOOL_PRUNE_DRY_RUN", "say what would be removed; remove nothing")
    _flag(
        prune,
        "--vacuum",
        "TASKPOOL_PRUNE_VACUUM",
        "then rewrite the database to return free space: SQLite runs a full VACUUM, which"
        " holds the write lock (workers wait) while it rewrites the file, and turns on"
        " incremental vacuum so later prunes shrink the file; PostgreSQL runs VACUUM",
    )


def prune_policy(args: argparse.Namespace) -> Retention | None:
    """The policy `prune`'s options describe; None if they describe none."""
    if args.older_than is None and args.keep_last is None and args.output_older_than is None:
        return None
    return Retention(
        older_than_s=args.older_than,
        keep_last=args.keep_last,
        output_older_than_s=args.output_older_than,
        statuses=args.status or FINISHED,
    )


async def cmd_prune(args: argparse.Namespace) -> None:
    policy = prune_policy(args)
    if policy is None and not args.vacuum:
        raise ValueError(
            "say what to prune: --older-than AGE, --keep-last N or --output-older-than AGE"
            " (or only --vacuum)"
        )
    report = PruneReport(dry_run=args.dry_run)
    lines = []
    vacuumed: int | None = None
    async with open_client(args) as client:
        if policy is not None:
            report = await client.store.prune(policy, dry_run=args.dry_run)
            lines.append(report.describe())
        if args.vacuum and args.dry_run:
            lines.append("would vacuum the database")
        elif args.vacuum:
            vacuumed = await client.store.vacuum()
            shrunk = "" if vacuumed is None else f": the file is {vacuumed} bytes smaller"
            lines.append("vacuumed the database" + shrunk)
    data: dict[str, Any] = {"prune": report if policy is not None else None}
    if args.vacuum:
        data["vacuum"] = {"done": not args.dry_run, "bytes_freed": vacuumed}
    emit(args, data, "\n".join(lines))


# -- the worker's options -------------------------------------------------------


def add_worker_options(worker: argparse.ArgumentParser) -> None:
    """The worker's `--retention-*` options (see `worker_retention`)."""
    _option(
        worker,
        "--retention-days",
        "TASKPOOL_RETENTION_DAYS",
        "prune finished tasks this many days after they finished",
        type=float,
        default=DEFAULT_OLDER_THAN_S / DAY_S,
    )
    _option(
        worker,
        "--retention-keep-last",
        "TASKPOOL_RETENTION_KEEP_LAST",
        "and keep at most N finished tasks",
        type=_count,
    )
    _option(
        worker,
        "--retention-output-days",
        "TASKPOOL_RETENTION_OUTPUT_DAYS",
        "drop the output of tasks finished this many days ago (their rows stay)",
        type=float,
    )
    _option(
        worker,
        "--retention-interval",
        "TASKPOOL_RETENTION_INTERVAL_S",
        "how often to prune, s",
        type=float,
        default=DEFAULT_INTERVAL_S,
    )
    _flag(worker, "--no-retention", "TASKPOOL_NO_RETENTION", "keep every finished task forever")


def worker_retention(args: argparse.Namespace) -> dict[str, Any]:
    """`TaskPool`'s retention arguments from the worker's options."""
    if args.no_retention:
        return {"retention": None}
    if not args.retention_interval > 0:
        raise ValueError("--retention-interval must be > 0 seconds")
    for flag, days in (
        ("--retention-days", args.retention_days),
        ("--retention-output-days", args.retention_output_days),
    ):
        if days is not None and not days >= 0:
            raise ValueError(f"{flag} must be >= 0 days")
    output = args.retention_output_days
    return {
        "retention": Retention(
            older_than_s=args.retention_days * DAY_S,
            keep_last=args.retention_keep_last,
            output_older_than_s=None if output is None else output * DAY_S,
        ),
        "retention_interval_s": args.retention_interval,
    }
