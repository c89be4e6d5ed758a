"""`taskpool schedule add|ls|pause|resume|rm|next`: the store's durable schedules.

The schedules themselves are `Client.add_schedule` and its peers'; every worker on
the store fires them (`taskpool._scheduler`). Here is only how the command line
reads them in and prints them.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from .._schedules import Misfire, Overlap, Schedule
from ._format import emit, field, when
from ._options import open_client

if TYPE_CHECKING:
    from ._options import Commands


def add_commands(commands: Commands) -> None:
    schedule = commands.add_parser("schedule", help="durable schedules (cron or interval)")
    sub = schedule.add_subparsers(dest="schedule_command", required=True, metavar="ACTION")

    add = sub.add_parser("add", help="add a schedule that submits a command")
    add.set_defaults(run=cmd_add)
    # An option, not a positional: the command after it takes the rest of the line.
    add.add_argument("--name", required=True, help="the schedule's unique name")
    when_ = add.add_mutually_exclusive_group(required=True)
    when_.add_argument("--cron", help="a cron expression, e.g. '*/5 * * * *'")
    when_.add_argument("--every", type=float, metavar="SECONDS", help="a fixed interval")
    add.add_argument("--tz", default="UTC", help="the cron expression's time zone (UTC)")
    add.add_argument(
        "--overlap",
        choices=[o.value for o in Overlap],
        default=Overlap.SKIP.value,
        help="what a tick does while the previous run waits or runs (skip)",
    )
    add.add_argument(
        "--misfire",
        choices=[m.value for m in Misfire],
        default=Misfire.RUN_ONCE.value,
        help="what happens to ticks missed while no worker ran (run_once)",
    )
    add.add_argument("--misfire-bound", type=int, default=10, help="run_all's cap (10)")
    add.add_argument("--project", default="default", help="the runs' project")
    add.add_argument("--cwd", default=None, help="the runs' working directory")
    add.add_argument("--timeout", type=float, default=None, help="the runs' timeout (s)")
    add.add_argument("--paused", action="store_true", help="add it paused")
    add.add_argument("argv", nargs=argparse.REMAINDER, help="the command (after --)")

    ls = sub.add_parser("ls", help="list schedules and their next fire time")
    ls.set_defaults(run=cmd_ls)
    for action, helptext, handler in [
        ("pause", "stop firing a schedule", cmd_pause),
        ("resume", "fire a paused schedule again from its next tick", cmd_resume),
        ("rm", "remove a schedule (its runs stay)", cmd_rm),
    ]:
        parser = sub.add_parser(action, help=helptext)
        parser.set_defaults(run=handler)
        parser.add_argument("name")
    nxt = sub.add_parser("next", help="a schedule's next fire times")
    nxt.set_defaults(run=cmd_next)
    nxt.add_argument("name")
    nxt.add_argument("-n", type=int, default=5, help="how many (5)")


def schedule_line(s: Schedule) -> str:
    state = "paused" if s.paused else "active"
    return (
        f"{field(s.name):<16} {state:<7} {s.timing.describe():<28} next {when(s.next_fire_at)}"
        f"  overlap {s.overlap.value}, misfire {s.misfire.value}  {field(s.spec.argv)}"
    )


async def cmd_add(args: argparse.Namespace) -> None:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise ValueError("schedule add needs a command after --")
    options: dict[str, Any] = {"project": args.project, "cwd": args.cwd, "timeout_s": args.timeout}
    async with open_client(args, create=True) as client:
        added = await client.add_schedule(
            args.name,
            argv,
            cron=args.cron,
            tz=args.tz,
            every_s=args.every,
            overlap=args.overlap,
            misfire=args.misfire,
            misfire_bound=args.misfire_bound,
            paused=args.paused,
            **options,
        )
    emit(args, added, schedule_line(added))


async def cmd_ls(args: argparse.Namespace) -> None:
    async with open_client(args) as client:
        schedules = await client.list_schedules()
    emit(args, schedules, "\n".join(schedule_line(s) for s in schedules) or "no schedules")


async def cmd_pause(args: argparse.Namespace) -> None:
    async with open_client(args) as client:
        changed = await client.pause_schedule(args.name)
    emit(args, changed, schedule_line(changed))


async def cmd_resume(args: argparse.Namespace) -> None:
    async with open_client(args) as client:
        changed = await client.resume_schedule(args.name)
    emit(args, changed, schedule_line(changed))


async def cmd_rm(args: argparse.Namespace) -> None:
    async with open_client(args) as client:
        await client.remove_schedule(args.name)
    emit(args, {"removed": args.name}, f"removed schedule {field(args.name)}")


async def cmd_next(args: argparse.Namespace) -> None:
    async with open_client(args) as client:
        fires = await client.next_fires(args.name, args.n)
    emit(args, fires, "\n".join(when(t) for t in fires))
