"""The operator's command line: a thin layer over the public API.

Every option can also be set by an environment variable, named on its help line
(`TASKPOOL_DB`, `TASKPOOL_MAX_PARALLEL`, ...). Errors print their cause chain and
exit non-zero; so does a worker whose pool crashed, so a supervisor restarts it.

What the CLI prints never holds a password (DSNs, errors and log lines go through
`redact`) nor a task's env values (masked unless `--show-env`). Only `worker` and
`submit` may create a database; every other command opens an existing one, so a
mistyped `--db` is an error, not a new empty file.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import anyio

from ._client import Client
from ._errors import TaskpoolError
from ._models import CancelMode, ResourceLimits, Status, TaskInfo, TaskSpec
from ._pool import TaskPool
from ._redact import redact

#: Exit codes: 1 for an error (a crashed worker included), 2 for bad usage.
EXIT_ERROR = 1


def _client(args: argparse.Namespace, *, create: bool = False, **options: Any) -> Client:
    """A client of the store `--db` names; only with `create` may it make a new database."""
    return Client(args.db, create=create, **options)


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"TASKPOOL_{name}", default)


def _option(parser: argparse.ArgumentParser, flag: str, env: str, help: str, **kwargs: Any) -> None:
    """An option whose default comes from TASKPOOL_<env> when that is set."""
    default = _env(env)
    if default is not None:
        kwargs["default"] = kwargs.get("type", str)(default)
    parser.add_argument(flag, help=f"{help} [env TASKPOOL_{env}]", **kwargs)


_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """Bytes from `512M`, `1G`, `1.5GiB`, `1048576` (binary units)."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _SIZE_UNITS else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 2G)") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 2G)")
    return int(number * _SIZE_UNITS[unit])


def _limit_options(parser: argparse.ArgumentParser, prefix: str, *, env: bool) -> None:
    """--memory-max, --pids-max, --cpu-max (for the worker also as TASKPOOL_* variables)."""
    specs: list[tuple[str, str, str, Callable[[str], Any]]] = [
        ("--memory-max", "MEMORY_MAX", "memory, e.g. 512M: OOM-killed past it", parse_size),
        ("--pids-max", "PIDS_MAX", "processes at once: forks past it fail", int),
        ("--cpu-max", "CPU_MAX", "CPUs, e.g. 0.5", float),
    ]
    for flag, name, text, kind in specs:
        if env:
            _option(parser, flag, name, prefix + text, type=kind)
        else:
            parser.add_argument(flag, type=kind, help=prefix + text)


