"""The commands on tasks: submit, ls, show, logs (and follow), cancel, retry."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from .._errors import InvalidTask
from .._models import DEFAULT_RETRY_MAX_DELAY_S, CancelMode, Status, SubmitResult, TaskSpec
from .._terminal import Neutraliser
from .._validation import ON_CONFLICT_POLICIES
from ._format import (
    emit,
    env_line,
    field,
    limits_text,
    plain,
    schedule_data,
    task_line,
    when,
)
from ._options import (
    choice,
    env_name,
    limit_options,
    non_negative,
    open_client,
    option,
    positive,
)
from ._why import why_line

if TYPE_CHECKING:
    from ._options import Commands


def add_commands(commands: Commands) -> None:
    _add_submit(commands)

    ls = commands.add_parser("ls", help="list tasks, newest first")
    ls.set_defaults(run=cmd_ls)
    statuses = [s.value for s in Status]
    option(
        ls,
        "--status",
        "TASKPOOL_LS_STATUS",
        "only tasks in this status (repeatable)",
        kind="append",
        type=choice(statuses),
        choices=statuses,
    )
    option(ls, "--project", "TASKPOOL_LS_PROJECT", "only tasks of this project")
    option(ls, "--limit", "TASKPOOL_LS_LIMIT", "at most this many", type=positive(int), default=50)

    show = commands.add_parser("show", help="one task and its events")
    show.set_defaults(run=cmd_show)
    show.add_argument("id", type=int, help="the task's id")

    logs = commands.add_parser(
        "logs",
        help="a task's output",
        description="A task's output. Terminal control sequences in it are shown as text"
        " (\\x1b[...), never obeyed; colours are kept when stdout is a terminal; a carriage"
        " return becomes a newline. --raw prints the output exactly as stored.",
    )
    logs.set_defaults(run=cmd_logs)
    logs.add_argument("id", type=int, help="the task's id")
    option(logs, "--follow", "TASKPOOL_LOGS_FOLLOW", "until the task ends", short="-f", kind="flag")
    option(
        logs,
        "--raw",
        "TASKPOOL_LOGS_RAW",
        "the output exactly as stored, control sequences included",
        kind="flag",
    )

    cancel = commands.add_parser("cancel", help="cancel a task")
    cancel.set_defaults(run=cmd_cancel)
    cancel.add_argument("id", type=int, help="the task's id")
    option(cancel, "--force", "TASKPOOL_CANCEL_FORCE", "SIGKILL at once", kind="flag")

    retry = commands.add_parser("retry", help="queue a finished task again, as a new task")
    retry.set_defaults(run=cmd_retry)
    retry.add_argument("id", type=int, help="the finished task's id")


def _add_submit(commands: Commands) -> None:
    submit = commands.add_parser(
        "submit",
        help="queue a task; prints its id",
        description="Queue a task; prints its id. The command follows `--`. Repeatable"
        " options take a comma-separated list in their variable.",
    )
    submit.set_defaults(run=cmd_submit)
    submit.add_argument("argv", nargs=argparse.REMAINDER, help="the command (after --)")

    def var(flag: str) -> str:
        return env_name("submit", flag)

    option(submit, "--project", var("--project"), "the task's project", default="default")
    option(submit, "--template", var("--template"), "its template: one running at a time")
    option(
        submit,
        "--parallel",
        var("--parallel"),
        "the template allows parallel runs",
        kind="flag",
    )
    option(submit, "--lock", var("--lock"), "a named resource lock (repeatable)", kind="append")
    option(submit, "--priority", var("--priority"), "higher runs first", type=int, default=0)
    option(
        submit, "--timeout", var("--timeout-s"), "seconds", type=positive(float), metavar="SECONDS"
    )
    option(
        submit,
        "--stall-timeout",
        var("--stall-timeout-s"),
        "seconds without output",
        metavar="SECONDS",
        type=positive(float),
    )
    option(
        submit,
        "--max-attempts",
        var("--max-attempts"),
        "attempts in all",
        type=positive(int),
        default=1,
    )
    option(
        submit,
        "--backoff",
        var("--backoff-s"),
        "first retry delay, s",
        metavar="SECONDS",
        type=non_negative(float),
        default=1.0,
    )
    option(
        submit,
        "--max-delay",
        var("--retry-max-delay-s"),
        "longest retry delay, s",
        metavar="SECONDS",
        type=non_negative(float),
        default=DEFAULT_RETRY_MAX_DELAY_S,
    )
    option(
        submit,
        "--jitter",
        var("--retry-jitter"),
        "take up to this fraction (0 to 1) off each retry delay, at random",
        metavar="FRACTION",
        type=non_negative(float),
        default=0.0,
    )
    option(
        submit,
        "--retry-on",
        var("--retry-on"),
        "retry only these failures: exited, timed_out, stalled, lost, exit:N"
        " (repeatable; default: all of them)",
        kind="append",
        metavar="OUTCOME",
    )
    option(
        submit,
        "--unique-key",
        var("--unique-key"),
        "a deduplication key: one waiting or running task per key",
        metavar="KEY",
    )
    option(
        submit,
        "--on-conflict",
        var("--on-conflict"),
        "with --unique-key taken: reject (print the holder's id) or replace_waiting",
        choices=ON_CONFLICT_POLICIES,
        default="reject",
    )
    option(
        submit,
        "--after",
        var("--after"),
        "start only after task ID has succeeded; cancelled if it ends otherwise (repeatable)",
        kind="append",
        type=int,
        metavar="ID",
    )
    option(
        submit,
        "--cwd",
        var("--cwd"),
        "working directory; a relative one is resolved here, by the submitter",
        type=absolute_path,
    )
    limit_options(submit, "", var)
    option(
        submit,
        "--env",
        var("--env"),
        "set a variable (stored in the database as given: no secrets; repeatable)",
        kind="append",
        metavar="NAME=VALUE",
    )
    option(
        submit,
        "--pass-env",
        var("--pass-env"),
        "pass the worker's own value of NAME at spawn time; only the name is stored"
        " (for secrets; repeatable)",
        kind="append",
        metavar="NAME",
    )
    option(
        submit,
        "--clean-env",
        var("--clean-env"),
        "start from an empty environment instead of the worker's",
        kind="flag",
    )


def absolute_path(text: str) -> str:
    """The submitter's relative path means its own directory, not the worker's."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return os.path.abspath(text)


