"""The commands on tasks: submit, ls, show, logs (and follow), cancel, retry."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from .._models import CancelMode, Status, TaskSpec
from ._format import emit, env_line, limits_text, task_line, when
from ._options import limit_options, open_client
from ._why import why_line

if TYPE_CHECKING:
    from ._options import Commands


def add_commands(commands: Commands) -> None:
    submit = commands.add_parser("submit", help="queue a task; prints its id")
    submit.set_defaults(run=cmd_submit)
    submit.add_argument("argv", nargs=argparse.REMAINDER, help="the command (after --)")
    submit.add_argument("--project", default="default")
    submit.add_argument("--template")
    submit.add_argument("--parallel", action="store_true", help="the template allows parallel runs")
    submit.add_argument("--lock", action="append", default=[], help="a named resource lock")
    submit.add_argument("--priority", type=int, default=0)
    submit.add_argument("--timeout", type=float, help="seconds")
    submit.add_argument("--stall-timeout", type=float, help="seconds without output")
    submit.add_argument("--max-attempts", type=int, default=1)
    submit.add_argument("--backoff", type=float, default=1.0, help="first retry delay, s")
    submit.add_argument("--cwd")
    limit_options(submit, "", env=False)
    submit.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a variable (stored in the database as given: no secrets; repeatable)",
    )
    submit.add_argument(
        "--pass-env",
        action="append",
        default=[],
        metavar="NAME",
        help="pass the worker's own value of NAME at spawn time; only the name is stored"
        " (for secrets; repeatable)",
    )
    submit.add_argument(
        "--clean-env",
        action="store_true",
        help="start from an empty environment instead of the worker's",
    )

    ls = commands.add_parser("ls", help="list tasks, newest first")
    ls.set_defaults(run=cmd_ls)
    ls.add_argument("--status", action="append", choices=[s.value for s in Status])
    ls.add_argument("--project")
    ls.add_argument("--limit", type=int, default=50)

    show = commands.add_parser("show", help="one task and its events")
    show.set_defaults(run=cmd_show)
    show.add_argument("id", type=int)

    logs = commands.add_parser("logs", help="a task's output")
    logs.set_defaults(run=cmd_logs)
    logs.add_argument("id", type=int)
    logs.add_argument("-f", "--follow", action="store_true", help="until the task ends")

    cancel = commands.add_parser("cancel", help="cancel a task")
    cancel.set_defaults(run=cmd_cancel)
    cancel.add_argument("id", type=int)
    cancel.add_argument("--force", action="store_true", help="SIGKILL at once")

    retry = commands.add_parser("retry", help="queue a finished task again, as a new task")
    retry.set_defaults(run=cmd_retry)
    retry.add_argument("id", type=int)


async def cmd_submit(args: argparse.Namespace) -> None:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    # Exactly the variables named: the submitter's own environment (its tokens) is
    # none of the task's business and never reaches the database.
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--env wants NAME=VALUE, got {item!r}")
        env[name] = value
    spec = TaskSpec.build(
        argv,
        cwd=args.cwd,
        env=env or None,
        pass_env=args.pass_env,
        inherit_env=not args.clean_env,
        project=args.project,
        template=args.template,
        template_parallel=args.parallel,
        locks=args.lock,
        priority=args.priority,
        timeout_s=args.timeout,
        stall_timeout_s=args.stall_timeout,
        max_attempts=args.max_attempts,
        retry_backoff_s=args.backoff,
        memory_max=args.memory_max,
        pids_max=args.pids_max,
        cpu_max=args.cpu_max,
    )
    async with open_client(args, create=True) as client:
        task_id = await client.submit_spec(spec)
    emit(args, {"id": task_id}, str(task_id))


async def cmd_ls(args: argparse.Namespace) -> None:
    statuses = [Status(s) for s in args.status] if args.status else None
    async with open_client(args) as client:
        tasks = await client.list_tasks(statuses=statuses, project=args.project, limit=args.limit)
    emit(args, tasks, "\n".join(task_line(t) for t in tasks) or "no tasks")


async def cmd_show(args: argparse.Namespace) -> None:
    async with open_client(args) as client:
        task = await client.get(args.id)
        events = await client.events(args.id)
        why = await why_line(client, task)
    lines = [
        task_line(task),
        *why,
        f"  command: {list(task.spec.argv)}  cwd: {task.spec.cwd or '-'}",
        env_line(task.spec, show=args.show_env),
        f"  attempts: {task.attempts_used}/{task.spec.max_attempts}  owner: "
        f"{task.owner_node or '-'}  pid: {task.pid or '-'}  exit code: {task.exit_code}",
        f"  limits: {limits_text(task.spec.limits)}",
        "  events:",
        *(f"    {when(e.at)}  {e.from_status or '-'} -> {e.to_status}: {e.reason}" for e in events),
    ]
    emit(args, {"task": task, "events": events}, "\n".join(lines))


#: `logs -f` reads again at most this long after seeing nothing new (backing off from
#: 50 ms); the task's end arrives at once on PostgreSQL (LISTEN).
FOLLOW_POLL_S = 0.25


async def cmd_logs(args: argparse.Namespace) -> None:
    async with open_client(args, poll_interval_s=FOLLOW_POLL_S) as client:
        if not args.follow:
            sys.stdout.write(await client.output(args.id))
            sys.stdout.flush()
            return
        await client.get(args.id)  # TaskNotFound before anything is printed
        async for text in client.follow(args.id):
            sys.stdout.write(text)
            sys.stdout.flush()


async def cmd_cancel(args: argparse.Namespace) -> None:
    mode = CancelMode.FORCE if args.force else CancelMode.GRACEFUL
    async with open_client(args) as client:
        task = await client.cancel(args.id, mode)
    text = (
        f"task {task.id}: {task.status.value}"
        if task.status is not Status.RUNNING
        else f"task {task.id}: cancel requested ({task.cancel_requested}); its node stops it"
    )
    emit(args, task, text)


async def cmd_retry(args: argparse.Namespace) -> None:
    async with open_client(args) as client:
        new_id = await client.retry(args.id)
    emit(args, {"id": new_id, "retry_of": args.id}, str(new_id))
