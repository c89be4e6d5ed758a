"""Cancels that land at once: the pool's cancel watcher.

A cancel asked from another process (the CLI, a web page, a `Client`) is written on
the task's row. The heartbeat's renewal brings it to the owning pool, but only at the
next heartbeat (seconds). The watcher brings it within milliseconds: the store pushes
a wake-up when a cancel may have been asked for one of this node's tasks
(`Store.watch_for_cancels`: PostgreSQL NOTIFY, a cheap SQLite change check, an
in-process call for `MemoryStore`), the watcher reads this node's cancel requests
(`Store.cancel_requests`) and stops those runners exactly as the heartbeat would
(`_leases.stop_cancelled`). The heartbeat stays the fallback: a wake-up lost in an
outage, or a read that fails, only delays the cancel to the next renewal.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping

import anyio

from ._errors import StoreError, StoreUnavailable
from ._leases import Key, stop_cancelled
from ._models import CancelMode
from ._runner import RunnerControl
from ._store import Store

log = logging.getLogger("taskpool")


def cancels_to_deliver(
    requests: Mapping[int, tuple[int, CancelMode]], running: Collection[Key]
) -> dict[Key, bool]:
    """The running attempts asked to cancel, each with whether the cancel is forced.
    Pure. A request for an attempt the pool does not run (ended, or an older fence of
    a task it claimed again) does nothing."""
    return {
        (task_id, fence): mode is CancelMode.FORCE
        for task_id, (fence, mode) in requests.items()
        if (task_id, fence) in running
    }


class CancelWatcher:
    """Stops this node's runners whose tasks an operator cancelled, as soon as the
    store says a cancel may have come."""

    def __init__(
        self,
        store: Store,
        node_id: str,
        runners: Mapping[Key, RunnerControl],
        *,
        read_timeout_s: float,
    ) -> None:
        self._store = store
        self._node_id = node_id
        self._runners = runners
        self._read_timeout_s = read_timeout_s
        self._changed = anyio.Event()

    def _wake(self) -> None:
        self._changed.set()

    async def run(self) -> None:
        """Watch and deliver until cancelled."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                self._store.watch_for_cancels, self._node_id, self._wake, name="taskpool cancels"
            )
            while True:
                await self._changed.wait()
                # A new event before the read: a cancel written during it wakes us again.
                self._changed = anyio.Event()
                await self.deliver()

    async def deliver(self) -> None:
        """Read this node's cancel requests and stop the runners they name. A failed
        read is left to the heartbeat (or the next wake-up): the pool must not crash
        for what is only a faster path."""
        try:
            with anyio.fail_after(self._read_timeout_s):
                requests = await self._store.cancel_requests(self._node_id)
        except (StoreUnavailable, TimeoutError) as exc:
            log.debug("cancel requests not read, left to the heartbeat: %s", exc)
            return
        except StoreError as exc:
            log.warning("cancel requests not read, left to the heartbeat: %s", exc)
            return
        # No checkpoint from here on: every key still names a runner of `_runners`.
        stop_cancelled(cancels_to_deliver(requests, self._runners.keys()), self._runners)