#: A submit's fields, as `TaskSpec.build`'s checks name them, and the options that
#: set them: its errors are said in the CLI's terms.
_SUBMIT_FLAGS = {
    "pass_env name": "--pass-env",
    "pass_env": "--pass-env",
    "env value": "--env value",
    "env name": "--env name",
    "env": "--env",
    "lock name": "--lock",
    "locks": "--lock",
    "project": "--project",
    "template": "--template",
    "priority": "--priority",
    "cwd": "--cwd",
    "memory_max": "--memory-max",
    "pids_max": "--pids-max",
    "cpu_max": "--cpu-max",
    "timeout_s": "--timeout",
    "stall_timeout_s": "--stall-timeout",
    "max_attempts": "--max-attempts",
    "retry_backoff_s": "--backoff",
    "retry_max_delay_s": "--max-delay",
    "retry_jitter": "--jitter",
    "retry_on item": "--retry-on",
    "retry_on": "--retry-on",
    "unique_key": "--unique-key",
    "on_conflict": "--on-conflict",
    "after": "--after",
}


def in_cli_terms(message: str) -> str:
    """An `InvalidTask` message that opens with a field's name, opening with its
    option instead (`timeout_s must be ... or None` -> `--timeout must be ...`)."""
    for name, flag in _SUBMIT_FLAGS.items():  # longer names first where one prefixes another
        if message.startswith(name + " "):
            return flag + message[len(name) :].replace(" or None", "")
    return message


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
    try:
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
            retry_max_delay_s=args.max_delay,
            retry_jitter=args.jitter,
            retry_on=args.retry_on or None,
            unique_key=args.unique_key,
            on_conflict=args.on_conflict,
            after=args.after,
        )
    except InvalidTask as exc:
        raise InvalidTask(in_cli_terms(str(exc))) from None
    async with open_client(args, create=True) as client:
        try:
            result = SubmitResult.of(await client.submit_spec(spec))
        except InvalidTask as exc:  # a dependency that does not exist, found by the store
            raise InvalidTask(in_cli_terms(str(exc))) from None
    # The id alone on stdout (what a script captures), whichever task it is; what
    # the key did goes to stderr.
    if not result.created:
        print(f"not submitted: task {result} holds unique key {spec.unique_key!r}", file=sys.stderr)
    elif result.replaced is not None:
        print(f"replaced waiting task {result.replaced} (same unique key)", file=sys.stderr)
    emit(
        args,
        {"id": result.task_id, "created": result.created, "replaced": result.replaced},
        str(result.task_id),
    )


