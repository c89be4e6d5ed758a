"""taskpool: run jobs as subprocesses from an anyio task pool embedded in your process.

State lives in a database (SQLite by default), so nothing is lost or stuck:
every attempt runs in its own cgroup (or process group) under a lease, and whatever ends
it, its slot is released and its terminal status written.

`TaskPool` is a worker (it runs tasks) and offers the client API for embedded use;
`Client` submits, watches, cancels and retries over the same store with no worker in
the process. `taskpool.stores.open_store` turns a path or URL into a store.
"""

from ._client import Client, StaleReport
from ._errors import (
    InvalidTask,
    LeaseLost,
    PoolClosed,
    PoolCrashed,
    StoreError,
    StoreUnavailable,
    TaskNotFound,
    TaskpoolError,
)
from ._explain import WaitKind, WaitReason
from ._models import (
    CancelMode,
    Limits,
    NodeInfo,
    ResourceLimits,
    Status,
    SubmitResult,
    TaskEvent,
    TaskInfo,
    TaskSpec,
)
from ._pool import TaskPool
from ._retention import PruneReport, Retention
from ._store import OutputChunk, Store
from .stores.postgres import PostgresStore
from .stores.sqlite import SQLiteStore

__all__ = [
    "CancelMode",
    "Client",
    "InvalidTask",
    "LeaseLost",
    "Limits",
    "NodeInfo",
    "OutputChunk",
    "PoolClosed",
    "PoolCrashed",
    "PostgresStore",
    "PruneReport",
    "ResourceLimits",
    "Retention",
    "SQLiteStore",
    "StaleReport",
    "Status",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "SubmitResult",
    "TaskEvent",
    "TaskInfo",
    "TaskNotFound",
    "TaskPool",
    "TaskSpec",
    "TaskpoolError",
    "WaitKind",
    "WaitReason",
]
