"""Lease keeping for a pool's running attempts.

A node may run an attempt only while it holds the attempt's lease. What this module
keeps, for the pool's heartbeat and lease-guard loops:

- `LeaseBook`: when each running attempt's lease surely runs out, on the system's
  monotonic clock (time.monotonic(), which the guard process shares): the time its
  claim or last renewal was *sent*, plus the TTL. The store computes its expiry when
  the request arrives, so the store's is never earlier than ours.
- the pure decisions over it: what a renewal's answer means for each running attempt
  (`judge_renewal`), which attempts must stop now because their lease could not be
  renewed (`fencing_due`), and the node guard's deadline;
- self-fencing (`fence_before_expiry`): an attempt whose lease could not be renewed is
  stopped `self_fence_margin_s` before it runs out, so a copy a rescuer starts after
  expiry never overlaps it;
- `NodeGuard`: the pool's side of the node's guard process (see _guard.py), which kills
  attempts whose lease ran out when this process cannot (frozen, dead).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NoReturn

import anyio

from ._attempt_process import AttemptWatcher
from ._containment import Box, CgroupBox, Containment
from ._guard import Guard, GuardError
from ._models import CancelMode
from ._runner import RunnerControl, StopKind
from ._store import Renewal
from ._telemetry import Telemetry

#: An attempt: (task id, fence).
Key = tuple[int, int]


def self_fence_margin_s(lease_ttl_s: float) -> float:
    """How long before its lease runs out an attempt that could not be renewed is
    stopped: room for a late wake-up of the lease guard and for the kill itself."""
    return max(0.5, lease_ttl_s / 10)


def self_fence_reason(node_id: str, lease_ttl_s: float) -> str:
    return (
        f"self-fenced: node {node_id} could not renew the lease for"
        f" {lease_ttl_s - self_fence_margin_s(lease_ttl_s):g} s and stopped the attempt"
        " before it ran out, so that no copy started elsewhere overlaps it"
    )


class LeaseBook:
    """When each running attempt's lease surely runs out (time.monotonic()).

    It holds exactly the leases of the attempts the pool runs: granted when a runner
    starts, dropped when it ends, with no checkpoint between either and the runner's
    own bookkeeping."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.margin_s = self_fence_margin_s(ttl_s)
        self._deadlines: dict[Key, float] = {}

    def grant(self, key: Key, sent_at: float) -> None:
        """A claim sent at `sent_at` (monotonic) gave this node the attempt's lease."""
        self._deadlines[key] = sent_at + self.ttl_s

    def renew(self, keys: Iterable[Key], sent_at: float) -> None:
        """A renewal sent at `sent_at` extended these leases (those still running)."""
        for key in keys:
            if key in self._deadlines:
                self._deadlines[key] = sent_at + self.ttl_s

    def drop(self, key: Key) -> None:
        self._deadlines.pop(key, None)

    @property
    def deadlines(self) -> Mapping[Key, float]:
        return self._deadlines

    def guard_deadline(self, key: Key) -> float:
        """The guard acts after the pool's own self-fencing would, before the lease ends."""
        return self._deadlines.get(key, time.monotonic()) - self.margin_s / 2

    def node_guard_deadline(self, now: float) -> float:
        """The guard's deadline for the node's cgroup: never later than any running
        attempt's lease (with none running, a lease claimed now)."""
        earliest = min(self._deadlines.values(), default=now + self.ttl_s)
        return earliest - self.margin_s / 2


@dataclass(frozen=True, slots=True)
class RenewalVerdict:
    """What a renewal's answer means for each attempt that was running when it was sent."""

    renewed: list[Key] = field(default_factory=list)  # still ours: the lease runs on
    self_fenced: list[Key] = field(default_factory=list)  # ran out unrenewed: hand back
    lost: list[Key] = field(default_factory=list)  # another node owns the task now
    cancels: dict[Key, bool] = field(default_factory=dict)  # asked to cancel: forced?


def judge_renewal(
    running: Iterable[Key], renewal: Renewal, deadlines: Mapping[Key, float], now: float
) -> RenewalVerdict:
    """Sort the attempts running when the renewal was sent by what it answered. Pure.

    An attempt the store no longer lists as held was either not renewed because its
    lease ran out while the store was unreachable (or this process was paused), so it
    is still ours unless rescued and is handed back; or its task is another node's."""
    verdict = RenewalVerdict()
    for key in running:
        task_id, fence = key
        if renewal.held.get(task_id) != fence:
            if deadlines.get(key, float("inf")) <= now:
                verdict.self_fenced.append(key)
            else:
                verdict.lost.append(key)
            continue
        if key in deadlines:  # not ended while the renewal was on its way
            verdict.renewed.append(key)
        if task_id in renewal.cancel_requests:
            verdict.cancels[key] = renewal.cancel_requests[task_id] == CancelMode.FORCE
    return verdict


