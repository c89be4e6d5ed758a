"""Run one attempt: spawn a process group, stream its output, await its exit.

The runner knows nothing of the store. It reports output to a sink, is stopped
through a `RunnerControl`, and returns an `Outcome`. Whatever ends it (exit,
timeout, stall, stop request, an exception in the sink, cancellation of the
task that runs it) the whole process group is killed and the leader reaped
before it returns or raises: that cleanup runs shielded from cancellation.

Words, each used for one thing: the pool *stops* an attempt by a `StopRequest`
(`RunnerControl.stop`: cancel, shutdown, lost lease, self-fencing); the runner
*ends* the process (`_end_process`: SIGTERM, grace, SIGKILL, or SIGKILL at once
when forced) for a stop request, a timeout or a stall, and records why as the
attempt's `ending`; the `Outcome` it returns says how the attempt ended.

The process itself (its environment, spawn, and the leader held unreaped until it is
reaped, its exit awaited on a pidfd) is _attempt_process.py's; this module decides
when and how it ends, and what its outcome says (`how_it_ended`, pure).
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import anyio

from . import _procs
from ._attempt_process import (
    AttemptWatcher,
    Process,
    describe_exit,
    ensure_dead,
    spawn,
    spawn_error,
    task_environment,
    unstartable,
    wait_empty,
)
from ._containment import Box, ProcessGroupBox
from ._errors import LeaseLost
from ._models import Outcome, OutcomeKind, ResourceLimits
from ._output import OutputDecoder

READ_CHUNK_BYTES = 64 * 1024
#: How long to wait for the output pipe to reach EOF once the group is dead.
DRAIN_TIMEOUT_S = 2.0
#: How often a long-running attempt's descendants are noted, so that one which
#: escapes the process group with setsid is still killed with its task.
DESCENDANT_SCAN_INTERVAL_S = 1.0
#: A process is recorded (pid and start time) once it has lived this long; the
#: many that end sooner cost no extra write.
RECORD_SPAWN_DELAY_S = 0.05


class OutputSink(Protocol):
    """Where a runner delivers decoded output. May raise `LeaseLost`."""

    async def write(self, text: str) -> None: ...

    async def flush(self) -> None: ...


class StopKind(enum.Enum):
    """Why the pool asks a runner to stop; each becomes the `OutcomeKind` of that name."""

    CANCELLED = "cancelled"
    SHUTDOWN = "shutdown"
    LEASE_LOST = "lease_lost"
    SELF_FENCED = "self_fenced"  # the lease could not be renewed and is about to run out


@dataclass(frozen=True, slots=True)
class StopRequest:
    """The pool's request to stop an attempt (the first one wins, but force escalates)."""

    kind: StopKind
    reason: str
    force: bool  # skip SIGTERM and the grace period


class RunnerControl:
    """The handle through which the pool stops a running attempt."""

    def __init__(self) -> None:
        self.request: StopRequest | None = None
        self.pid: int | None = None
        self._wakeup = anyio.Event()
        # Set while a process runs: kills its group at once, from inside `stop`.
        self._kill_now: Callable[[], None] | None = None

    def stop(self, kind: StopKind, reason: str, *, force: bool = False) -> None:
        """Ask the runner to stop; a forced request escalates a graceful one in progress.

        A forced stop kills the process group before this returns: it must not wait for
        the watchdog, which may be awaiting a store write that hangs in an outage (the
        very case where a lease that cannot be renewed must be cut short)."""
        if self.request is None:
            self.request = StopRequest(kind, reason, force)
        elif force and not self.request.force:
            self.request = StopRequest(self.request.kind, self.request.reason, True)
        if force and self._kill_now is not None:
            self._kill_now()
        self._wakeup.set()

    def _wake(self) -> None:
        """Wake the watchdog (see `_sleep`): the process exited."""
        self._wakeup.set()

    @property
    def forced(self) -> bool:
        return self.request is not None and self.request.force

    async def _sleep(self, timeout: float) -> None:
        """Sleep up to `timeout` s or until woken by a stop request or the process's exit.

        One event for every reason to wake keeps the watchdog a single task; the
        caller re-checks its conditions, so a wake-up with nothing new is harmless."""
        event = self._wakeup
        if not event.is_set():
            with anyio.move_on_after(timeout):
                await event.wait()
        if event.is_set():
            self._wakeup = anyio.Event()

    def __repr__(self) -> str:
        return f"<RunnerControl pid={self.pid} request={self.request}>"


