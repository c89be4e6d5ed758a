"""The exception tree: one root, subclasses grouped by how a caller recovers."""

from __future__ import annotations


class TaskpoolError(Exception):
    """Root of every error taskpool raises on purpose."""


class InvalidTask(TaskpoolError, ValueError):
    """A submitted task is malformed; nothing was stored. Fix the input and resubmit."""


class TaskNotFound(TaskpoolError, LookupError):
    """No task has the given id."""


class StoreError(TaskpoolError):
    """The store failed. The pool decides from the subclass whether to retry."""


class StoreUnavailable(StoreError):
    """A transient store failure (database down, locked, connection lost): worth retrying."""


class LeaseLost(TaskpoolError):
    """A write carried a stale fencing token: another owner holds the task now.

    The runner that receives it kills its process group at once.
    """


class PoolCrashed(TaskpoolError):
    """The pool's own machinery failed; every child was killed. The cause is chained."""


class PoolClosed(TaskpoolError):
    """The pool is not running (not entered yet, shutting down, or crashed)."""