def act_on_renewal(
    verdict: RenewalVerdict, runners: Mapping[Key, RunnerControl], *, fence_reason: str
) -> None:
    """Stop the runners the verdict says must stop (each at once but a graceful cancel)."""
    for key in verdict.self_fenced:
        runners[key].stop(StopKind.SELF_FENCED, fence_reason, force=True)
    for key in verdict.lost:
        runners[key].stop(StopKind.LEASE_LOST, "lease lost: another node owns the task", force=True)
    stop_cancelled(verdict.cancels, runners)


def stop_cancelled(cancels: Mapping[Key, bool], runners: Mapping[Key, RunnerControl]) -> None:
    """Stop the attempts an operator asked to cancel (key -> forced?), however the
    request reached the pool: a renewal's answer or the cancel watcher (_cancels.py).
    Asking twice is harmless: a forced request escalates a graceful one in progress."""
    for key, force in cancels.items():
        runners[key].stop(StopKind.CANCELLED, "cancelled by request", force=force)


def fencing_due(
    deadlines: Mapping[Key, float],
    stoppable: Collection[Key],
    now: float,
    *,
    margin_s: float,
    check_every_s: float,
) -> tuple[list[Key], float]:
    """The attempts among `stoppable` whose lease runs out within `margin_s` of `now`,
    and when to look again (at the latest `check_every_s` from now: leases granted
    meanwhile run out later than that). Pure."""
    due: list[Key] = []
    wake_at = now + check_every_s
    for key, deadline in deadlines.items():
        if key not in stoppable:
            continue
        if deadline - margin_s <= now:
            due.append(key)
        else:
            wake_at = min(wake_at, deadline - margin_s)
    return due, wake_at


async def fence_before_expiry(
    leases: LeaseBook,
    runners: Mapping[Key, RunnerControl],
    *,
    reason: str,
    check_every_s: float,
) -> NoReturn:
    """Stop every attempt whose lease could not be renewed, before it runs out.

    A rescue happens only after expiry (on the database's clock, which is never ahead
    of our deadline): so a copy started by a rescuer never overlaps one of ours,
    whether the store is down, the network is cut or silent. The stopped attempt is
    handed back without using an attempt once the store answers."""
    while True:
        unforced = {key for key, control in runners.items() if not control.forced}
        due, wake_at = fencing_due(
            leases.deadlines,
            unforced,
            time.monotonic(),
            margin_s=leases.margin_s,
            check_every_s=check_every_s,
        )
        for key in due:
            runners[key].stop(StopKind.SELF_FENCED, reason, force=True)
        await anyio.sleep(max(wake_at - time.monotonic(), 0.01))


def node_deadline_stands(
    sent: float | None, wanted: float, now: float, renew_every_s: float
) -> bool:
    """Whether the node guard's deadline already sent can stay: it is no later than the
    one wanted, and far enough off that the next renewal moves it first. Pure."""
    return sent is not None and sent <= wanted and sent - now > renew_every_s


