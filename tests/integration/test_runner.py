"""The runner alone (real processes, no store): stop requests, refused writes, escalation."""

from __future__ import annotations

import anyio

from taskpool import LeaseLost
from taskpool._models import OutcomeKind
from taskpool._runner import RunnerControl, RunRequest, StopKind, run_attempt
from tests.helpers import attempt_processes, eventually, no_attempt_processes


class Sink:
    """Collects output; can be told to refuse writes as a stale owner would be."""

    def __init__(self, refuse: bool = False) -> None:
        self.texts: list[str] = []
        self.refuse = refuse

    async def write(self, text: str) -> None:
        if self.refuse:
            raise LeaseLost("stale fence")
        self.texts.append(text)

    async def flush(self) -> None:
        if self.refuse and self.texts:
            raise LeaseLost("stale fence")


def request(argv: list[str], marker: str = "900:1", **options: float) -> RunRequest:
    return RunRequest(
        argv=argv,
        cwd=None,
        env=None,
        marker=marker,
        timeout_s=options.get("timeout_s"),
        stall_timeout_s=options.get("stall_timeout_s"),
        kill_grace_s=options.get("kill_grace_s", 0.5),
        max_log_bytes=1024 * 1024,
    )


async def no_record(pid: int, started_at: float) -> None:
    return None


async def test_a_runner_stopped_before_it_starts_spawns_nothing() -> None:
    """A stop that wins the race with the spawn means no process at all."""
    control = RunnerControl()
    control.stop(StopKind.SHUTDOWN, "interrupted: node n shut down")
    outcome = await run_attempt(request(["sleep", "600"]), Sink(), control, no_record)
    assert outcome.kind is OutcomeKind.SHUTDOWN
    assert outcome.reason == "interrupted: node n shut down before it started"
    assert control.pid is None


async def test_a_refused_write_kills_the_group_at_once() -> None:
    """When the store refuses a write (stale fence), the process group dies immediately."""
    script = "trap '' TERM; echo hello; sleep 600 & sleep 600"
    outcome = await run_attempt(
        request(["sh", "-c", script]), Sink(refuse=True), RunnerControl(), no_record
    )
    assert outcome.kind is OutcomeKind.LEASE_LOST
    assert outcome.reason == "a log write was refused"
    assert await no_attempt_processes(900)


async def test_a_refused_spawn_record_kills_the_group() -> None:
    """A refused spawn record (the lease was lost before it) also kills the group."""

    async def refuse(pid: int, started_at: float) -> None:
        raise LeaseLost("stale fence")

    outcome = await run_attempt(request(["sleep", "600"]), Sink(), RunnerControl(), refuse)
    assert outcome.kind is OutcomeKind.LEASE_LOST
    assert outcome.reason == "a write was refused"
    assert await no_attempt_processes(900)


async def test_a_forced_stop_cuts_a_graceful_one_short() -> None:
    """A forced cancel during the grace period of a graceful one SIGKILLs at once."""
    control = RunnerControl()
    result = []

    async def run() -> None:
        script = "trap '' TERM; while true; do sleep 0.05; done"
        req = request(["sh", "-c", script], kill_grace_s=600)
        result.append(await run_attempt(req, Sink(), control, no_record))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)

        async def spawned() -> bool:
            return bool(attempt_processes(900))

        await eventually(spawned)
        control.stop(StopKind.CANCELLED, "cancelled by request")
        await anyio.sleep(0.2)  # inside the 600 s grace period
        assert not result
        control.stop(StopKind.CANCELLED, "cancelled by request", force=True)
    (outcome,) = result
    assert outcome.kind is OutcomeKind.CANCELLED
    assert outcome.reason == "cancelled by request; process group sent SIGKILL"
    assert outcome.exit_code == -9
    assert await no_attempt_processes(900)


async def test_cancelling_the_runner_task_kills_the_group() -> None:
    """If the task running the runner is cancelled (the pool crashed), the group dies."""
    with anyio.move_on_after(0.5):
        await run_attempt(
            request(["sh", "-c", "sleep 600 & sleep 600"]), Sink(), RunnerControl(), no_record
        )
    assert await no_attempt_processes(900)
