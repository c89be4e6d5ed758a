"""What crashed a pool: of the exceptions its task group raised as it ended, the one
that is the pool's crash (pure). The pool raises it as the cause of `PoolCrashed` and
records it when it releases what its runners left (`_recovery.release_and_stop`)."""

from __future__ import annotations


def crash_cause(
    raised: BaseException, leaving: BaseException | None, cancelled: type[BaseException]
) -> BaseException | None:
    """The first exception in `raised` (exception groups searched depth first) that is
    neither `leaving`, the exception the caller left the pool's context with (theirs,
    passed on as it is), nor a cancellation (`cancelled`, the async backend's class:
    every runner and service a crash stops raises one). None if nothing crashed. Pure."""
    for leaf in _leaves(raised):
        if leaf is not leaving and not isinstance(leaf, cancelled):
            return leaf
    return None


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]
