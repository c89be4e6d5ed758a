"""The cancel watcher's pure decision: which running attempts a store's cancel
requests stop, and how."""

from __future__ import annotations

from taskpool import CancelMode
from taskpool._cancels import cancels_to_deliver


def test_only_attempts_the_pool_runs_are_stopped_with_their_mode() -> None:
    requests = {
        1: (3, CancelMode.GRACEFUL),  # running here
        2: (1, CancelMode.FORCE),  # running here
        4: (5, CancelMode.FORCE),  # a stale fence: the pool runs fence 6 of task 4
        9: (1, CancelMode.GRACEFUL),  # not run by this pool (ended, or never)
    }
    running = {(1, 3), (2, 1), (4, 6), (7, 2)}
    assert cancels_to_deliver(requests, running) == {(1, 3): False, (2, 1): True}


def test_no_request_stops_nothing() -> None:
    assert cancels_to_deliver({}, {(1, 1)}) == {}
