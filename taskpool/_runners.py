"""The attempts a node runs, one runner task each in the pool's task group: started from
a claim, run (`_attempt.Attempt`), their outcome reported to the store (claiming for
the freed slot in the same transaction), and the bookkeeping kept in step with them:
their leases (`_leases.LeaseBook`), the node guard's deadline, and which runners a
crash or an overlong shutdown cancelled before they reported.

How an outcome is reported is decided purely (`how_to_report`, `refused_outcome`).
When runners start and when they are stopped is the pool's to say (_pool.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import anyio
from anyio.abc import TaskGroup

from ._attempt import Attempt, AttemptSetup
from ._errors import LeaseLost
from ._leases import Key, LeaseBook, stop_cancelled
from ._models import Claim, Limits, Outcome, OutcomeKind, TaskInfo
from ._runner import RunnerControl, StopKind
from ._telemetry import Telemetry


class Report(Enum):
    """What a runner writes to the store once its attempt has ended."""

    NOTHING = "nothing"  # the lease is lost: the task is another node's now
    FINISH = "finish"  # the outcome alone
    FINISH_AND_CLAIM = "finish and claim"  # the outcome, and a claim for the freed slot
    # The outcome, waking every node with a free slot (this one too, through the store)
    # to claim what it freed: another node may take it.
    HAND_OFF = "hand off"


def how_to_report(outcome: Outcome, *, closing: bool, hand_off: bool = False) -> Report:
    """How an attempt that ended with `outcome` is reported. Pure.

    A closing pool claims nothing more, and neither does a self-fenced node: it is in
    trouble with its store, so no new work until it renews. A task whose end frees a
    key that other nodes may wait on is handed off when `hand_off` (see
    `frees_for_others`). Otherwise the freed slot is claimed for at once, with no
    round trip through the claim loop."""
    if outcome.kind is OutcomeKind.LEASE_LOST:
        return Report.NOTHING
    if closing or outcome.kind is OutcomeKind.SELF_FENCED:
        return Report.FINISH
    if hand_off:
        return Report.HAND_OFF
    return Report.FINISH_AND_CLAIM


def frees_for_others(task: TaskInfo, limits: Limits) -> bool:
    """Whether the end of `task` frees something a waiting task may be blocked on: its
    template, a named lock, or a place in a project this node limits. Pure.

    Claiming at once for its slot, the node that ended it would take the next task
    blocked on that key before any other node could: with work queued up front, one
    node of several would run a whole template. Such an end is handed off instead,
    when other nodes share a store that wakes them: every node with a free slot,
    this one too, claims on the wake, and the database gives the key to whichever
    claim comes first. A task without such a key frees only this node's slot, which
    this node fills at once."""
    spec = task.spec
    return spec.template is not None or bool(spec.locks) or spec.project in limits.project_limits


def refused_outcome(outcome: Outcome, refusal: LeaseLost) -> Outcome:
    """What an attempt whose result the store refused ended as: a lost lease, reported
    as what it is rather than as the exit the runner saw. Pure."""
    return Outcome(
        OutcomeKind.LEASE_LOST,
        f"result refused ({refusal}); the attempt had {outcome.reason}",
        outcome.exit_code,
    )


def shutdown_reason(node_id: str, *, hurried: bool = False) -> str:
    """Why a runner stopped by its node's shutdown was stopped."""
    return f"interrupted: node {node_id} shut down" + (" (hurried)" if hurried else "")


@dataclass(frozen=True, slots=True)
class RunnerSetup:
    """What a node's runners run with, known once the node has started."""

    attempt: AttemptSetup  # what each attempt is run with (store, its calls, the guard)
    task_group: TaskGroup  # the pool's: a runner's failure is the pool's crash
    telemetry: Telemetry
    node_id: str
    limits: Limits  # what a claim for a freed slot may take
    closing: Callable[[], bool]  # the pool is shutting down: nothing more is claimed
    slot_freed: Callable[[], None]  # a runner ended and did not claim for its slot
    # Other nodes share the store and are woken by it: ends that free keys hand off.
    has_peers: Callable[[], bool]
    task_changed: Callable[[], None]  # a task's state changed in the store


