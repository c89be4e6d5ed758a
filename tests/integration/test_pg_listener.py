"""PostgreSQL: every watcher of a store shares one LISTEN connection, which outlives
the watcher that opened it and comes back when the server drops it."""

from __future__ import annotations

import anyio
import asyncpg

from taskpool.stores._postgres_listen import Listener
from tests.helpers import SAFETY_TIMEOUT_S, eventually
from tests.postgres import fresh_postgres_database


class Heard:
    def __init__(self) -> None:
        self.payloads: list[str | None] = []

    def __call__(self, payload: str | None) -> None:
        self.payloads.append(payload)

    async def heard(self, payload: str | None) -> None:
        async def check() -> bool:
            return payload in self.payloads

        await eventually(check)


async def test_watchers_of_two_channels_share_one_connection_that_survives_its_opener() -> None:
    """Two watchers on two channels: one connection (by its application_name) delivers
    each channel's payloads to its own watcher only; when the watcher that runs the
    connection leaves, the other takes it over and still hears its channel; when the
    server terminates the connection, it comes back and says so (None)."""
    async with fresh_postgres_database() as dsn:
        listener = Listener(dsn, connect_timeout_s=10, application_name="taskpool listener t")
        admin = await asyncpg.connect(dsn)
        try:

            async def backends() -> list[int]:
                return [
                    r["pid"]
                    for r in await admin.fetch(
                        "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                        listener.application_name,
                    )
                ]

            work, cancels = Heard(), Heard()
            with anyio.fail_after(SAFETY_TIMEOUT_S):
                async with anyio.create_task_group() as tg:
                    opener = anyio.CancelScope()

                    async def watch_work() -> None:
                        with opener:
                            await listener.watch("chan_work", work)

                    tg.start_soon(watch_work)
                    await work.heard(None)  # connected: the opener runs the connection
                    tg.start_soon(listener.watch, "chan_cancel", cancels)
                    await cancels.heard(None)
                    await admin.execute("NOTIFY chan_work, 'w1'; NOTIFY chan_cancel, 'c1'")
                    await work.heard("w1")
                    await cancels.heard("c1")
                    assert work.payloads == [None, "w1"]
                    assert cancels.payloads == [None, "c1"]
                    first = await backends()
                    assert len(first) == 1

                    before = len(cancels.payloads)
                    opener.cancel()  # the watcher running the connection leaves

                    async def taken_over() -> list[int]:
                        pids = await backends()
                        return pids if len(pids) == 1 and pids != first else []

                    second = await eventually(taken_over)

                    async def listening_again() -> bool:
                        # The new connection's None comes after its LISTENs (a backend
                        # in pg_stat_activity may not be listening yet).
                        return None in cancels.payloads[before:]

                    await eventually(listening_again)
                    await admin.execute("NOTIFY chan_work, 'w2'; NOTIFY chan_cancel, 'c2'")
                    await cancels.heard("c2")
                    assert "w2" not in work.payloads  # its watcher left

                    before = len(cancels.payloads)
                    assert await admin.fetchval("SELECT pg_terminate_backend($1)", second[0])

                    async def reconnected() -> list[int]:
                        pids = await backends()
                        return pids if len(pids) == 1 and pids != second else []

                    await eventually(reconnected)

                    async def said_so() -> bool:
                        return None in cancels.payloads[before:]

                    await eventually(said_so)
                    await admin.execute("NOTIFY chan_cancel, 'c3'")
                    await cancels.heard("c3")
                    tg.cancel_scope.cancel()

            async def closed() -> bool:
                return not await backends()

            await eventually(closed)
        finally:
            await admin.close()