def _limits_text(limits: ResourceLimits) -> str:
    parts = []
    if limits.memory_max is not None:
        parts.append(f"memory {limits.memory_max / 2**20:g} MiB")
    if limits.pids_max is not None:
        parts.append(f"{limits.pids_max} processes")
    if limits.cpu_max is not None:
        parts.append(f"{limits.cpu_max:g} CPUs")
    return ", ".join(parts) or "none (the worker's defaults apply)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskpool", description="Run and inspect taskpool tasks.")
    _option(
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

    worker = commands.add_parser(
        "worker",
        help="run a pool until SIGINT/SIGTERM",
        description="Run a pool until SIGINT or SIGTERM. The first signal stops it in order:"
        " no new claims, running tasks get --shutdown-drain s to finish, then SIGTERM,"
        " --kill-grace s, SIGKILL to each task's process group, and every unfinished task"
        " goes back to waiting without using an attempt; exit status 0. A second signal"
        " hurries that stop (no drain, no grace: SIGKILL at once, tasks still handed back)"
        " and the exit status is 128 + its number: 130 for SIGINT, 143 for SIGTERM. Later"
        " signals change nothing. A crashed pool (a store error, an outage past"
        " --outage-tolerance, an SQLite file deleted or replaced under it) exits 1.",
    )
    _option(worker, "--max-parallel", "MAX_PARALLEL", "tasks at once", type=int, default=4)
    worker.add_argument(
        "--project-limit",
        action="append",
        default=[],
        metavar="PROJECT=N",
        help="cap running tasks of a project across nodes (repeatable)",
    )
    _option(worker, "--lease-ttl", "LEASE_TTL_S", "lease time to live, s", type=float, default=30)
    _option(
        worker,
        "--shutdown-drain",
        "SHUTDOWN_DRAIN_S",
        "drain time at exit, s",
        type=float,
        default=10,
    )
    _option(worker, "--kill-grace", "KILL_GRACE_S", "SIGTERM to SIGKILL, s", type=float, default=5)
    _option(
        worker,
        "--metrics-port",
        "METRICS_PORT",
        "serve Prometheus metrics on this port (needs prometheus-client)",
        type=int,
    )
    _option(
        worker,
        "--log-format",
        "LOG_FORMAT",
        "text, or json: one object per line with the record's fields",
        choices=["text", "json"],
        default="text",
    )
    _option(
        worker,
        "--outage-tolerance",
        "STORE_OUTAGE_TOLERANCE_S",
        "store outage ridden out before the worker crashes, s",
        type=float,
        default=30,
    )
    _option(
        worker,
        "--containment",
        "CONTAINMENT",
        "auto (a cgroup per task where one can be made, else process groups), cgroup, or"
        " process-group",
        choices=["auto", "cgroup", "process-group"],
        default="auto",
    )
    _limit_options(worker, "default for tasks that set none: ", env=True)

    submit = commands.add_parser("submit", help="queue a task; prints its id")
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
    _limit_options(submit, "", env=False)
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
    ls.add_argument("--status", action="append", choices=[s.value for s in Status])
    ls.add_argument("--project")
    ls.add_argument("--limit", type=int, default=50)

    show = commands.add_parser("show", help="one task and its events")
    show.add_argument("id", type=int)

    logs = commands.add_parser("logs", help="a task's output")
    logs.add_argument("id", type=int)
    logs.add_argument("-f", "--follow", action="store_true", help="until the task ends")

    cancel = commands.add_parser("cancel", help="cancel a task")
    cancel.add_argument("id", type=int)
    cancel.add_argument("--force", action="store_true", help="SIGKILL at once")

    retry = commands.add_parser("retry", help="queue a finished task again, as a new task")
    retry.add_argument("id", type=int)

    commands.add_parser("nodes", help="pools that have registered, newest last")

    stale = commands.add_parser("stale", help="what looks stuck: expired leases, silent nodes")
    stale.add_argument(
        "--older-than", type=float, default=60.0, help="heartbeat age that counts as silent, s"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `taskpool` and `python -m taskpool`; returns the exit code."""
    args = build_parser().parse_args(argv)
    command: Callable[[argparse.Namespace], Any] = COMMANDS[args.command]
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


# -- output ------------------------------------------------------------------


def _plain(value: Any, *, show_env: bool = False) -> Any:
    """JSON-ready data; a task's env values are masked unless `show_env`."""
    if isinstance(value, TaskSpec) and not show_env:
        value = dataclasses.replace(value, env=value.masked_env())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name), show_env=show_env)
            for f in dataclasses.fields(value)
        }
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {k: _plain(v, show_env=show_env) for k, v in value.items()}
    if isinstance(value, list | tuple | frozenset | set):
        items = [_plain(v, show_env=show_env) for v in value]
        return sorted(items) if isinstance(value, frozenset | set) else items
    return value


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(_plain(data, show_env=args.show_env), indent=2) if args.json else text)


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _env_line(spec: TaskSpec, *, show: bool) -> str:
    env = (spec.env if show else spec.masked_env()) or {}
    shown = " ".join(f"{k}={v}" for k, v in sorted(env.items())) or "-"
    passed = " ".join(sorted(spec.pass_env)) or "-"
    base = "the worker's" if spec.inherit_env else "empty"
    return f"  env: {shown}  pass-env: {passed}  (from {base} environment)"