async def cmd_ls(args: argparse.Namespace) -> None:
    statuses = [Status(s) for s in args.status] if args.status else None
    async with open_client(args) as client:
        tasks = await client.list_tasks(statuses=statuses, project=args.project, limit=args.limit)
        scheduled = await client.scheduled_by(t.id for t in tasks)
    data = [
        {**plain(t, show_env=args.show_env), "schedule": schedule_data(scheduled.get(t.id))}
        for t in tasks
    ]
    emit(args, data, "\n".join(task_line(t, scheduled.get(t.id)) for t in tasks) or "no tasks")


async def cmd_show(args: argparse.Namespace) -> None:
    async with open_client(args) as client:
        task = await client.get(args.id)
        events = await client.events(args.id)
        why = await why_line(client, task)
        scheduled = (await client.scheduled_by([task.id])).get(task.id)
    spec = task.spec
    lines = [
        task_line(task, scheduled),
        *why,
        *(
            [f"  schedule: {field(scheduled.schedule)} (tick {when(scheduled.tick)})"]
            if scheduled is not None
            else []
        ),
        f"  command: {field(spec.argv)}  cwd: {field(spec.cwd or '-')}",
        env_line(spec, show=args.show_env),
        f"  attempts: {task.attempts_used}/{spec.max_attempts}  owner: "
        f"{field(task.owner_node or '-')}  pid: {task.pid or '-'}  exit code: "
        + ("-" if task.exit_code is None else str(task.exit_code)),
        f"  limits: {limits_text(spec.limits)}",
        f"  retry: {spec.retry_text()}",
        *(
            [f"  unique key: {field(spec.unique_key)} (on conflict: {spec.on_conflict})"]
            if spec.unique_key is not None
            else []
        ),
        *([f"  after: {', '.join(map(str, spec.after))}"] if spec.after else []),
        "  events:",
        *(
            f"    {when(e.at)}  {e.from_status or '-'} -> {e.to_status}: {field(e.reason)}"
            for e in events
        ),
    ]
    emit(
        args,
        {"task": task, "events": events, "schedule": schedule_data(scheduled)},
        "\n".join(lines),
    )


#: `logs -f` reads again at most this long after seeing nothing new (backing off from
#: 50 ms); the task's end arrives at once on PostgreSQL (LISTEN).
FOLLOW_POLL_S = 0.25


async def cmd_logs(args: argparse.Namespace) -> None:
    out = Neutraliser(keep_sgr=sys.stdout.isatty())

    def write(text: str) -> None:
        sys.stdout.write(text if args.raw else out.feed(text))
        sys.stdout.flush()

    async with open_client(args, poll_interval_s=FOLLOW_POLL_S) as client:
        await client.get(args.id)  # TaskNotFound before anything is printed, -f or not
        try:
            if not args.follow:
                write(await client.output(args.id))
            else:
                async for text in client.follow(args.id):
                    write(text)
        finally:  # also when interrupted: no colour left on in the operator's terminal
            if not args.raw:
                sys.stdout.write(out.flush())
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
