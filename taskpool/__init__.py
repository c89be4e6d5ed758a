"""taskpool: run jobs as subprocesses from an anyio task pool embedded in your process.

State lives in a database (SQLite by default), so nothing is lost or stuck:
every attempt runs in its own cgroup (or process group) under a lease, and whatever ends
it, its slot is released and its terminal status written.
"""

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
from ._models import Limits, NodeInfo, ResourceLimits, Status, TaskEvent, TaskInfo, TaskSpec
from ._pool import TaskPool
from ._store import OutputChunk, Store
from .stores.postgres import PostgresStore
from .stores.sqlite import SQLiteStore

__all__ = [
    "InvalidTask",
    "LeaseLost",
    "Limits",
    "NodeInfo",
    "OutputChunk",
    "PoolClosed",
    "PoolCrashed",
    "PostgresStore",
    "ResourceLimits",
    "SQLiteStore",
    "Status",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "TaskEvent",
    "TaskInfo",
    "TaskNotFound",
    "TaskPool",
    "TaskSpec",
    "TaskpoolError",
]