@dataclass(frozen=True, slots=True)
class RunRequest:
    argv: Sequence[str]
    cwd: str | None
    env: Mapping[str, str] | None
    marker: str  # set as TASKPOOL_ATTEMPT in the child's environment
    timeout_s: float | None
    stall_timeout_s: float | None
    kill_grace_s: float
    max_log_bytes: int
    flush_interval_s: float = 0.25
    pass_env: frozenset[str] = frozenset()  # names whose values come from the worker
    inherit_env: bool = True  # start from the worker's environment (minus taskpool's own)
    #: Where the attempt's processes live (its cgroup, or just its process group).
    box: Box = field(default_factory=lambda: ProcessGroupBox("-", ResourceLimits()))
    watcher: AttemptWatcher | None = None


SpawnHook = Callable[[int, float], Awaitable[None]]


def _environment(req: RunRequest) -> dict[bytes, bytes]:
    return task_environment(
        os.environb,
        env=req.env,
        pass_env=req.pass_env,
        inherit_env=req.inherit_env,
        marker=req.marker,
    )


class _Attempt:
    def __init__(
        self,
        req: RunRequest,
        sink: OutputSink,
        control: RunnerControl,
        proc: Process,
        on_spawn: SpawnHook,
    ) -> None:
        self.req = req
        self.sink = sink
        self.control = control
        self.proc = proc
        self.on_spawn = on_spawn
        self.decoder = OutputDecoder(req.max_log_bytes)
        self.started = anyio.current_time()
        self.last_output = self.started
        # Why the runner ends the process, set when it decides to (a stop request, a
        # timeout, a stall); how it did is added as it goes (see `_end_process`).
        self.ending: Outcome | None = None
        self.next_descendant_scan = self.started + DESCENDANT_SCAN_INTERVAL_S
        self.output_done = anyio.Event()
        self.pump_scope = anyio.CancelScope()

    async def pump_output(self) -> None:
        assert self.proc.popen.stdout is not None
        fd = self.proc.popen.stdout.fileno()
        os.set_blocking(fd, False)
        try:
            with self.pump_scope:
                await self._pump(fd)
        except LeaseLost:
            self.control.stop(StopKind.LEASE_LOST, "a log write was refused", force=True)
        finally:
            self.output_done.set()

    async def _pump(self, fd: int) -> None:
        while True:
            await anyio.wait_readable(fd)
            try:
                data = os.read(fd, READ_CHUNK_BYTES)
            except BlockingIOError:
                continue
            if not data:
                return
            self.last_output = anyio.current_time()
            text = self.decoder.feed(data)
            if text:
                await self.sink.write(text)

    def _due(self) -> tuple[float, Outcome | None]:
        """Seconds until the next check, or the ending (timeout, stall) due now."""
        now = anyio.current_time()
        wait = self.req.flush_interval_s
        if self.req.timeout_s is not None:
            left = self.started + self.req.timeout_s - now
            if left <= 0:
                return 0, Outcome(
                    OutcomeKind.TIMED_OUT, f"timed out after {self.req.timeout_s:g} s"
                )
            wait = min(wait, left)
        if self.req.stall_timeout_s is not None:
            left = self.last_output + self.req.stall_timeout_s - now
            if left <= 0:
                return 0, Outcome(
                    OutcomeKind.STALLED, f"no output for {self.req.stall_timeout_s:g} s"
                )
            wait = min(wait, left)
        return wait, None

    def kill_now(self) -> None:
        """A forced stop: SIGKILL the group at once, and record why unless a graceful stop
        in progress already did (`_end_process` then adds how it ended)."""
        request = self.control.request
        if request is None or self.proc.exited.is_set():
            return
        if self.ending is None:
            self.ending = Outcome(
                _OUTCOME_OF_REQUEST[request.kind], f"{request.reason}; process group sent SIGKILL"
            )
        self.proc.kill_all()

    async def watch(self) -> None:
        """The watchdog: decide when to end the process (request, timeout, stall) and do
        it; meanwhile record the spawn, flush output, and note escaping descendants."""
        record_at: float | None = self.started + RECORD_SPAWN_DELAY_S
        next_flush = self.started + self.req.flush_interval_s
        while not self.proc.exited.is_set():
            if self.ending is not None:
                return  # a forced stop killed the group already (see `kill_now`)
            request = self.control.request
            if request is not None:
                due: Outcome | None = Outcome(_OUTCOME_OF_REQUEST[request.kind], request.reason)
                wait = 0.0
            else:
                wait, due = self._due()
            if due is not None:
                self.ending = due
                await self._end_process()
                return
            now = anyio.current_time()
            if record_at is not None and now >= record_at:
                # A process that ends sooner needs no record: its finish says all, and a
                # pool crash inside the delay is covered by the boot-time marker scan.
                record_at = None
                await self._guard(self._record_spawn())
                continue
            if now >= next_flush:
                next_flush = now + self.req.flush_interval_s
                await self._guard(self.sink.flush())
                continue
            if now >= self.next_descendant_scan:
                self.next_descendant_scan = now + DESCENDANT_SCAN_INTERVAL_S
                self.proc.note_descendants()
            deadlines = [next_flush, self.next_descendant_scan]
            if record_at is not None:
                deadlines.append(record_at)
            await self.control._sleep(min(wait, min(deadlines) - now))

    async def _record_spawn(self) -> None:
        started = _procs.start_time(self.proc.pid)  # the leader is unreaped: still ours
        if started is not None:
            await self.on_spawn(self.proc.pid, started)

    async def _guard(self, write: Awaitable[None]) -> None:
        """Run a store write; a refusal means another owner: stop at once."""
        try:
            await write
        except LeaseLost:
            self.control.stop(StopKind.LEASE_LOST, "a write was refused", force=True)

    async def _end_process(self) -> None:
        """SIGTERM, a grace period, then SIGKILL; a forced stop goes straight to SIGKILL."""
        assert self.ending is not None
        if not self.control.forced:
            self.proc.signal(signal.SIGTERM)
            deadline = anyio.current_time() + self.req.kill_grace_s
            while not self.proc.exited.is_set() and not self.control.forced:
                left = deadline - anyio.current_time()
                if left <= 0:
                    break
                await self.control._sleep(left)
            if self.proc.exited.is_set() and not self.control.forced:
                self.ending = _with(self.ending, "process group sent SIGTERM")
                return
            if not self.control.forced:
                self.proc.kill_all()
                self.ending = _with(
                    self.ending,
                    f"SIGTERM ignored for {self.req.kill_grace_s:g} s, process group sent SIGKILL",
                )
                return
        self.proc.kill_all()
        self.ending = _with(self.ending, "process group sent SIGKILL")


