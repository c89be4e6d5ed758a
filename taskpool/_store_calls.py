"""How a pool calls its store: each call shielded, bounded, and retried through an
outage up to the pool's tolerance, after which the outage is the pool's crash."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from ._errors import StoreUnavailable
from ._telemetry import Telemetry

T = TypeVar("T")


class StoreCalls:
    """Runs a pool's store calls, riding out outages up to `tolerance_s` (or not at all
    once `closing()` says the pool is closing, for a call that asks not to).

    Each call is shielded from cancellation: what it commits reaches the pool, which
    runs it or hands it back (a claim cancelled mid-flight could commit unseen and
    leave its task running under nobody). It is bounded instead by `timeout_s`, so a
    silent network counts as an outage."""

    def __init__(
        self,
        *,
        timeout_s: float,
        tolerance_s: float,
        telemetry: Telemetry,
        closing: Callable[[], bool],
    ) -> None:
        self._timeout_s = timeout_s
        self._tolerance_s = tolerance_s
        self._telemetry = telemetry
        self._closing = closing

    async def __call__(
        self, call: Callable[[], Awaitable[T]], *, retry_while_closing: bool = True
    ) -> T:
        deadline: float | None = None
        delay = 0.05
        while True:
            try:
                with anyio.CancelScope(shield=True):
                    try:
                        with anyio.fail_after(self._timeout_s):
                            return await call()
                    except TimeoutError as exc:
                        raise StoreUnavailable(
                            f"store call timed out after {self._timeout_s:g} s"
                        ) from exc
            except StoreUnavailable as exc:
                now = anyio.current_time()
                self._telemetry.store_retry(exc, first=deadline is None)
                if deadline is None:
                    deadline = now + self._tolerance_s
                if now >= deadline or (self._closing() and not retry_while_closing):
                    raise
                await anyio.sleep(min(delay, deadline - now))
                delay = min(delay * 2, 1.0)

    async def sent_at(
        self, call: Callable[[], Awaitable[T]], *, retry_while_closing: bool = True
    ) -> tuple[T, float]:
        """The call's result, and when the try that succeeded was sent (time.monotonic()):
        a lease it grants or renews runs from then, not from a first try that an outage
        made fail (that would stop a fresh attempt at once)."""
        sent = time.monotonic()

        async def timed() -> T:
            nonlocal sent
            sent = time.monotonic()
            return await call()

        result = await self(timed, retry_while_closing=retry_while_closing)
        return result, sent