class Runners(Mapping[Key, RunnerControl]):
    """The attempts this node runs, keyed by (task id, fence): a task whose lease this
    node lost and then claimed again has two runners for a moment, the old one still
    killing its process. As a mapping, each running attempt's stop control.

    The lease book holds exactly the leases of these attempts: granted when a runner
    starts and dropped when it ends, with no checkpoint between either and the
    mapping's own update. Empty until `open` (so before the pool starts) and again
    once every runner has ended."""

    def __init__(self, leases: LeaseBook) -> None:
        self._leases = leases
        self._controls: dict[Key, RunnerControl] = {}
        self._interrupted: dict[int, int] = {}
        self._ended = anyio.Event()
        self._setup: RunnerSetup | None = None

    def open(self, setup: RunnerSetup) -> None:
        """Give the runners what they run with, once the node has started."""
        self._setup = setup

    def __getitem__(self, key: Key) -> RunnerControl:
        return self._controls[key]

    def __iter__(self) -> Iterator[Key]:
        return iter(self._controls)

    def __len__(self) -> int:
        return len(self._controls)

    @property
    def interrupted(self) -> Mapping[int, int]:
        """Runners cancelled before they reported (task id -> fence): a crash, or a
        shutdown that ran out of time. Their attempts are the pool's to release."""
        return self._interrupted

    def start(self, claims: Sequence[Claim], asked_at: float) -> None:
        """Start a runner for each claim, asked for at `asked_at` (time.monotonic()).
        Call it at once when a claim returns, with no checkpoint between: whatever the
        store committed is either run or handed back."""
        setup = self._opened()
        stopping = setup.closing() or setup.task_group.cancel_scope.cancel_called
        for claim in claims:
            key = claim.task.id, claim.fence
            control = RunnerControl()
            if stopping:  # claimed while shutdown began: hand it straight back
                control.stop(StopKind.SHUTDOWN, shutdown_reason(setup.node_id))
            self._controls[key] = control
            self._leases.grant(key, asked_at)
            setup.task_group.start_soon(self._run, claim, name=f"taskpool task {claim.task.id}")
        if claims:
            setup.attempt.guard.arm_node()

    def stop_for_shutdown(self, *, force: bool, hurried: bool = False) -> None:
        """Stop every runner for the node's shutdown: each task goes back to waiting
        without using an attempt. `force` kills at once, and escalates a graceful stop
        already under way (its reason kept)."""
        if not self._controls:
            return
        reason = shutdown_reason(self._opened().node_id, hurried=hurried)
        for control in list(self._controls.values()):
            control.stop(StopKind.SHUTDOWN, reason, force=force)

    def cancel(self, key: Key, *, force: bool) -> None:
        """Stop the attempt, if it runs here, for a cancel request."""
        if key in self._controls:
            stop_cancelled({key: force}, self._controls)

    async def wait_all_ended(self) -> None:
        while self._controls:
            self._ended = anyio.Event()
            await self._ended.wait()

    def _opened(self) -> RunnerSetup:
        assert self._setup is not None, "the runners are not open: the pool has not started"
        return self._setup

    async def _run(self, claim: Claim) -> None:
        setup = self._opened()
        task, fence = claim.task, claim.fence
        attempt = Attempt(setup.attempt, claim, self._controls[task.id, fence])
        finished = claimed = False
        started = anyio.current_time()
        setup.telemetry.attempt_started(task)
        outcome = Outcome(OutcomeKind.SHUTDOWN, "interrupted: the pool stopped its task group")
        try:
            outcome = await attempt.run()
            try:
                claimed = await self._report(task, fence, outcome)
            except LeaseLost as exc:
                outcome = refused_outcome(outcome, exc)
                setup.telemetry.note(
                    logging.WARNING,
                    "result_refused",
                    "task %s: result not recorded: %s",
                    task.id,
                    exc,
                    task_id=task.id,
                    fence=fence,
                )
            finished = True
        finally:
            attempt.close()
            setup.telemetry.attempt_ended(task, outcome, anyio.current_time() - started)
            if not finished:
                self._interrupted[task.id] = fence
            del self._controls[task.id, fence]
            self._leases.drop((task.id, fence))
            setup.attempt.guard.arm_node()
            self._ended.set()
            if not claimed:  # the slot is free and nobody looked for work for it yet
                setup.slot_freed()
            setup.task_changed()

    async def _report(self, task: TaskInfo, fence: int, outcome: Outcome) -> bool:
        """Write what `how_to_report` says; True if the freed slot is seen to: claimed
        for (and what it claimed started), or handed off (the store's wake-up makes
        this node's claim loop claim for it, beside the other nodes')."""
        setup = self._opened()
        store, calls, task_id = setup.attempt.store, setup.attempt.calls, task.id
        hand_off = setup.has_peers() and frees_for_others(task, setup.limits)
        report = how_to_report(outcome, closing=setup.closing(), hand_off=hand_off)
        if report is Report.NOTHING:
            return False
        if report in (Report.FINISH, Report.HAND_OFF):
            await calls(lambda: store.finish(task_id, fence, outcome))
            return report is Report.HAND_OFF
        claims, asked_at = await calls.sent_at(
            lambda: store.finish_and_claim(
                task_id,
                fence,
                outcome,
                node_id=setup.node_id,
                limits=setup.limits,
                lease_ttl_s=self._leases.ttl_s,
            )
        )
        self.start(claims, asked_at)
        return True
