"""Backends of the `Store` interface; each imports its driver only when used.

`open_store` is the one place that turns what a user names (an SQLite path, a
`postgresql://` URL) into a store, with its connection sizing: `TaskPool`,
`Client` and the command line all call it, so none of them knows a dialect.
"""

from __future__ import annotations

import os
import re

from .._store import Store

#: URL schemes of the PostgreSQL store (libpq accepts both spellings).
POSTGRES_SCHEMES = ("postgresql", "postgres")

#: Connections of a store opened for a client (no worker): a submit or a read holds
#: one for its transaction, so a few let concurrent requests of a web app overlap.
CLIENT_CONNECTIONS = 4

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


#: The pooled connections of a worker node, whatever its `max_parallel`: its runners'
#: writes (spawn, output, finish: one short statement each), its claims (queued in the
#: store, one in flight) and its loops share them, queuing for a connection rather than
#: holding one each, so that many nodes of many slots fit a server's connection limit.
#: Beside them a node has one connection kept for renewing its leases (never queued
#: behind its runners' writes) and one LISTEN connection: 5 in all.
NODE_CONNECTIONS = 3


def node_connections(max_parallel: int) -> int:
    """Pooled connections a worker node of `max_parallel` slots gets: a constant (see
    `NODE_CONNECTIONS`), never one per slot."""
    del max_parallel  # deliberately unused: a node's connections do not grow with it
    return NODE_CONNECTIONS


def open_store(
    target: str | os.PathLike[str],
    *,
    connections: int = CLIENT_CONNECTIONS,
    create: bool = True,
    lease_connection: bool = False,
) -> Store:
    """The store `target` names, not yet opened: a `postgresql://` (or `postgres://`)
    URL gives a `PostgresStore` of at most `connections` connections; anything else is
    the path of an SQLite file (`connections` does not apply: one writer, one reader).
    `lease_connection` (a worker node's store) adds one PostgreSQL connection kept for
    `renew_leases`, so that a node's lease renewals never wait behind its other calls.

    With `create=False` the database must exist already (a missing SQLite file, or a
    PostgreSQL database without taskpool's tables, is a `StoreError` at `open`), so
    that a mistyped name is an error rather than a new empty database. The caller
    owns the returned store: it opens and closes it (`async with store:`).

    A URL of another scheme (`mysql://...`) or an empty name is a `ValueError`,
    never a file of that name."""
    if connections < 1:
        raise ValueError(f"connections must be >= 1, got {connections}")
    name = os.fspath(target)
    if isinstance(name, bytes):  # os.PathLike[bytes] slipped past the type
        raise ValueError(f"a store is named by text, not bytes: {name!r}")
    url = _URL.match(name)
    if url and url[1].lower() in POSTGRES_SCHEMES:
        from .postgres import PostgresStore

        return PostgresStore(
            name,
            min_size=1,
            max_size=connections,
            create=create,
            lease_connection=lease_connection,
        )
    if url:
        raise ValueError(
            f"unknown store URL scheme {url[1]!r}: give a postgresql:// URL or the path"
            " of an SQLite file"
        )
    if not name.strip():
        raise ValueError("no store named: give a postgresql:// URL or the path of an SQLite file")
    from .sqlite import SQLiteStore

    return SQLiteStore(name, create=create)
