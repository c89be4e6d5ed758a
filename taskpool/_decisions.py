"""What a store decides inside a transaction, written once over plain data. Pure.

Every backend reads a task's row into a `TaskState`, calls one of the `plan_*`
functions and applies the typed result it returns (an `Ending`, a `Start`, a
`CancelRequest`): the SQL stores write it as columns, the in-memory store onto
its objects. Fence checks and their messages, the reasons recorded, which
attempt is refunded and what an event says live here, not in a backend.

The words: an attempt *ends* with its runner's `OutcomeKind`, or is *settled*
without one (`Settlement`): rescued after its lease expired, settled as an orphan
of a dead predecessor, or handed back by a node that stopped.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass

from ._errors import InvalidTask, LeaseLost
from ._models import (
    DEFAULT_RETRY_MAX_DELAY_S,
    CancelMode,
    Outcome,
    OutcomeKind,
    Status,
    TaskEvent,
    TaskInfo,
)
from ._reasons import claim_reason as claim_reason
from ._reasons import (
    dependency_chain_reason,
    dependency_reason,
    dependency_root,
    handback_reason,
    replaced_reason,
    rescue_reason,
)
from ._retry import _RETRY_ON_NAME, jitter_unit, not_retried_reason, retried_on
from ._retry import retry_delay_s as retry_delay_s


class Settlement(enum.StrEnum):
    """How an attempt ended that its runner never reported (the attempt's outcome)."""

    RESCUED = "rescued"  # its lease expired and another node re-queued it or marked it lost
    ORPHANED = "orphaned"  # its node died and a successor on the host settled it at boot
    HANDED_BACK = "handed_back"  # its node stopped while holding it, and gave it back


@dataclass(frozen=True, slots=True)
class TaskState:
    """What the decisions read of a task: its status, its attempt and its policy."""

    id: int
    status: Status
    fence: int
    attempts_used: int
    max_attempts: int
    retry_backoff_s: float
    owner_node: str | None
    lease_expires_at: float | None
    cancel_requested: str | None
    retry_jitter: float = 0.0
    retry_max_delay_s: float = DEFAULT_RETRY_MAX_DELAY_S
    retry_on: frozenset[str] | None = None  # None: every failure that retries by default

    @classmethod
    def of(cls, info: TaskInfo) -> TaskState:
        return cls(
            id=info.id,
            status=info.status,
            fence=info.fence,
            attempts_used=info.attempts_used,
            max_attempts=info.spec.max_attempts,
            retry_backoff_s=info.spec.retry_backoff_s,
            owner_node=info.owner_node,
            lease_expires_at=info.lease_expires_at,
            cancel_requested=info.cancel_requested,
            retry_jitter=info.spec.retry_jitter,
            retry_max_delay_s=info.spec.retry_max_delay_s,
            retry_on=info.spec.retry_on,
        )


@dataclass(frozen=True, slots=True)
class Transition:
    """The next status of a task whose attempt ended, and why."""

    status: Status
    consumes_attempt: bool
    not_before: float | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class AttemptEnd:
    """What closes an attempt's own record."""

    fence: int
    outcome: OutcomeKind | Settlement
    exit_code: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class Ending:
    """What a store writes when an attempt, or a waiting task, ends.

    Back to waiting (`requeued`), the task loses its owner, lease and process and
    may run again from `not_before` (0: at once); otherwise it is finished at `at`.
    The lease ends either way.
    """

    task_id: int
    status: Status
    attempts_used: int
    exit_code: int | None
    reason: str
    at: float
    not_before: float
    attempt: AttemptEnd | None  # None: the task was waiting, no attempt to close

    @property
    def requeued(self) -> bool:
        return self.status is Status.WAITING


@dataclass(frozen=True, slots=True)
class Start:
    """What a store writes when a node claims a waiting task: a new attempt."""

    task_id: int
    fence: int
    attempts_used: int
    owner_node: str
    lease_expires_at: float
    at: float
    reason: str


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """A cancel asked of a running task's owner: the mode to record, and its event."""

    mode: CancelMode
    event: TaskEvent  # id 0: the store numbers it


# -- leases and fences ---------------------------------------------------------


def lease_live(lease_expires_at: float | None, now: float) -> bool:
    """A lease counts (blocks others, can be renewed) through its expiry instant;
    only after it may the attempt be rescued."""
    return lease_expires_at is not None and lease_expires_at >= now


def check_fence(state: TaskState, fence: int) -> None:
    """Raise `LeaseLost` unless `fence` still owns the task.

    Ownership ends when someone else takes the task over (a rescue, then a new claim:
    status or fence change), not at lease expiry itself: expiry only allows a rescue.
    Until one happens, the owner may still record what its attempt did within the
    lease, whose processes never outlive it (the owner stops them before it runs out
    when it cannot renew it)."""
    if state.status is not Status.RUNNING or state.fence != fence:
        raise LeaseLost(
            f"task {state.id}: fence {fence} is stale"
            f" (task is {state.status.value}, fence {state.fence})"
        )


# -- the next status ---------------------------------------------------------


_STATUS_OF_ENDING = {
    OutcomeKind.TIMED_OUT: Status.TIMED_OUT,
    OutcomeKind.STALLED: Status.STALLED,
    OutcomeKind.CANCELLED: Status.CANCELLED,
}


def decide_finish(
    outcome: Outcome,
    *,
    attempts_used: int,
    max_attempts: int,
    backoff_s: float,
    now: float,
    cancel_requested: bool = False,
    max_delay_s: float = DEFAULT_RETRY_MAX_DELAY_S,
    jitter: float = 0.0,
    unit: float = 0.0,
    retry_on: Set[str] | None = None,
) -> Transition:
    """Decide the next status of a task whose attempt ended with `outcome`.

    `attempts_used` counts the attempt that just ended. Shutdown and self-fencing
    (stopped before a lease that could not be renewed ran out) never use up an
    attempt; cancellation and spawn failures are never retried (retrying a missing
    program only wastes time); other failures are retried while attempts remain and
    `retry_on` names them (None: all), after `retry_delay_s` (`max_delay_s`,
    `jitter`, and its random draw `unit` go there). A task someone asked to cancel
    is never re-queued.
    """
    policy = _RetryPolicy(max_attempts, backoff_s, max_delay_s, jitter, unit, retry_on)
    transition = _decide_finish(outcome, attempts_used, policy, now)
    if cancel_requested and transition.status is Status.WAITING:
        return Transition(Status.CANCELLED, True, reason=f"cancelled; {outcome.reason}")
    return transition


@dataclass(frozen=True, slots=True)
class _RetryPolicy:
    max_attempts: int
    backoff_s: float
    max_delay_s: float
    jitter: float
    unit: float
    retry_on: Set[str] | None


def _decide_finish(
    outcome: Outcome, attempts_used: int, policy: _RetryPolicy, now: float
) -> Transition:
    assert outcome.kind is not OutcomeKind.LEASE_LOST, "a lost lease is never written"
    if outcome.kind in (OutcomeKind.SHUTDOWN, OutcomeKind.SELF_FENCED):
        return Transition(Status.WAITING, consumes_attempt=False, reason=outcome.reason)
    if outcome.kind is OutcomeKind.EXITED and outcome.exit_code == 0:
        return Transition(Status.SUCCEEDED, consumes_attempt=True, reason=outcome.reason)
    if outcome.kind is OutcomeKind.CANCELLED:
        return Transition(Status.CANCELLED, consumes_attempt=True, reason=outcome.reason)
    final = _STATUS_OF_ENDING.get(outcome.kind, Status.FAILED)
    name = _RETRY_ON_NAME.get(outcome.kind)
    if name is None or attempts_used >= policy.max_attempts:  # spawn failures, or none left
        return Transition(final, consumes_attempt=True, reason=outcome.reason)
    if not retried_on(policy.retry_on, name, outcome.exit_code):
        assert policy.retry_on is not None
        reason = not_retried_reason(outcome.reason, policy.retry_on)
        return Transition(final, consumes_attempt=True, reason=reason)
    delay = retry_delay_s(
        policy.backoff_s,
        attempts_used,
        max_delay_s=policy.max_delay_s,
        jitter=policy.jitter,
        unit=policy.unit,
    )
    return Transition(
        Status.WAITING,
        consumes_attempt=True,
        not_before=now + delay,
        reason=f"{outcome.reason}; retrying in {delay:g} s "
        f"(attempt {attempts_used + 1} of {policy.max_attempts})",
    )


def decide_orphan(
    *,
    attempts_used: int,
    max_attempts: int,
    reason: str,
    cancel_requested: bool = False,
    retry_on: Set[str] | None = None,
) -> Transition:
    """Decide what happens to an attempt whose owner vanished (crash, kill, host loss).

    The attempt counts as used: the task itself may be what took its owner down. It
    is re-queued at once while attempts remain, unless `retry_on` leaves out `lost`.
    """
    if cancel_requested:
        return Transition(Status.CANCELLED, True, reason=f"{reason}; cancel was requested")
    if attempts_used >= max_attempts:
        return Transition(Status.LOST, True, reason=f"{reason}; no attempts left")
    if not retried_on(retry_on, "lost"):
        assert retry_on is not None
        return Transition(Status.LOST, True, reason=not_retried_reason(reason, retry_on))
    return Transition(
        Status.WAITING,
        consumes_attempt=True,
        reason=f"{reason}; re-queued (attempt {attempts_used + 1} of {max_attempts})",
    )


def decide_handback(reason: str, *, cancel_requested: bool = False) -> Transition:
    """Decide what happens to an attempt its node gives up without having run it to
    an end: the node stopped (or never started the task) and its processes are dead.

    Not the task's fault, so the attempt is refunded; a task someone asked to cancel
    is cancelled instead of re-queued, as in `decide_finish`.
    """
    if cancel_requested:
        return Transition(Status.CANCELLED, True, reason=f"cancelled; {reason}")
    return Transition(Status.WAITING, consumes_attempt=False, reason=reason)


# -- reasons -----------------------------------------------------------------


# -- plans: what to write ------------------------------------------------------


def _ending(
    state: TaskState,
    transition: Transition,
    now: float,
    outcome: OutcomeKind | Settlement | None,
    exit_code: int | None,
) -> Ending:
    running = state.status is Status.RUNNING
    attempts_used = state.attempts_used
    if running and not transition.consumes_attempt:
        attempts_used -= 1  # shutdown, self-fencing and hand-backs refund the attempt
    attempt = None
    if running:
        assert outcome is not None, "an attempt always ends with an outcome"
        attempt = AttemptEnd(state.fence, outcome, exit_code, transition.reason)
    return Ending(
        task_id=state.id,
        status=transition.status,
        attempts_used=attempts_used,
        exit_code=exit_code,
        reason=transition.reason,
        at=now,
        not_before=transition.not_before or 0.0,
        attempt=attempt,
    )


def plan_start(state: TaskState, node_id: str, now: float, lease_ttl_s: float) -> Start:
    """A claimed waiting task starts a new attempt: next fence, one attempt more."""
    assert state.status is Status.WAITING, "only a waiting task is claimed"
    attempt = state.attempts_used + 1
    return Start(
        task_id=state.id,
        fence=state.fence + 1,
        attempts_used=attempt,
        owner_node=node_id,
        lease_expires_at=now + lease_ttl_s,
        at=now,
        reason=claim_reason(node_id, attempt, state.max_attempts),
    )


def plan_finish(state: TaskState, fence: int, outcome: Outcome, now: float) -> Ending:
    """The end of an attempt its runner reported (`LeaseLost` if `fence` is stale)."""
    check_fence(state, fence)
    transition = decide_finish(
        outcome,
        attempts_used=state.attempts_used,
        max_attempts=state.max_attempts,
        backoff_s=state.retry_backoff_s,
        now=now,
        cancel_requested=state.cancel_requested is not None,
        max_delay_s=state.retry_max_delay_s,
        jitter=state.retry_jitter,
        unit=jitter_unit(state.id, state.attempts_used),
        retry_on=state.retry_on,
    )
    return _ending(state, transition, now, outcome.kind, outcome.exit_code)


def _orphan_ending(state: TaskState, reason: str, now: float, how: Settlement) -> Ending:
    transition = decide_orphan(
        attempts_used=state.attempts_used,
        max_attempts=state.max_attempts,
        reason=reason,
        cancel_requested=state.cancel_requested is not None,
        retry_on=state.retry_on,
    )
    return _ending(state, transition, now, how, None)


def plan_rescue(state: TaskState, owner_heartbeat_at: float | None, now: float) -> Ending:
    """The end of a running attempt whose lease expired (the caller found it so)."""
    assert state.status is Status.RUNNING
    assert state.lease_expires_at is not None
    reason = rescue_reason(state.owner_node, owner_heartbeat_at, state.lease_expires_at)
    return _orphan_ending(state, reason, now, Settlement.RESCUED)


def plan_orphan_settlement(state: TaskState, fence: int, reason: str, now: float) -> Ending | None:
    """The end of an attempt whose node died, or None if it was settled already
    (it no longer runs under `fence`): settling twice is harmless."""
    if state.status is not Status.RUNNING or state.fence != fence:
        return None
    return _orphan_ending(state, reason, now, Settlement.ORPHANED)


def plan_handback(state: TaskState, node_id: str, stop_reason: str, now: float) -> Ending:
    """The end of a running attempt its node gives back as it stops: refunded."""
    transition = decide_handback(
        handback_reason(node_id, stop_reason), cancel_requested=state.cancel_requested is not None
    )
    return _ending(state, transition, now, Settlement.HANDED_BACK, None)


def plan_cancel(state: TaskState, *, force: bool, now: float) -> Ending | CancelRequest | None:
    """A waiting task is cancelled at once; the owner of a running one is asked to
    stop it (a forced request is never weakened by a later graceful one); a finished
    task is left alone (None)."""
    if state.status is Status.WAITING:
        transition = Transition(Status.CANCELLED, False, reason="cancelled while waiting")
        return _ending(state, transition, now, None, None)
    if state.status is Status.RUNNING:
        forced = force or state.cancel_requested == CancelMode.FORCE
        mode = CancelMode.FORCE if forced else CancelMode.GRACEFUL
        event = TaskEvent(
            UNNUMBERED,
            state.id,
            now,
            state.fence,
            state.owner_node,
            Status.RUNNING,
            Status.RUNNING,
            f"cancel requested ({mode})",
        )
        return CancelRequest(mode, event)
    return None


def plan_replace(state: TaskState, new_task_id: int, unique_key: str, now: float) -> Ending:
    """A waiting task with `unique_key` gives way to task `new_task_id`, submitted
    with the same key and `on_conflict="replace_waiting"`: cancelled, naming it."""
    assert state.status is Status.WAITING, "only a waiting task is replaced"
    transition = Transition(
        Status.CANCELLED, False, reason=replaced_reason(new_task_id, unique_key)
    )
    return _ending(state, transition, now, None, None)


#: The `not_before` of a task held back until its dependencies (`TaskSpec.after`) have
#: all succeeded. There is no status for it: a held task is `waiting` with a start
#: time no clock reaches, so every claim (which takes only `not_before <= now`) skips
#: it with no change, and a unique key or a schedule's overlap sees it as waiting.
#: Both SQL columns hold infinity (SQLite REAL, PostgreSQL DOUBLE PRECISION); the
#: time the caller asked for is kept aside (`after_not_before`) and restored when the
#: last dependency succeeds (the triggers of SQLite migration 0009, PostgreSQL 0013).
HELD_FOR_DEPENDENCIES = math.inf


@dataclass(frozen=True, slots=True)
class DependencyStart:
    """How a task with dependencies starts out, as its submit found them: held until
    they succeed (`held`), claimable at once (all succeeded already), or cancelled
    with `cancel_reason` (one of them ended otherwise)."""

    held: bool
    cancel_reason: str | None = None


def plan_dependencies(
    after: Sequence[int],
    found: Mapping[int, Status],
    reasons: Mapping[int, str | None] | None = None,
) -> DependencyStart:
    """A task that runs `after` these ids, given the statuses `found` of those that
    exist (and their `reasons`): `InvalidTask` naming the missing ones (nothing is
    stored then). A task cancelled at once says what a cascade would have said: a
    dependency cancelled by a cascade is named with that cascade's first reason."""
    missing = [task_id for task_id in after if task_id not in found]
    if missing:
        named = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise InvalidTask(f"after names no existing task: {named}")
    for task_id in after:  # ascending: the lowest id that ended badly is named
        status = found[task_id]
        if status.is_terminal and status is not Status.SUCCEEDED:
            root = dependency_root((reasons or {}).get(task_id))
            said = (
                dependency_chain_reason(task_id, root)
                if status is Status.CANCELLED and root is not None
                else dependency_reason(task_id, status)
            )
            return DependencyStart(held=False, cancel_reason=said)
    return DependencyStart(held=any(found[i] is not Status.SUCCEEDED for i in after))


def plan_dependency_cancel(state: TaskState, reason: str, now: float) -> Ending:
    """A waiting task cancelled because a dependency ended without succeeding."""
    assert state.status is Status.WAITING, "only a waiting task is cancelled for a dependency"
    return _ending(state, Transition(Status.CANCELLED, False, reason=reason), now, None, None)


def cascade_reasons(
    root_id: int,
    root_status: Status,
    waiting_dependants: Callable[[int], Iterable[int]],
    after: Callable[[int], Sequence[int]],
) -> dict[int, str]:
    """Task `root_id` ended in `root_status`, not succeeded: every waiting task that
    runs after it, directly or down a chain, is cancelled; each one's reason. A
    direct dependant names the root; one further down names the lowest of its own
    dependencies cancelled in the same cascade, and the root's reason. The SQL
    triggers decide the same in one statement (SQLite 0009, PostgreSQL 0013)."""
    root_reason = dependency_reason(root_id, root_status)
    doomed: set[int] = set()
    frontier = [root_id]
    while frontier:
        found = {d for task_id in frontier for d in waiting_dependants(task_id)} - doomed
        doomed |= found
        frontier = sorted(found)
    reasons = {}
    for task_id in sorted(doomed):
        deps = after(task_id)
        if root_id in deps:
            reasons[task_id] = root_reason
        else:
            parent = min(d for d in deps if d in doomed)
            reasons[task_id] = dependency_chain_reason(parent, root_reason)
    return reasons


def keyed_conflict(live: TaskState | None, on_conflict: str) -> tuple[int | None, int | None]:
    """What a submit with a unique key does, given the live task holding the key
    (None: none): `(existing, replaced)`: the id to return instead of storing a
    new task (the submit is rejected), or the id of the waiting task to cancel
    before storing it. A running task is never replaced: the submit is rejected."""
    if live is None:
        return None, None
    if on_conflict == "replace_waiting" and live.status is Status.WAITING:
        return None, live.id
    return live.id, None


#: The id of an event a decision returns: the store numbers it as it appends it.
UNNUMBERED = 0


def logged_transition(
    old: TaskState | None, new: TaskState, at: float, reason: str
) -> TaskEvent | None:
    """The event a change of a task logs, or None: a task logs its submission and every
    change of status or fence, with the attempt's fence and node when it starts or
    leaves `running`. (The SQL stores' triggers, in their first migration, say the
    same; the contract suite compares the event logs.)"""
    if old is None:
        return TaskEvent(UNNUMBERED, new.id, at, None, None, None, new.status, reason)
    if new.status is old.status and new.fence == old.fence:
        return None
    fence: int | None
    if new.status is Status.RUNNING:
        fence, node = new.fence, new.owner_node
    else:
        fence = old.fence if old.status is Status.RUNNING else None
        node = old.owner_node
    return TaskEvent(UNNUMBERED, new.id, at, fence, node, old.status, new.status, reason)
