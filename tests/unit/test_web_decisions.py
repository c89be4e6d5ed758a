"""The dashboard's pure decisions: which request may act, queue depths, filters and
paging (what a waiting task waits for is tests/unit/test_explain.py's)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from taskpool import Status, TaskInfo, TaskSpec
from taskpool.web._security import (
    ActionFacts,
    Refusal,
    bearer,
    parse_json_object,
    refuse_action,
    safe_next,
    same_origin,
)
from taskpool.web._views import PAGE_SIZE, TaskFilter, page_of, queue_depths

NOW = 1_800_000_000.0
OK = ActionFacts(
    content_type="application/json; charset=utf-8",
    origin="http://ops.example:8080",
    own_origin="http://ops.example:8080",
    sec_fetch_site="same-origin",
    csrf_header="c" * 64,
    expected_csrf="c" * 64,
    by_bearer=False,
    content_length="2",
    max_body_bytes=100,
)


def test_a_same_origin_json_request_with_its_csrf_token_may_act() -> None:
    assert refuse_action(OK) is None
    assert refuse_action(replace(OK, origin=None, sec_fetch_site=None)) is None  # curl


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ({"origin": "http://evil.example"}, 403),
        ({"origin": "https://ops.example:8080"}, 403),  # another scheme is another origin
        ({"origin": "http://ops.example:8081"}, 403),
        ({"origin": "null"}, 403),
        ({"sec_fetch_site": "cross-site"}, 403),
        ({"sec_fetch_site": "same-site"}, 403),
        ({"content_type": "text/plain"}, 415),
        ({"content_type": "application/x-www-form-urlencoded"}, 415),
        ({"content_type": None}, 415),
        ({"csrf_header": None}, 403),
        ({"csrf_header": "d" * 64}, 403),
        ({"content_length": "101"}, 413),
        ({"content_length": "-1"}, 400),
    ],
)
def test_what_a_forged_or_bad_request_gets(change: dict[str, object], status: int) -> None:
    refusal = refuse_action(replace(OK, **change))  # type: ignore[arg-type]
    assert refusal is not None
    assert refusal.status == status


def test_a_bearer_needs_no_csrf_token_but_still_json_and_its_origin() -> None:
    assert refuse_action(replace(OK, by_bearer=True, csrf_header=None)) is None
    no_json = refuse_action(replace(OK, by_bearer=True, content_type="text/plain"))
    assert no_json == Refusal(415, "the body must be application/json")


def test_json_bodies_are_objects_of_known_typed_fields() -> None:
    allowed = {"force": bool}
    assert parse_json_object(b"", allowed) == {}
    assert parse_json_object(b'{"force": true}', allowed) == {"force": True}
    for bad in (b"{", b"[]", b"1", b"\xff", b'{"force": 1}', b'{"x": true}', b'{"force": null}'):
        result = parse_json_object(bad, allowed)
        assert isinstance(result, Refusal), bad
        assert result.status == 400


def test_origins_bearer_headers_and_where_a_sign_in_goes() -> None:
    assert same_origin("HTTP://Ops.Example:8080", "http://ops.example:8080")
    assert bearer("Bearer abc") == "abc"
    assert bearer("bearer  abc ") == "abc"
    assert bearer("Basic abc") is None
    assert bearer("Bearer ") is None
    assert safe_next("/ops/tasks/3", "/ops") == "/ops/tasks/3"
    for elsewhere in ("//evil.example/", "https://evil.example/", "/other", "/ops\\x", None):
        assert safe_next(elsewhere, "/ops") == "/ops/"


def task(task_id: int, status: Status = Status.WAITING, **spec: object) -> TaskInfo:
    running = status is Status.RUNNING
    return TaskInfo(
        id=task_id,
        spec=TaskSpec.build(["true"], **spec),  # type: ignore[arg-type]
        status=status,
        submitted_at=NOW - 100 + task_id,
        attempts_used=1 if running else 0,
        fence=1 if running else 0,
        owner_node="node-a-0000" if running else None,
        lease_expires_at=NOW + 30 if running else None,
        pid=4000 + task_id if running else None,
        started_at=NOW - 192 if running else None,
        finished_at=None,
        exit_code=None,
        reason="submitted",
        cancel_requested=None,
    )


def test_queue_depth_per_project_deepest_first() -> None:
    waiting = [task(1, project="a"), task(2, project="b"), task(3, project="b")]
    running = [task(4, Status.RUNNING, project="a"), task(5, Status.RUNNING, project="c")]
    depths = queue_depths(waiting, running, now=NOW)
    assert [(d.project, d.waiting, d.running) for d in depths] == [
        ("b", 2, 0),
        ("a", 1, 1),
        ("c", 0, 1),
    ]
    assert depths[0].oldest_waiting_s == 98
    assert depths[2].oldest_waiting_s is None


def test_filters_read_leniently_and_page() -> None:
    f = TaskFilter.from_query({"status": "running", "project": " infra ", "page": "2"})
    assert (f.status, f.project, f.page) == (Status.RUNNING, "infra", 2)
    assert f.query(page=3) == {"status": "running", "project": "infra", "page": "3"}
    junk = TaskFilter.from_query({"status": "nope", "page": "0", "q": "x" * 1000})
    assert (junk.status, junk.page, len(junk.text or "")) == (None, 1, 200)
    tasks = [task(n, template="t" if n % 3 == 0 else None) for n in range(200, 0, -1)]
    only_t = TaskFilter(template="t", page=2)
    page = page_of(tasks, only_t, fetched=len(tasks), limit=5000)
    assert len(page.tasks) == 66 - PAGE_SIZE
    assert not page.has_next
    assert not page.window_full
    assert all(t.spec.template == "t" for t in page.tasks)
    by_text = TaskFilter(text="SUBMITTED")
    assert len(page_of(tasks, by_text, fetched=200, limit=200).tasks) == PAGE_SIZE
