"""`taskpool worker`: a pool run until its signals stop it, with its logging."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
import types
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import anyio

from .._models import ResourceLimits
from .._pool import TaskPool
from .._redact import redact
from . import _prune
from ._options import (
    UsageError,
    choice,
    env_name,
    limit_options,
    non_negative,
    option,
    positive,
)

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
    option(
        worker,
        "--max-parallel",
        "TASKPOOL_MAX_PARALLEL",
        "tasks at once",
        type=positive(int),
        default=4,
    )
    option(
        worker,
        "--project-limit",
        "TASKPOOL_PROJECT_LIMIT",
        "cap running tasks of a project across nodes (repeatable)",
        kind="append",
        type=project_limit,
        metavar="PROJECT=N",
    )
    option(
        worker,
        "--fair-share",
        "TASKPOOL_FAIR_SHARE",
        "hand free slots across projects, to the one running fewest per weight, instead"
        " of in queue order",
        kind="flag",
    )
    option(
        worker,
        "--fair-share-weight",
        "TASKPOOL_FAIR_SHARE_WEIGHT",
        "a project's weight in fair sharing, a number above 0 (others weigh 1; repeatable;"
        " implies --fair-share)",
        kind="append",
        type=fair_share_weight,
        metavar="PROJECT=WEIGHT",
    )
    option(
        worker,
        "--lease-ttl",
        "TASKPOOL_LEASE_TTL_S",
        "lease time to live, s",
        metavar="SECONDS",
        type=positive(float),
        default=30.0,
    )
    option(
        worker,
        "--heartbeat-interval",
        "TASKPOOL_HEARTBEAT_INTERVAL_S",
        "lease renewal and heartbeat every this many s (none: a third of --lease-ttl)",
        metavar="SECONDS",
        type=positive(float),
    )
    option(
        worker,
        "--reaper-interval",
        "TASKPOOL_REAPER_INTERVAL_S",
        "look for expired leases of other nodes every this many s",
        metavar="SECONDS",
        type=positive(float),
        default=5.0,
    )
    option(
        worker,
        "--shutdown-drain",
        "TASKPOOL_SHUTDOWN_DRAIN_S",
        "drain time at exit, s",
        metavar="SECONDS",
        type=non_negative(float),
        default=10.0,
    )
    option(
        worker,
        "--kill-grace",
        "TASKPOOL_KILL_GRACE_S",
        "SIGTERM to SIGKILL, s",
        metavar="SECONDS",
        type=non_negative(float),
        default=5.0,
    )
    option(
        worker,
        "--outage-tolerance",
        "TASKPOOL_STORE_OUTAGE_TOLERANCE_S",
        "store outage ridden out before the worker crashes, s",
        metavar="SECONDS",
        type=non_negative(float),
        default=30.0,
    )
    option(
        worker,
        "--metrics-port",
        "TASKPOOL_METRICS_PORT",
        "serve Prometheus metrics on this port (the `metrics` extra)",
        type=port,
    )
    option(
        worker,
        "--metrics-host",
        "TASKPOOL_METRICS_HOST",
        "the address --metrics-port listens on (0.0.0.0: every interface)",
        default="127.0.0.1",
    )
    option(
        worker,
        "--log-format",
        "TASKPOOL_LOG_FORMAT",
        "text, or json: every line on stderr one object with the record's fields",
        type=choice(LOG_FORMATS),
        choices=LOG_FORMATS,
        default="text",
    )
    containments = ["auto", "cgroup", "process-group"]
    option(
        worker,
        "--containment",
        "TASKPOOL_CONTAINMENT",
        "auto (a cgroup per task where one can be made, else process groups), cgroup, or"
        " process-group",
        type=choice(containments),
        choices=containments,
        default="auto",
    )
    limit_options(worker, "default for tasks that set none: ", lambda flag: env_name(None, flag))
    _prune.add_worker_options(worker)


LOG_FORMATS = ["text", "json"]


def project_limit(text: str) -> tuple[str, int]:
    """`PROJECT=N`: a project's cap."""
    project, _, n = text.partition("=")
    if not project or not n.isdigit():
        raise argparse.ArgumentTypeError(f"wants PROJECT=N, got {text!r}")
    return project, int(n)


def fair_share_weight(text: str) -> tuple[str, float]:
    """`PROJECT=WEIGHT`: a project's weight in fair sharing, a finite number above 0."""
    project, _, weight = text.partition("=")
    try:
        value = float(weight)
    except ValueError:
        value = math.nan
    if not project or not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f"wants PROJECT=WEIGHT with a weight above 0 (e.g. batch=3), got {text!r}"
        )
    return project, value


