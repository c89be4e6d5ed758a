"""`taskpool worker`: a pool run until its signals stop it, with its logging."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import anyio

from .._models import ResourceLimits
from .._pool import TaskPool
from .._redact import redact
from . import _prune
from ._options import limit_options, option

if TYPE_CHECKING:
    from ._options import Commands


def add_commands(commands: Commands) -> None:
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
    worker.set_defaults(run=cmd_worker)
    option(worker, "--max-parallel", "MAX_PARALLEL", "tasks at once", type=int, default=4)
    worker.add_argument(
        "--project-limit",
        action="append",
        default=[],
        metavar="PROJECT=N",
        help="cap running tasks of a project across nodes (repeatable)",
    )
    option(worker, "--lease-ttl", "LEASE_TTL_S", "lease time to live, s", type=float, default=30)
    option(
        worker,
        "--shutdown-drain",
        "SHUTDOWN_DRAIN_S",
        "drain time at exit, s",
        type=float,
        default=10,
    )
    option(worker, "--kill-grace", "KILL_GRACE_S", "SIGTERM to SIGKILL, s", type=float, default=5)
    option(
        worker,
        "--metrics-port",
        "METRICS_PORT",
        "serve Prometheus metrics on this port (needs prometheus-client)",
        type=int,
    )
    option(
        worker,
        "--log-format",
        "LOG_FORMAT",
        "text, or json: one object per line with the record's fields",
        choices=["text", "json"],
        default="text",
    )
    option(
        worker,
        "--outage-tolerance",
        "STORE_OUTAGE_TOLERANCE_S",
        "store outage ridden out before the worker crashes, s",
        type=float,
        default=30,
    )
    option(
        worker,
        "--containment",
        "CONTAINMENT",
        "auto (a cgroup per task where one can be made, else process groups), cgroup, or"
        " process-group",
        choices=["auto", "cgroup", "process-group"],
        default="auto",
    )
    limit_options(worker, "default for tasks that set none: ", env=True)
    _prune.add_worker_options(worker)


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

        from ..metrics import PrometheusMetrics

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
        **_prune.worker_retention(args),
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
