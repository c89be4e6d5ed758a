"""Noticing, cheaply, that another connection committed to an SQLite file.

SQLite has no notifications between processes. `PRAGMA data_version` on a
connection of its own changes whenever any other connection (of this process or
another) has committed since that connection last asked, and reading it costs a few
microseconds: no page is read unless the database changed, no lock is waited for
(busy_timeout 0). So it is asked on the event loop itself, every `every_s`: a thread
hop per poll would cost more than the poll (benchmarks/bench.py, section `cancel`,
measures both, beside stat()ing the `-wal` file, which cannot tell two writes within
one tick of the file system's clock apart).

Only a change calls back: an idle pool's poll is one wake-up and one pragma.
"""

from __future__ import annotations

import logging
import sqlite3
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.to_thread

log = logging.getLogger("taskpool")

#: How often a watcher asks whether the file changed: the bound on a cancel's delay.
CHANGE_POLL_S = 0.05


def _connect(path: Path) -> sqlite3.Connection:
    # mode=rw: never create a file, even if the store's was deleted meanwhile.
    uri = "file:" + urllib.parse.quote(str(path.absolute())) + "?mode=rw"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=0")  # asked on the event loop: never wait
    return conn


def data_version(conn: sqlite3.Connection) -> int | None:
    """The connection's data version; None if it could not be read at once (busy)."""
    try:
        row = conn.execute("PRAGMA data_version").fetchone()
    except sqlite3.OperationalError:  # busy (a checkpoint, a recovery): ask again later
        return None
    return int(row[0])


async def watch_changes(
    path: Path, on_change: Callable[[], None], *, every_s: float = CHANGE_POLL_S
) -> None:
    """Call `on_change` once at start and whenever another connection committed to the
    database at `path`. Runs until cancelled; rides out errors by reconnecting."""
    delay = 0.1
    while True:
        try:
            conn = await anyio.to_thread.run_sync(_connect, path)
        except sqlite3.Error as exc:
            log.debug("SQLite change watch could not connect, retrying in %.1f s: %s", delay, exc)
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        delay = 0.1
        try:
            seen = data_version(conn)
            on_change()  # a change may have come while nobody watched
            while True:
                await anyio.sleep(every_s)
                now = data_version(conn)
                if now is not None and now != seen:
                    seen = now
                    on_change()
        except sqlite3.Error as exc:
            log.debug("SQLite change watch failed, reconnecting: %s", exc)
        finally:
            conn.close()
