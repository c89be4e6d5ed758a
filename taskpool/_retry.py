"""A retry's policy as pure functions: how long a failed task waits before its next
attempt (exponential backoff, capped, with jitter) and which failures `retry_on`
retries. `_decisions.decide_finish` and `decide_orphan` apply them inside a store's
transaction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Set

from ._models import DEFAULT_RETRY_MAX_DELAY_S, OutcomeKind


def retry_delay_s(
    backoff_s: float,
    attempts_used: int,
    *,
    max_delay_s: float = DEFAULT_RETRY_MAX_DELAY_S,
    jitter: float = 0.0,
    unit: float = 0.0,
) -> float:
    """Exponential backoff: base, 2x base, 4x base ... capped at `max_delay_s`, less
    `jitter * unit` of it: `unit` is the random draw in [0, 1) (`jitter_unit`), so
    with `jitter` 1 the delay is anywhere from 0 to the capped one ("full jitter")
    and the cap is never exceeded."""
    doublings = min(max(attempts_used - 1, 0), 32)  # 2**32 s is past any cap: no overflow
    capped = min(backoff_s * 2**doublings, max_delay_s)
    return float(capped * (1.0 - jitter * unit))


def jitter_unit(task_id: int, attempts_used: int) -> float:
    """The random draw of a retry's jitter, in [0, 1): a hash of the task and the
    attempt that failed. Pure, so every backend computes the same delay (the contract
    suite compares them) and tests are exact; different across tasks, so a batch
    that failed together does not come back together."""
    digest = hashlib.blake2b(f"{task_id}:{attempts_used}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


#: What `retry_on` calls each failure that retries by default (an exit is also named
#: by its code, `exit:N`); a lost attempt (`decide_orphan`) is `lost`.
_RETRY_ON_NAME = {
    OutcomeKind.EXITED: "exited",
    OutcomeKind.TIMED_OUT: "timed_out",
    OutcomeKind.STALLED: "stalled",
}


def retried_on(retry_on: Set[str] | None, outcome: str, exit_code: int | None = None) -> bool:
    """Whether a failure named `outcome` (`exited`, `timed_out`, `stalled`, `lost`)
    is one `retry_on` retries: None retries every one; an exit also matches its
    `exit:N`."""
    if retry_on is None or outcome in retry_on:
        return True
    return outcome == "exited" and exit_code is not None and f"exit:{exit_code}" in retry_on


def not_retried_reason(reason: str, retry_on: Set[str]) -> str:
    return f"{reason}; not retried: retry_on is {', '.join(sorted(retry_on))}"
