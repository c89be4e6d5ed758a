"""The pure decisions of lease keeping and recovery (`taskpool._leases`, `_recovery`)."""

from __future__ import annotations

from taskpool._leases import (
    LeaseBook,
    fencing_due,
    judge_renewal,
    node_deadline_stands,
    self_fence_margin_s,
)
from taskpool._models import CancelMode
from taskpool._recovery import confirm_strays
from taskpool._store import Renewal


def test_the_self_fence_margin_is_a_tenth_of_the_lease_but_never_under_half_a_second() -> None:
    assert self_fence_margin_s(30.0) == 3.0
    assert self_fence_margin_s(2.0) == 0.5


def test_a_renewal_sorts_running_attempts_into_renewed_self_fenced_lost_and_cancelled() -> None:
    renewal = Renewal(held={1: 1, 2: 4, 5: 1}, cancel_requests={2: CancelMode.FORCE})
    deadlines = {(1, 1): 100.0, (2, 4): 100.0, (3, 1): 50.0, (4, 2): 150.0}
    running = [(1, 1), (2, 4), (3, 1), (4, 2), (5, 1)]
    verdict = judge_renewal(running, renewal, deadlines, now=60.0)
    assert verdict.renewed == [(1, 1), (2, 4)]  # (5, 1) ended while the renewal was sent
    assert verdict.self_fenced == [(3, 1)]  # not held, and its lease ran out unrenewed
    assert verdict.lost == [(4, 2)]  # not held, its lease still running: another node's
    assert verdict.cancels == {(2, 4): True}


def test_an_attempt_not_held_with_no_deadline_is_lost_not_self_fenced() -> None:
    verdict = judge_renewal([(7, 2)], Renewal(held={7: 3}, cancel_requests={}), {}, now=1.0)
    assert verdict.lost == [(7, 2)]
    assert not verdict.self_fenced


def test_a_graceful_cancel_request_is_not_forced() -> None:
    renewal = Renewal(held={1: 1}, cancel_requests={1: CancelMode.GRACEFUL})
    assert judge_renewal([(1, 1)], renewal, {(1, 1): 9.0}, now=0.0).cancels == {(1, 1): False}


def test_fencing_stops_what_runs_out_within_the_margin_and_wakes_for_the_next() -> None:
    deadlines = {(1, 1): 10.0, (2, 1): 14.0, (3, 1): 10.5, (4, 1): 9.0}
    stoppable = {(1, 1), (2, 1), (3, 1)}  # (4, 1) is being killed already
    due, wake_at = fencing_due(deadlines, stoppable, 9.0, margin_s=1.0, check_every_s=10.0)
    assert due == [(1, 1)]
    assert wake_at == 9.5  # (3, 1) is due then


def test_with_nothing_due_fencing_looks_again_after_a_heartbeat() -> None:
    assert fencing_due({}, set(), 5.0, margin_s=1.0, check_every_s=2.0) == ([], 7.0)


def test_the_node_guard_deadline_follows_the_earliest_lease() -> None:
    book = LeaseBook(ttl_s=10.0)  # margin 1.0
    assert book.node_guard_deadline(now=100.0) == 109.5  # none running: a lease claimed now
    book.grant((1, 1), sent_at=50.0)
    book.grant((2, 1), sent_at=40.0)
    assert book.node_guard_deadline(now=100.0) == 49.5
    book.renew([(2, 1), (3, 1)], sent_at=45.0)  # (3, 1) is not running: ignored
    assert dict(book.deadlines) == {(1, 1): 60.0, (2, 1): 55.0}
    book.drop((2, 1))
    assert book.guard_deadline((1, 1)) == 59.5


def test_a_node_deadline_already_sent_stands_only_if_no_later_and_far_off() -> None:
    assert not node_deadline_stands(None, 20.0, now=0.0, renew_every_s=5.0)
    assert node_deadline_stands(10.0, 20.0, now=0.0, renew_every_s=5.0)
    assert not node_deadline_stands(25.0, 20.0, now=0.0, renew_every_s=5.0)  # too late
    assert not node_deadline_stands(10.0, 20.0, now=6.0, renew_every_s=5.0)  # fires first


def test_a_stray_lease_is_handed_back_only_when_seen_twice_in_a_row() -> None:
    held = {1: 1, 2: 3, 3: 1}
    running = {(1, 1)}
    confirmed, suspects = confirm_strays(held, running, {})
    assert confirmed == {}
    assert suspects == {2: 3, 3: 1}
    confirmed, suspects = confirm_strays({2: 3, 3: 2}, running, suspects)
    assert confirmed == {2: 3}  # (3, 1) became (3, 2): a new claim, a new suspect
    assert suspects == {3: 2}
