"""LISTEN on a PostgreSQL channel, on a connection of its own, for as long as it takes.

`listen_forever` connects (shielded, bounded by its timeout: a connect cancelled
half-way leaks its socket), LISTENs, and calls `on_payload` with each notification's
payload, and with None on every (re)connection (anything may have been sent while
nobody listened); it reconnects with backoff when the connection drops, and
terminates the connection on exit. The work watcher (`PostgresStore.watch_for_work`)
and the cancel watcher (`PostgresStore.watch_for_cancels`) run on it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio

from .._redact import dsn_secrets, redact

log = logging.getLogger("taskpool")

#: The channel the schema's triggers NOTIFY, at commit, once per transaction that made
#: work claimable ('work') or only ended tasks ('end'); see migration 0007 and `Wake`.
WORK_CHANNEL = "taskpool_work"

#: The channel migration 0009's trigger NOTIFYs, at commit, with the owning node's id
#: as payload, when a cancel is asked of a running task.
CANCEL_CHANNEL = "taskpool_cancel"


async def listen_forever(
    dsn: str,
    channel: str,
    on_payload: Callable[[str | None], None],
    *,
    connect_timeout_s: float,
    application_name: str,
) -> None:
    """Call `on_payload` with the payload of every notification on `channel`, and with
    None on every (re)connection, until cancelled. `application_name` names the
    connection in pg_stat_activity."""
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
            await conn.add_listener(channel, lambda *args: on_payload(args[-1]))
            on_payload(None)
            while not conn.is_closed():  # checked too, should the listener not fire
                with anyio.move_on_after(1.0):
                    await lost.wait()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning(
                "LISTEN %s connection lost: %s", channel, redact(repr(exc), secrets=secrets)
            )
        finally:
            conn.terminate()