def _task_line(t: TaskInfo) -> str:
    command = " ".join(t.spec.argv)
    if len(command) > 50:
        command = command[:47] + "..."
    return f"{t.id:>6}  {t.status.value:<10} {t.spec.project:<12} {command}  ({t.reason})"


# -- commands ----------------------------------------------------------------


class _WorkerStop:
    """What the worker's signals asked for: the first an orderly stop, a later one to
    hurry it (the pool's shutdown without drain or grace; never without the shutdown)."""

    def __init__(self) -> None:
        self.requested = anyio.Event()
        self.hurried_by: int | None = None  # the signal that hurried the stop

    def on_signal(self, signum: int) -> str:
        """Record a signal; say what it does: 'stop', 'hurry', or 'again' (nothing new)."""
        if not self.requested.is_set():
            self.requested.set()
            return "stop"
        if self.hurried_by is None:
            self.hurried_by = signum
            return "hurry"
        return "again"

    @property
    def exit_code(self) -> int:
        """0 after an orderly stop; 128 + the hurrying signal's number after a hurried
        one, as a shell reports a process that signal ended (130 SIGINT, 143 SIGTERM)."""
        return 0 if self.hurried_by is None else 128 + self.hurried_by


async def _watch_signals(
    signals: AsyncIterator[int], stop: _WorkerStop, pool: TaskPool, drain_s: float
) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        action = stop.on_signal(signum)
        if action == "stop":
            text = (
                f"{name}, shutting down: running tasks get {drain_s:g} s to finish"
                " (signal again to stop them at once)"
            )
        elif action == "hurry":
            text = f"{name} again, stopping at once: SIGKILL to every task, handed back"
            pool.hurry_shutdown()
        else:
            text = f"{name}: already stopping at once"
        print(f"taskpool worker: {text}", file=sys.stderr, flush=True)


async def cmd_worker(args: argparse.Namespace) -> int:
    limits = {}
    for item in args.project_limit:
        project, _, n = item.partition("=")
        if not project or not n.isdigit():
            raise ValueError(f"--project-limit wants PROJECT=N, got {item!r}")
        limits[project] = int(n)
    _configure_logging(args.log_format)
    metrics = None
    if args.metrics_port is not None:
        import prometheus_client

        from .metrics import PrometheusMetrics

        metrics = PrometheusMetrics()
        prometheus_client.start_http_server(args.metrics_port, addr="127.0.0.1")
    pool = TaskPool(
        args.db,  # the pool opens it, sized for its tasks, and closes it
        metrics=metrics,
        max_parallel=args.max_parallel,
        project_limits=limits,
        lease_ttl_s=args.lease_ttl,
        shutdown_drain_s=args.shutdown_drain,
        kill_grace_s=args.kill_grace,
        store_outage_tolerance_s=args.outage_tolerance,
        containment=args.containment,
        default_limits=ResourceLimits(args.memory_max, args.pids_max, args.cpu_max),
    )
    stop = _WorkerStop()
    failure: Exception | None = None
    # The signals are ours from before the pool starts until its store is closed: a
    # signal at any moment in between asks for (or hurries) an orderly stop. Left to
    # their default action, a second one would end the worker with its tasks' processes
    # alive and the tasks still `running`.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_signals, signals, stop, pool, args.shutdown_drain)
            try:
                async with pool:
                    print(
                        f"taskpool worker: node {pool.node_id} on {redact(args.db)}",
                        file=sys.stderr,
                        flush=True,
                    )
                    await stop.requested.wait()
            except Exception as exc:  # raised below, outside the group (not as a group)
                failure = exc
            tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return stop.exit_code


