"""One claimed attempt on a worker node, from its spec to its outcome: its box (a cgroup
or a process group) with the spec's limits, the run request, its output appended to
the store in batches, its spawn recorded and its leader handed to the node's guard.

What is done around it (reporting the outcome, claiming for the freed slot, the
bookkeeping of a node's running attempts) is _runners.py's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import _procs
from ._containment import Box, Containment
from ._leases import NodeGuard
from ._models import Claim, Outcome, OutcomeKind, ResourceLimits
from ._runner import RunnerControl, RunRequest, run_attempt
from ._store import Store
from ._store_calls import StoreCalls

#: Output is sent to the store once this much is buffered (or every flush interval).
LOG_FLUSH_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class AttemptSetup:
    """What every attempt a node runs is run with."""

    store: Store
    calls: StoreCalls
    containment: Containment
    guard: NodeGuard
    default_limits: ResourceLimits
    kill_grace_s: float
    max_log_bytes: int
    output_changed: Callable[[], None]  # told after each batch of output is stored


class StoreSink:
    """Buffers one attempt's output and appends it to the store in batches."""

    def __init__(self, setup: AttemptSetup, task_id: int, fence: int) -> None:
        self._setup = setup
        self._task_id = task_id
        self._fence = fence
        self._buffer: list[str] = []
        self._buffered = 0

    async def write(self, text: str) -> None:
        self._buffer.append(text)
        self._buffered += len(text)
        if self._buffered >= LOG_FLUSH_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if not self._buffer:
            return
        texts, self._buffer, self._buffered = self._buffer, [], 0
        store = self._setup.store
        await self._setup.calls(lambda: store.append_output(self._task_id, self._fence, texts))
        self._setup.output_changed()


class Attempt:
    """Runs one claimed attempt (`run`), then removes its box (`close`, on every path)."""

    def __init__(self, setup: AttemptSetup, claim: Claim, control: RunnerControl) -> None:
        self._setup = setup
        self._claim = claim
        self._control = control
        self._box: Box | None = None

    async def run(self) -> Outcome:
        """Spawn the attempt in a box of its own and wait for its end (see run_attempt)."""
        setup, task, fence = self._setup, self._claim.task, self._claim.fence
        spec = task.spec
        try:
            limits = spec.limits.over(setup.default_limits)
            self._box = box = setup.containment.box(f"{task.id}.{fence}", limits)
        except OSError as exc:
            return Outcome(OutcomeKind.SPAWN_FAILED, f"could not make the attempt's cgroup: {exc}")

        async def on_spawn(pid: int, started_at: float) -> None:
            await setup.calls(lambda: setup.store.record_spawn(task.id, fence, pid, started_at))

        marker = _procs.attempt_marker(setup.store.store_id, task.id, fence)
        request = RunRequest(
            argv=spec.argv,
            cwd=spec.cwd,
            env=spec.env,
            pass_env=spec.pass_env,
            inherit_env=spec.inherit_env,
            marker=marker,
            timeout_s=spec.timeout_s,
            stall_timeout_s=spec.stall_timeout_s,
            kill_grace_s=setup.kill_grace_s,
            max_log_bytes=setup.max_log_bytes,
            box=box,
            watcher=setup.guard.watcher((task.id, fence), marker, box),
        )
        sink = StoreSink(setup, task.id, fence)
        return await run_attempt(request, sink, self._control, on_spawn)

    def close(self) -> None:
        if self._box is not None:
            self._box.remove()  # empty by now: the runner waited for it