def fair_share(args: argparse.Namespace) -> bool | dict[str, float] | None:
    """The pool's `fair_share` from --fair-share and --fair-share-weight."""
    if args.fair_share_weight:
        return dict(args.fair_share_weight)
    return True if args.fair_share else None


def port(text: str) -> int:
    number = int(text)
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}")
    return number


def lease_problems(*, lease_ttl: float, heartbeat_interval: float | None) -> list[str]:
    """Why these lease settings cannot work, in the flags' terms (empty if they can).

    An attempt whose lease was not renewed is stopped `self_fence_margin_s` before
    it runs out (see `TaskPool`); a renewal that comes later than that stops every
    attempt at each renewal. The pool's own check (heartbeat < lease) lets that pass."""
    margin = max(0.5, lease_ttl / 10)  # TaskPool.self_fence_margin_s
    heartbeat = heartbeat_interval if heartbeat_interval is not None else lease_ttl / 3
    if heartbeat < lease_ttl - margin:
        return []
    why = (
        f"a lease must be renewed sooner than --lease-ttl minus its {margin:g} s self-fence"
        f" margin ({lease_ttl - margin:g} s), or every running task is stopped before its"
        " renewal"
    )
    if heartbeat_interval is None:
        return [
            f"--lease-ttl {lease_ttl:g} s is too short: renewed every {heartbeat:.3g} s (a"
            f" third of it, without --heartbeat-interval), {why}"
        ]
    return [
        f"--heartbeat-interval {heartbeat:g} s is too long for --lease-ttl {lease_ttl:g} s: {why}"
    ]


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
        say(text, event="signal", signal=name)


async def cmd_worker(args: argparse.Namespace) -> int:
    _configure_logging(args.log_format)
    problems = lease_problems(lease_ttl=args.lease_ttl, heartbeat_interval=args.heartbeat_interval)
    if problems:
        raise UsageError("; ".join(problems))
    metrics = None
    if args.metrics_port is not None:
        import prometheus_client

        from ..metrics import PrometheusMetrics

        metrics = PrometheusMetrics()
        prometheus_client.start_http_server(args.metrics_port, addr=args.metrics_host)
    pool = TaskPool(
        args.db,  # the pool opens it, sized for its tasks, and closes it
        metrics=metrics,
        max_parallel=args.max_parallel,
        project_limits=dict(args.project_limit),
        fair_share=fair_share(args),
        lease_ttl_s=args.lease_ttl,
        heartbeat_interval_s=args.heartbeat_interval,
        reaper_interval_s=args.reaper_interval,
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
                    say(
                        f"node {pool.node_id} on {redact(args.db)}",
                        event="worker_ready",
                        node_id=pool.node_id,
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


#: The worker's own lines (its start, the signals it got): plain `taskpool worker: ...`
#: lines in text mode, records like any other in JSON mode.
_log = logging.getLogger("taskpool.worker")


def say(text: str, **fields: object) -> None:
    """One line of the worker's own on stderr, in the format `--log-format` chose."""
    if _json_logging:
        _log.info("taskpool worker: %s", text, extra={"taskpool": fields})
    else:
        print(f"taskpool worker: {text}", file=sys.stderr, flush=True)


_json_logging = False


def _configure_logging(log_format: str) -> None:
    """Every logger through one handler on stderr, in `log_format`: taskpool's own
    records from INFO, everybody else's (asyncpg's, asyncio's) from WARNING, Python
    warnings, and in JSON mode uncaught exceptions too (in any thread, or ignored in
    a destructor), so that no line on stderr is anything but JSON. The guard process
    learns the format from TASKPOOL_LOG_FORMAT, which tasks never inherit."""
    global _json_logging
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("taskpool").setLevel(logging.INFO)
    logging.captureWarnings(True)
    os.environ["TASKPOOL_LOG_FORMAT"] = log_format
    _json_logging = log_format == "json"
    if _json_logging:
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_thread_uncaught
        sys.unraisablehook = _log_unraisable


def _log_uncaught(
    kind: type[BaseException], exc: BaseException, tb: types.TracebackType | None
) -> None:
    _log.critical("uncaught exception", exc_info=(kind, exc, tb))


def _log_thread_uncaught(hook: threading.ExceptHookArgs) -> None:
    if hook.exc_value is None:
        return
    thread = hook.thread.name if hook.thread is not None else "?"
    _log.critical(
        "uncaught exception in thread %s",
        thread,
        exc_info=(hook.exc_type, hook.exc_value, hook.exc_traceback),
    )


def _log_unraisable(hook: sys.UnraisableHookArgs) -> None:
    exc_info = (
        (hook.exc_type, hook.exc_value, hook.exc_traceback) if hook.exc_value is not None else None
    )
    _log.error("exception ignored in %r: %s", hook.object, hook.err_msg or "", exc_info=exc_info)