class NodeGuard:
    """The pool's side of the node's guard process (see _guard.py), which kills
    attempts whose lease ran out when this process cannot (frozen, dead).

    It remembers what the guard watches, to hand it all to a new guard should the
    process die, and says why there is no guard when there is none (never silently)."""

    def __init__(
        self,
        containment: Containment,
        node_id: str,
        leases: LeaseBook,
        *,
        renew_every_s: float,
        telemetry: Telemetry,
    ) -> None:
        self._containment = containment
        self._node_key = f"node:{node_id}"
        self._leases = leases
        self._renew_every_s = renew_every_s
        self._telemetry = telemetry
        self._process: Guard | None = None
        self.note = "off"
        # What it watches, to watch it again in a new guard: key -> (marker, pid, cgroup).
        self._watched: dict[Key, tuple[str, int, str | None]] = {}
        self._node_killed_at: float | None = None  # the guard killed the node's cgroup
        self._node_deadline_sent: float | None = None  # the guard's deadline for the node

    @property
    def process(self) -> Guard | None:
        """The guard process's handle, if one runs."""
        return self._process

    async def start(self, *, enabled: bool) -> None:
        """Start the guard process, or note why there is none."""
        if not enabled:
            self.note = "off (disabled)"
            return
        try:
            self._process = await Guard.start()
        except GuardError as exc:
            self._process, self.note = None, f"off (could not start: {exc})"
            return
        self.note = f"process {self._process.pid}"
        self._node_deadline_sent = None
        self.arm_node(force=True)

    async def check(self) -> None:
        """A dead guard kills nothing: start a new one and hand it every running attempt."""
        if self._process is None or self._process.alive:
            return
        self._telemetry.note(
            logging.WARNING, "guard_restarted", "the guard process died: starting a new one"
        )
        await self._process.close()
        await self.start(enabled=True)
        guard = self._process
        if guard is None:
            return
        for key, (marker, pid, cgroup) in list(self._watched.items()):
            deadline = self._leases.guard_deadline(key)
            guard.watch(marker, leader_pid=pid, cgroup=cgroup, deadline=deadline)

    def arm_node(self, *, force: bool = False) -> None:
        """In cgroup mode the guard watches the node's cgroup, which holds every attempt:
        it kills it whole when the pool dies, or when the earliest lease of the node's
        running attempts runs out unrenewed. So attempts need no message of their own.

        The guard's deadline must never be later than any running attempt's lease: new
        claims only bring later ones, so it is moved when a renewal comes (`force`), and
        moved later when attempts end only if it would otherwise fire before the next
        renewal (the attempts it was set for were stopped: an outage, a pause), lest it
        kill the node's fresh attempts. A watch the guard acted on is gone: each new one
        first collects the kill it may have reported."""
        guard, node_cgroup = self._process, self._containment.node_cgroup
        if guard is None or node_cgroup is None:
            return
        now = time.monotonic()
        deadline = self._leases.node_guard_deadline(now)
        sent = self._node_deadline_sent
        if not force and node_deadline_stands(sent, deadline, now, self._renew_every_s):
            return
        kill = guard.forget(self._node_key)
        if kill is not None:
            self._node_killed_at = kill.at
        guard.watch(self._node_key, leader_pid=None, cgroup=str(node_cgroup), deadline=deadline)
        self._node_deadline_sent = deadline

    def renewed(self, keys: Iterable[Key]) -> None:
        """Move the guard's deadlines of attempts whose leases the store has just renewed
        (only those: a deadline the store did not grant would outlive the lease)."""
        if self._process is not None:
            self._process.renew(
                {
                    self._watched[key][0]: self._leases.guard_deadline(key)
                    for key in keys
                    if key in self._watched
                }
            )

    def watcher(self, key: Key, marker: str, box: Box) -> AttemptWatcher:
        """What hands one attempt to the guard (the runner's `AttemptWatcher`)."""
        return _GuardWatch(self, key, marker, box)

    def node_kill_since(self, started_at: float) -> float | None:
        """When the guard killed the node's cgroup, if it did after `started_at`."""
        if self._process is not None:
            kill = self._process.killed().get(self._node_key)
            if kill is not None:
                self._node_killed_at = kill.at
        at = self._node_killed_at
        return at if at is not None and at >= started_at else None

    def watch_attempt(self, key: Key, marker: str, pid: int) -> None:
        self._watched[key] = (marker, pid, None)
        if self._process is not None:
            self._process.watch(marker, leader_pid=pid, deadline=self._leases.guard_deadline(key))

    def forget_attempt(self, key: Key, marker: str) -> str | None:
        """Stop watching the attempt (its leader exited); how the guard killed it, if it did."""
        self._watched.pop(key, None)
        kill = self._process.forget(marker) if self._process is not None else None
        if kill is None:
            return None
        return f"{kill.why}; {', '.join(kill.targets)}"

    def release_node(self) -> None:
        """Stop watching the node's cgroup (empty: every runner has ended)."""
        if self._process is not None:
            self._process.forget(self._node_key)

    async def close(self) -> None:
        """Stop the guard process (shielded and bounded)."""
        if self._process is not None:
            await self._process.close()


class _GuardWatch:
    """Hands one attempt to the node's guard (the runner's `AttemptWatcher`)."""

    def __init__(self, guard: NodeGuard, key: Key, marker: str, box: Box) -> None:
        self._guard = guard
        self._key = key
        self._marker = marker
        # A cgroup box lives in the node's cgroup, which the guard watches whole.
        self._in_node_cgroup = isinstance(box, CgroupBox)
        self._started_at = time.monotonic()

    def started(self, pid: int) -> None:
        if not self._in_node_cgroup:
            self._guard.watch_attempt(self._key, self._marker, pid)

    def exited(self) -> str | None:
        if self._in_node_cgroup:
            if self._guard.node_kill_since(self._started_at) is None:
                return None
            return (
                "stopped at lease expiry by the node's guard (no renewal came in time:"
                " it killed the node's cgroup)"
            )
        kill = self._guard.forget_attempt(self._key, self._marker)
        return None if kill is None else f"stopped at lease expiry by the node's guard ({kill})"
