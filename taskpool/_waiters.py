"""One status read for all of a client's waiters.

A client may have a thousand `wait()` calls in flight. If each re-read its own task on
every change notification, one change would cost the store a thousand reads. Instead
every waiting caller (`Client.wait`, and `Client.follow` for its status check)
registers its task id here, and one read for all of them follows each change, at
most once per `first_s` however many changes are notified, and otherwise on a
polling backoff (`first_s` doubling up to `max_s`, started again when a caller
registers). The read is one query that returns the ended tasks among all those
watched (`Store.get_many(..., ended_only=True)`: no row for the many still waiting or
running), plus, when callers have just registered, one that checks their tasks
exist (`Store.statuses`). Only the callers whose task ended (or does not exist) are
woken, an ended one with its task in hand.

The read is made by one of the parked callers at a time, the *reader*: whoever parks
while nobody reads takes the turn and keeps it for as long as it stays parked; when it
leaves (its task ended, its timeout ran out, it was cancelled, a follower has output
to read) it hands the turn to another parked caller. So no task of its own runs beside
the callers: nothing can outlive them, and a `Client` that was never entered shares its
reads all the same. A cancelled read is simply made again by the next reader.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterator

import anyio

from ._errors import StoreError
from ._models import TaskInfo
from ._store import Store


class Settled(enum.Enum):
    """What a shared read found out for a watch. But for `ENDED` (the task is in
    `Watch.info`), the caller then reads its task itself: one `get`, whose answer or
    error is its own."""

    ENDED = "ended"  # the task is terminal: `Watch.info`
    MISSING = "missing"  # no task has this id
    READ_FAILED = "read failed"  # the shared read raised a StoreError


class Watch:
    """One caller's registration: its task id and what the shared reads found for it."""

    __slots__ = ("_nudge", "follows", "info", "poked", "settled", "task_id")

    def __init__(self, task_id: int, *, follows: bool) -> None:
        self.task_id = task_id
        self.follows = follows  # a follower: woken by output activity too
        self.settled: Settled | None = None
        self.info: TaskInfo | None = None  # the ended task, when settled ENDED
        self.poked = False  # output may have arrived (followers only)
        self._nudge = anyio.Event()

    def __repr__(self) -> str:
        return f"<Watch task={self.task_id} settled={self.settled}>"

    def nudge(self) -> None:
        """Wake the caller parked on this watch, to look at the shared state again."""
        self._nudge.set()

    async def nudged(self) -> None:
        await self._nudge.wait()
        # Nudges that came meanwhile are folded into this one: every reason for a nudge
        # is state the caller now reads (settled, poked, the reader's turn, a change).
        self._nudge = anyio.Event()


class StatusReads:
    """The registered watches of one client and the state of their shared reads."""

    def __init__(
        self,
        store: Store,
        *,
        first_s: float,
        delays: Callable[[], Iterator[float]],
        on_pause: Callable[[], None],
    ) -> None:
        self._store = store
        self._first_s = first_s  # reads are at least this far apart
        self._new_delays = delays  # the polling backoff, started anew on each registration
        self._delays = delays()
        self._on_pause = on_pause  # called before a parked caller sleeps
        self._watches: dict[int, list[Watch]] = {}  # by task id
        self._unconfirmed: set[int] = set()  # watched ids no read has found to exist yet
        self._followers: dict[Watch, None] = {}
        self._parked: dict[Watch, None] = {}  # in parking order
        self._reader: Watch | None = None
        self._changed = False  # a change or a registration since the last read began
        self._last_read = -math.inf
        self._next_poll = -math.inf

    # -- what callers and the client tell ------------------------------------------
    def register(self, task_id: int, *, follows: bool = False) -> Watch:
        """Watch `task_id` until `unregister`; the next read (soon) includes it."""
        watch = Watch(task_id, follows=follows)
        if task_id not in self._watches:
            self._unconfirmed.add(task_id)
        self._watches.setdefault(task_id, []).append(watch)
        if follows:
            self._followers[watch] = None
        self._delays = self._new_delays()
        self._read_soon()
        return watch

    def unregister(self, watch: Watch) -> None:
        self._followers.pop(watch, None)
        same = self._watches.get(watch.task_id, [])
        if watch in same:
            same.remove(watch)
        if not same:
            self._watches.pop(watch.task_id, None)
            self._unconfirmed.discard(watch.task_id)

    def changed(self) -> None:
        """A task's status may have changed: read again (at most once per `first_s`)."""
        self._read_soon()

    def output_arrived(self) -> None:
        """A task may have new output: wake its followers."""
        for watch in self._followers:
            watch.poked = True
            watch.nudge()

    def _read_soon(self) -> None:
        self._changed = True
        if self._reader is not None:
            self._reader.nudge()  # to wait for the next read's time instead of a poll's

    @property
    def reading_for(self) -> int:
        """How many task ids the shared read covers now."""
        return len(self._watches)

    # -- parked callers ------------------------------------------------------------
    async def park(self, watch: Watch, *, budget_s: float = math.inf) -> None:
        """Until `watch` is settled, poked (a follower's output), or `budget_s` has
        passed; reading for everybody meanwhile when it is this caller's turn."""
        deadline = anyio.current_time() + budget_s
        self._parked[watch] = None
        try:
            while watch.settled is None and not watch.poked:
                now = anyio.current_time()
                if now >= deadline:
                    return
                if self._reader is None:
                    self._reader = watch
                wake_at = deadline
                if self._reader is watch:
                    due = self._last_read + self._first_s if self._changed else self._next_poll
                    if now >= due:
                        await self._read()
                        continue
                    wake_at = min(due, deadline)
                self._on_pause()
                with anyio.move_on_after(wake_at - now):
                    await watch.nudged()
            watch.poked = False
        finally:
            del self._parked[watch]
            if self._reader is watch:
                self._reader = None
            if self._reader is None:
                self._offer_turn()

    def _offer_turn(self) -> None:
        """Wake the longest parked caller that stays parked, to take the reader's turn
        (one that is leaving passes it on in its turn, see `park`)."""
        for successor in self._parked:
            if successor.settled is None and not successor.poked:
                successor.nudge()
                return

    async def _read(self) -> None:
        """One read for every watched task; settles the watches it decides."""
        task_ids = list(self._watches)
        unconfirmed = [t for t in task_ids if t in self._unconfirmed]
        self._changed = False
        self._last_read = anyio.current_time()
        self._next_poll = self._last_read + next(self._delays)
        try:
            found = await self._store.statuses(unconfirmed) if unconfirmed else {}
            ended = await self._store.get_many(task_ids, ended_only=True)
        except StoreError:
            # Every caller reads for itself instead: an outage reaches each as its own
            # read's error, as it would without sharing.
            self._settle({t: (Settled.READ_FAILED, None) for t in task_ids})
            return
        except BaseException:
            self._changed = True  # not read (cancelled): the next reader reads at once
            raise
        self._unconfirmed.difference_update(found)
        verdicts: dict[int, tuple[Settled, TaskInfo | None]] = {
            t: (Settled.MISSING, None) for t in unconfirmed if t not in found
        }
        verdicts.update((t, (Settled.ENDED, info)) for t, info in ended.items())
        self._settle(verdicts)

    def _settle(self, verdicts: dict[int, tuple[Settled, TaskInfo | None]]) -> None:
        for task_id, (settled, info) in verdicts.items():
            for watch in self._watches.get(task_id, []):
                if watch.settled is None:
                    watch.settled, watch.info = settled, info
                    watch.nudge()
