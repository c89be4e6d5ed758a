"""LISTEN on a PostgreSQL channel, on a connection of its own, for as long as it takes.

`listen_forever` connects (shielded, bounded by its timeout: a connect cancelled
half-way leaks its socket), LISTENs, and calls `on_notify` for each notification
carrying its payload (the node's own id) and on every (re)connection (one may have
been sent while nobody listened); it reconnects with backoff when the connection
drops, and terminates the connection on exit. The cancel watcher
(`PostgresStore.watch_for_cancels`) runs on it; `watch_for_work` keeps its own loop
of the same shape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio

from .._redact import dsn_secrets, redact

log = logging.getLogger("taskpool")

#: The channel migration 0009's trigger NOTIFYs, at commit, with the owning node's id
#: as payload, when a cancel is asked of a running task.
CANCEL_CHANNEL = "taskpool_cancel"


async def listen_forever(
    dsn: str,
    channel: str,
    on_notify: Callable[[], None],
    *,
    payload: str,
    connect_timeout_s: float,
    application_name: str,
) -> None:
    """Call `on_notify` for every notification on `channel` that carries `payload`, and
    on every (re)connection, until cancelled. `application_name` names the connection
    in pg_stat_activity."""
    import asyncpg

    secrets = dsn_secrets(dsn)
    delay = 0.1
    while True:
        try:
            with anyio.CancelScope(shield=True):
                conn = await asyncpg.connect(
                    dsn,
                    timeout=connect_timeout_s,
                    server_settings={"application_name": application_name},
                )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning(
                "LISTEN %s connection failed, retrying in %.1f s: %s",
                channel,
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
            await conn.add_listener(channel, lambda *args: _heard(args[-1], payload, on_notify))
            on_notify()
            while not conn.is_closed():  # checked too, should the listener not fire
                with anyio.move_on_after(1.0):
                    await lost.wait()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning(
                "LISTEN %s connection lost: %s", channel, redact(repr(exc), secrets=secrets)
            )
        finally:
            conn.terminate()


def _heard(got: object, wanted: str, on_notify: Callable[[], None]) -> None:
    if got == wanted:  # another node's notification: not ours to act on
        on_notify()