_OUTCOME_OF_REQUEST = {
    StopKind.CANCELLED: OutcomeKind.CANCELLED,
    StopKind.SHUTDOWN: OutcomeKind.SHUTDOWN,
    StopKind.LEASE_LOST: OutcomeKind.LEASE_LOST,
    StopKind.SELF_FENCED: OutcomeKind.SELF_FENCED,
}


def _close_gate(gate: int | None) -> None:
    if gate is not None:
        with contextlib.suppress(OSError):
            os.close(gate)


def _with(outcome: Outcome, detail: str) -> Outcome:
    return Outcome(outcome.kind, f"{outcome.reason}; {detail}", outcome.exit_code)


async def run_attempt(
    req: RunRequest,
    sink: OutputSink,
    control: RunnerControl,
    on_spawn: SpawnHook,
) -> Outcome:
    """Run one attempt to its end and say how it ended.

    `on_spawn(pid, start_time)` is awaited once the process has lived for
    `RECORD_SPAWN_DELAY_S` (the pool records the process identity durably there);
    if it raises, the group is killed and the exception propagates. A refused write
    (`LeaseLost`) kills the group at once and yields an outcome the pool must not
    record.
    """
    request = control.request
    if request is not None:
        # Stopped before it started (shutdown began, a cancel or a lost lease won the
        # race): nothing to spawn.
        return Outcome(_OUTCOME_OF_REQUEST[request.kind], f"{request.reason} before it started")
    env = _environment(req)
    if req.box.wraps:
        problem = unstartable(req.argv, req.cwd, env)
        if problem is not None:
            return Outcome(OutcomeKind.SPAWN_FAILED, problem)
    # A gated box's task waits for this pipe: opened once the guard watches it, or
    # closed unopened if this process dies first (then the task never runs).
    gate_read, gate = os.pipe() if req.box.gated else (None, None)
    try:
        popen = spawn(req.argv, req.cwd, env, req.box, gate=gate_read)
    except OSError as exc:
        _close_gate(gate)
        return Outcome(OutcomeKind.SPAWN_FAILED, spawn_error(req.argv, req.cwd, exc))
    except subprocess.SubprocessError as exc:  # the child could not join its cgroup
        _close_gate(gate)
        return Outcome(OutcomeKind.SPAWN_FAILED, f"could not start {req.argv[0]!r}: {exc}")
    finally:
        if gate_read is not None:
            os.close(gate_read)
    proc = Process(popen, req.box, req.watcher)
    control.pid = proc.pid
    attempt = _Attempt(req, sink, control, proc, on_spawn)
    control._kill_now = attempt.kill_now
    survivors = 0
    try:
        try:
            if req.watcher is not None:
                req.watcher.started(proc.pid)
            if gate is not None:
                # A pipe's first bytes never block; a task killed already cannot read.
                with contextlib.suppress(OSError):
                    os.write(gate, b"go\n")
        finally:
            _close_gate(gate)
        async with anyio.create_task_group() as tg:
            tg.start_soon(attempt.pump_output)
            tg.start_soon(attempt.watch)
            await proc.wait_exited(control._wake)
            survivors = len(req.box.members())  # the leader, a zombie, is not counted
            proc.kill_all(scan=False)  # leftovers of a leader that exited die with it
            await wait_empty(req.box)
            proc.reap()
            # An escaped descendant may hold the pipe open: drain for a bounded time.
            if not attempt.output_done.is_set():
                with anyio.move_on_after(DRAIN_TIMEOUT_S):
                    await attempt.output_done.wait()
            attempt.pump_scope.cancel()
            # The watchdog ends by itself once it sees the exit, after recording how.
        tail = attempt.decoder.finish()
        if tail:
            with contextlib.suppress(LeaseLost):
                await sink.write(tail)
        with contextlib.suppress(LeaseLost):
            await sink.flush()
    finally:
        control._kill_now = None
        try:
            if proc.exit_code is None:  # not reaped: kill and wait, whatever cancels us
                with anyio.CancelScope(shield=True):
                    await ensure_dead(proc)
        finally:
            proc.close()
    request = control.request
    if request is not None and request.kind is StopKind.LEASE_LOST:
        return Outcome(OutcomeKind.LEASE_LOST, request.reason, proc.exit_code)
    code = proc.exit_code
    assert code is not None
    return how_it_ended(code, attempt.ending, proc.killed_by, survivors, req.box.limit_report())


def how_it_ended(
    code: int,
    ending: Outcome | None,
    killed_by: str | None,
    survivors: int,
    limit_report: str | None,
) -> Outcome:
    """The outcome of an attempt whose leader exited with `code` (pure): why the runner
    ended it (`ending`), if it did; the guard's report if the guard killed it
    (`killed_by`); the descendants that outlived the leader; what a limit did."""
    self_fenced = ending is not None and ending.kind is OutcomeKind.SELF_FENCED
    if killed_by is not None and (ending is None or self_fenced):
        # The guard got there first (this process was frozen or slow): say so.
        outcome = Outcome(OutcomeKind.SELF_FENCED, killed_by, code)
    elif ending is not None:
        outcome = Outcome(ending.kind, ending.reason, code)
    else:
        outcome = Outcome(OutcomeKind.EXITED, describe_exit(code), code)
    notes = []
    if survivors and ending is None:
        notes.append(
            f"{survivors} descendant process{'es' if survivors > 1 else ''} outlived the"
            " leader and were killed"
        )
    if limit_report:
        notes.append(limit_report)
    if notes:
        outcome = Outcome(outcome.kind, "; ".join([outcome.reason, *notes]), code)
    return outcome