class RedactingFormatter(logging.Formatter):
    """The standard text format, with passwords redacted from the whole line."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, message and the pool's own fields,
    passwords redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(self._format(record))

    def _format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "taskpool", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _configure_logging(log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("taskpool")
    root.addHandler(handler)
    root.setLevel(logging.INFO)


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
    async with _client(args, create=True) as client:
        task_id = await client.submit_spec(spec)
    _emit(args, {"id": task_id}, str(task_id))


async def cmd_ls(args: argparse.Namespace) -> None:
    statuses = [Status(s) for s in args.status] if args.status else None
    async with _client(args) as client:
        tasks = await client.list_tasks(statuses=statuses, project=args.project, limit=args.limit)
    _emit(args, tasks, "\n".join(_task_line(t) for t in tasks) or "no tasks")


async def cmd_show(args: argparse.Namespace) -> None:
    async with _client(args) as client:
        task = await client.get(args.id)
        events = await client.events(args.id)
    lines = [
        _task_line(task),
        f"  command: {list(task.spec.argv)}  cwd: {task.spec.cwd or '-'}",
        _env_line(task.spec, show=args.show_env),
        f"  attempts: {task.attempts_used}/{task.spec.max_attempts}  owner: "
        f"{task.owner_node or '-'}  pid: {task.pid or '-'}  exit code: {task.exit_code}",
        f"  limits: {_limits_text(task.spec.limits)}",
        "  events:",
        *(
            f"    {_when(e.at)}  {e.from_status or '-'} -> {e.to_status}: {e.reason}"
            for e in events
        ),
    ]
    _emit(args, {"task": task, "events": events}, "\n".join(lines))


#: `logs -f` reads again at most this long after seeing nothing new (backing off from
#: 50 ms); the task's end arrives at once on PostgreSQL (LISTEN).
FOLLOW_POLL_S = 0.25


async def cmd_logs(args: argparse.Namespace) -> None:
    async with _client(args, poll_interval_s=FOLLOW_POLL_S) as client:
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
    async with _client(args) as client:
        task = await client.cancel(args.id, mode)
    text = (
        f"task {task.id}: {task.status.value}"
        if task.status is not Status.RUNNING
        else f"task {task.id}: cancel requested ({task.cancel_requested}); its node stops it"
    )
    _emit(args, task, text)


async def cmd_retry(args: argparse.Namespace) -> None:
    async with _client(args) as client:
        new_id = await client.retry(args.id)
    _emit(args, {"id": new_id, "retry_of": args.id}, str(new_id))


async def cmd_nodes(args: argparse.Namespace) -> None:
    async with _client(args) as client:
        nodes = await client.nodes()
    now = time.time()
    lines = [
        f"{n.id}  {n.host}:{n.pid}  max {n.max_parallel}  "
        + (
            f"stopped {_when(n.stopped_at)}"
            if n.stopped_at is not None
            else f"heartbeat {now - n.heartbeat_at:.0f} s ago"
        )
        + f"\n    containment: {n.containment or 'unknown'}"
        for n in nodes
    ]
    _emit(args, nodes, "\n".join(lines) or "no nodes")


async def cmd_stale(args: argparse.Namespace) -> None:
    async with _client(args) as client:
        report = await client.stale(older_than_s=args.older_than)
    now = report.at
    lines = [
        f"task {t.id}: lease expired {now - (t.lease_expires_at or now):.0f} s ago, owner "
        f"{t.owner_node}"
        for t in report.expired_leases
    ]
    lines += [
        f"node {n.id} ({n.host}:{n.pid}): no heartbeat for {now - n.heartbeat_at:.0f} s"
        for n in report.silent_nodes
    ]
    _emit(
        args,
        {"expired_leases": report.expired_leases, "silent_nodes": report.silent_nodes},
        "\n".join(lines) or "nothing stale",
    )


COMMANDS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "worker": cmd_worker,
    "submit": cmd_submit,
    "ls": cmd_ls,
    "show": cmd_show,
    "logs": cmd_logs,
    "cancel": cmd_cancel,
    "retry": cmd_retry,
    "nodes": cmd_nodes,
    "stale": cmd_stale,
}
