"""Recovery: settling attempts whose owner is gone, or that no runner runs.

- `reconcile_predecessors`: at boot, before any claim, and again by the reaper, a
  pool settles what dead pools on its host left running: it kills their leftovers
  (exactly by cgroup where the attempt had one, else by recorded pid, start time and
  marker) and re-queues or fails their attempts.
- `rescue_expired`: the reaper re-queues (or marks lost) attempts of any node whose
  leases ran out, never this node's own running ones.
- `Strays` and `hand_back_strays`: leases this node holds but runs nothing for (a
  claim that committed after its call gave up) are handed back once seen at two
  renewals in a row.
- `release_and_stop`: after a pool's task group is gone, attempts whose runners were
  cancelled before reporting are released and the node is marked stopped.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Protocol, TypeVar

import anyio
import anyio.to_thread

from . import _procs
from ._containment import Containment
from ._decisions import Settlement
from ._errors import LeaseLost
from ._models import NodeInfo, Outcome, OutcomeKind
from ._store import Orphan, Store
from ._telemetry import Telemetry

T = TypeVar("T")


class StoreCall(Protocol):
    """Runs one store call, riding out outages (the pool's `_with_store`)."""

    def __call__(self, call: Callable[[], Awaitable[T]], /) -> Awaitable[T]: ...


async def reconcile_predecessors(
    store: Store,
    containment: Containment | None,
    node: NodeInfo,
    telemetry: Telemetry,
    *,
    at_boot: bool,
) -> None:
    """Settle what dead pools on this host left running: kill leftovers, re-queue or fail.

    Run at boot before any claim, and again by the reaper: a sibling pool on this host
    that dies is settled within a reaper interval, leftovers killed, without waiting
    for its leases to expire."""
    how_found = f"found at boot of node {node.id}" if at_boot else f"found by node {node.id}"
    for dead in await store.list_nodes(host=node.host, alive=True):
        if dead.id == node.id or _procs.is_same_process(dead.pid, dead.pid_started_at):
            continue  # a live pool (maybe stopped with SIGSTOP): its leases will tell
        orphans = await store.orphans_of(dead.id)
        leftovers = [
            _procs.Leftover(
                o.pid, o.pid_started_at, _procs.attempt_marker(store.store_id, o.task_id, o.fence)
            )
            for o in orphans
        ]
        # Off the event loop: exactly by cgroup where the attempt had one, else one
        # scan of the process table for all the others.
        killed = await anyio.to_thread.run_sync(reclaim, containment, dead.id, orphans, leftovers)
        for orphan, leftover in zip(orphans, leftovers, strict=True):
            kills = killed[leftover.marker]
            found = f"killed leftover {', '.join(kills)}" if kills else "no process was left"
            reason = f"owner node {dead.id} (pid {dead.pid}) died; {how_found}; {found}"
            info = await store.settle_orphan(orphan.task_id, orphan.fence, reason)
            telemetry.settled(info, Settlement.ORPHANED)
        if containment is not None:
            containment.forget_node(dead.id)
        await store.stop_node(dead.id, f"{how_found}: its process is gone")


def reclaim(
    containment: Containment | None,
    node_id: str,
    orphans: Sequence[Orphan],
    leftovers: Sequence[_procs.Leftover],
) -> dict[str, list[str]]:
    """Kill what orphaned attempts left: their cgroup where it exists (exact, no scan of
    the process table), else by recorded pid, start time and marker. Per marker, what
    was killed."""
    report: dict[str, list[str]] = {}
    rest = []
    for orphan, leftover in zip(orphans, leftovers, strict=True):
        name = f"{orphan.task_id}.{orphan.fence}"
        pids = None if containment is None else containment.reclaim(node_id, name)
        if pids is None:
            rest.append(leftover)
        elif pids:
            listed = ", ".join(map(str, pids))
            many = "processes" if len(pids) > 1 else "process"
            report[leftover.marker] = [f"cgroup of attempt {name} ({len(pids)} {many}: {listed})"]
        else:
            report[leftover.marker] = []
    report.update(_procs.kill_leftovers(rest))
    return report


async def rescue_expired(
    store: Store, call: StoreCall, running: Collection[tuple[int, int]], telemetry: Telemetry
) -> bool:
    """Re-queue (or mark lost) attempts whose lease expired; True if any was.

    Never this node's own `running` attempts: their runners stop them before their
    lease runs out and hand them back (see `_leases.fence_before_expiry`). `running` is
    read again at each try, so a retry after an outage spares what runs by then."""
    rescued = await call(lambda: store.rescue_expired(except_attempts=set(running)))
    for info in rescued:
        telemetry.settled(info, Settlement.RESCUED)
    return bool(rescued)


def confirm_strays(
    held: Mapping[int, int], running: Collection[tuple[int, int]], suspects: Mapping[int, int]
) -> tuple[dict[int, int], dict[int, int]]:
    """Of the leases held (task id -> fence) that no runner runs, those that were
    suspects at the last renewal too (confirmed strays), and the new suspects. Pure."""
    strays = {t: f for t, f in held.items() if (t, f) not in running}
    confirmed = {t: f for t, f in strays.items() if suspects.get(t) == f}
    return confirmed, {t: f for t, f in strays.items() if t not in confirmed}


class Strays:
    """Leases this node holds but runs nothing for, seen at two renewals in a row: a
    claim that committed after its call gave up (a timeout, a lost reply). Without
    handing them back the heartbeat would renew them forever and block their template.
    Seen once, a lease may be a claim still on its way to its runner."""

    def __init__(self) -> None:
        self._suspects: dict[int, int] = {}  # task id -> fence, from the last renewal

    def confirm(
        self, held: Mapping[int, int], running: Collection[tuple[int, int]]
    ) -> dict[int, int]:
        """Given what a renewal says this node holds, the strays to hand back now."""
        confirmed, self._suspects = confirm_strays(held, running, self._suspects)
        return confirmed


async def hand_back_strays(
    store: Store,
    call: StoreCall,
    strays: Mapping[int, int],
    *,
    node_id: str,
    telemetry: Telemetry,
    handed_back: Callable[[], None],
) -> None:
    """Hand back each stray lease (task id -> fence) without using an attempt, calling
    `handed_back` after each (its task may be claimed again)."""
    outcome = Outcome(
        OutcomeKind.SHUTDOWN,
        f"handed back without using an attempt: node {node_id} held the lease"
        " but never started the task",
    )
    for task_id, fence in strays.items():
        with contextlib.suppress(LeaseLost):  # settled by someone else meanwhile
            info = await call(functools.partial(store.finish, task_id, fence, outcome))
            telemetry.settled(info, Settlement.HANDED_BACK)
        handed_back()


async def release_and_stop(
    store: Store,
    node_id: str,
    interrupted: Mapping[int, int],
    failure: BaseException | None,
    telemetry: Telemetry,
) -> None:
    """After a pool's task group is gone: release the attempts whose runners were
    cancelled before reporting (task id -> fence: a crash, a shutdown that ran out of
    time), then mark the node stopped. Best effort, once: the store may be what failed,
    and the next boot on this host settles what is left."""
    why = f"pool crashed ({failure!r})" if failure else "shutdown did not finish in time"
    for task_id, fence in interrupted.items():
        try:
            await store.finish(task_id, fence, Outcome(OutcomeKind.SHUTDOWN, f"interrupted: {why}"))
        except Exception as exc:  # the store may be what failed; boot will reconcile
            telemetry.note(
                logging.WARNING,
                "release_failed",
                "could not release task %s after crash: %r",
                task_id,
                exc,
                task_id=task_id,
            )
    try:
        reason = "stopped" if failure is None else f"crashed: {failure!r}"
        await store.stop_node(node_id, reason)
    except Exception as exc:
        telemetry.note(logging.WARNING, "stop_failed", "could not mark the node stopped: %r", exc)
