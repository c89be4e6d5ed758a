"""asyncpg's side of the PostgreSQL store: which driver errors are worth retrying, how
their text is kept free of the DSN's password, and the connection class the pool uses.
"""

from __future__ import annotations

from .._errors import StoreError, StoreUnavailable
from .._redact import dsn_secrets, redact

#: SQLSTATE classes worth retrying: connection exceptions, insufficient resources,
#: operator intervention (shutdown), and serialization failures or deadlocks.
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "53", "57", "40")


def map_error(exc: BaseException) -> StoreError:
    """The taskpool error for a driver error, its text redacted (a driver may echo the
    connection string it was given)."""
    import asyncpg

    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        if state.startswith(_TRANSIENT_SQLSTATE_PREFIXES):
            return StoreUnavailable(redact(f"PostgreSQL {state}: {exc}"))
        return StoreError(redact(f"PostgreSQL {state}: {exc}"))
    return StoreUnavailable(redact(f"PostgreSQL connection: {exc!r}"))


def scrub(exc: BaseException, dsn: str) -> BaseException:
    """Redact, in place, a driver exception's arguments: it stays the cause of the
    taskpool error (tracebacks print it), so it must not carry the DSN's password."""
    secrets = dsn_secrets(dsn)
    exc.args = tuple(redact(a, secrets=secrets) if isinstance(a, str) else a for a in exc.args)
    return exc


def quiet_connection_class() -> type:
    import asyncpg

    class QuietConnection(asyncpg.Connection):  # type: ignore[misc]
        """Skips the reset query on release (a round trip per operation): the store
        takes only transaction-level locks, opens no cursors, sets nothing and LISTENs
        on a connection of its own. Open transactions are still rolled back."""

        def get_reset_query(self) -> str:
            return ""

    return QuietConnection
