"""LISTEN on PostgreSQL channels, on one connection per store, for as long as it takes.

`Listener.watch` calls a callback with each notification's payload on a channel, and
with None on every (re)connection (anything may have been sent while nobody
listened). Every watcher of a store shares one connection, whatever its channels: a
node's work watcher and cancel watcher (`PostgresStore.watch_for_work`,
`watch_for_cancels`) cost one connection, not one each, so a node's connections do
not grow with what it watches. One of the watchers runs the connection (connects,
shielded and bounded by its timeout: a connect cancelled half-way leaks its socket;
reconnects with backoff when it drops; terminates it on exit); when that watcher
leaves, another takes over.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio

from .._redact import dsn_secrets, redact

log = logging.getLogger("taskpool")

#: The channel the schema's triggers NOTIFY, at commit, once per transaction that made
#: work claimable ('work') or only ended tasks ('end'); see migration 0007 and `Wake`.
WORK_CHANNEL = "taskpool_work"

#: The channel migration 0009's trigger NOTIFYs, at commit, with the owning node's id
#: as payload, when a cancel is asked of a running task.
CANCEL_CHANNEL = "taskpool_cancel"


Callback = Callable[[str | None], None]


class Listener:
    """One LISTEN connection shared by every watcher of a store."""

    def __init__(self, dsn: str, *, connect_timeout_s: float, application_name: str) -> None:
        self._dsn = dsn
        self._connect_timeout_s = connect_timeout_s
        #: Names the connection in pg_stat_activity.
        self.application_name = application_name
        self._watchers: dict[str, list[Callback]] = {}
        self._conn: Any = None  # the live connection, while one is up
        self._listening: set[str] = set()  # channels LISTENed on `_conn`
        self._lock = anyio.Lock()  # one LISTEN command at a time on the connection
        self._running = False
        self._runner_left = anyio.Event()

    async def watch(self, channel: str, callback: Callback) -> None:
        """Call `callback` with the payload of every notification on `channel`, and with
        None on every (re)connection, until cancelled."""
        self._watchers.setdefault(channel, []).append(callback)
        try:
            if self._conn is not None:
                await self._listen(self._conn, channel)
                callback(None)
            while True:
                if not self._running:
                    self._running = True
                    try:
                        await self._run()
                    finally:
                        self._running = False
                        self._runner_left.set()
                        self._runner_left = anyio.Event()
                await self._runner_left.wait()  # take over should the runner leave
        finally:
            self._watchers[channel].remove(callback)
            if not self._watchers[channel]:
                del self._watchers[channel]

    def _dispatch(self, channel: str, payload: str | None) -> None:
        for callback in list(self._watchers.get(channel, ())):
            callback(payload)

    async def _listen(self, conn: Any, channel: str) -> None:
        async with self._lock:
            if channel in self._listening or conn.is_closed():
                return
            self._listening.add(channel)
            await conn.add_listener(channel, lambda *args: self._dispatch(channel, args[-1]))

    async def _run(self) -> None:
        """Keep the connection up, LISTENing on every watched channel, until cancelled."""
        import asyncpg

        secrets = dsn_secrets(self._dsn)
        delay = 0.1
        while True:
            try:
                with anyio.CancelScope(shield=True):
                    conn = await asyncpg.connect(
                        self._dsn,
                        timeout=self._connect_timeout_s,
                        server_settings={"application_name": self.application_name},
                    )
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning(
                    "LISTEN connection failed, retrying in %.1f s: %s",
                    delay,
                    redact(repr(exc), secrets=secrets),
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.1
            lost = anyio.Event()
            try:
                conn.add_termination_listener(lambda _, lost=lost: lost.set())
                self._conn, self._listening = conn, set()
                for channel in list(self._watchers):
                    await self._listen(conn, channel)
                for channel in list(self._watchers):
                    self._dispatch(channel, None)
                while not conn.is_closed():  # checked too, should the listener not fire
                    with anyio.move_on_after(1.0):
                        await lost.wait()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("LISTEN connection lost: %s", redact(repr(exc), secrets=secrets))
            finally:
                self._conn = None
                conn.terminate()
