"""The dashboard's schedules over HTTP (in-process ASGI, a real SQLite store): the
schedules page, a run's schedule on its task page and in the lists, and pause and
resume under the same access rules as cancel and retry."""

from __future__ import annotations

import re
from calendar import timegm
from pathlib import Path

from taskpool import Client
from taskpool._explain import utc
from taskpool._scheduler import schedules_of
from taskpool.web import create_app
from tests.integration.test_web_http import HOST, JSON, TOKEN, csrf_of, http, opened, signed_in

MIDNIGHT = float(timegm((2024, 6, 3, 0, 0, 0)))  # a Monday, UTC
EVIL = "<script>alert(1)</script>"


async def with_schedules(client: Client) -> tuple[int, int]:
    """Two schedules added at MIDNIGHT - 1 ("nightly" cron in Berlin, "beat" every
    five minutes); beat fired twice by the store's scheduler step; a plain task too.
    Returns (beat's newest run, the plain task)."""
    client.schedule_clock = lambda: MIDNIGHT - 1
    await client.add_schedule(
        "nightly", ["terraform", "plan"], cron="0 3 * * *", tz="Europe/Berlin", project="infra"
    )
    await client.add_schedule(
        "beat", ["echo", EVIL], every_s=300, overlap="queue", misfire="run_all", project="p<b>"
    )
    steps = schedules_of(client.store)
    await steps.fire_due(MIDNIGHT + 299)
    await steps.fire_due(MIDNIGHT + 599)
    [newest, oldest] = await client.schedule_runs("beat")
    assert newest > oldest
    plain = await client.submit(["true"])
    return newest, plain


async def test_the_schedules_page_shows_each_schedule_its_fires_and_runs(db: Path) -> None:
    """One row per schedule: timing, state, policies, the next three fires and the
    last one in UTC, the command escaped, the project, and its runs linked with their
    status; read-only, no pause button; the nav links the page."""
    async with opened(db) as client:
        newest, _ = await with_schedules(client)
        [older] = [i for i in await client.schedule_runs("beat") if i != newest]
        async with http(create_app(client)) as web:
            assert 'href="/schedules"' in (await web.get("/")).text
            page = await web.get("/schedules")
            assert page.status_code == 200
            text = page.text
            assert "<script>alert" not in text
            assert "p<b>" not in text
            beat = _row(text, "beat")
            assert "every 5 min" in beat
            assert "active" in beat
            assert "overlap <b>queue</b>" in beat
            assert "misfire <b>run_all ≤10</b>" in beat
            # Fired for MIDNIGHT-1+300 and +600: next ticks +900, +1200, +1500.
            for k in (3, 4, 5):
                assert f"<time>{utc(MIDNIGHT - 1 + 300 * k)}</time>" in beat
            assert f"<time>{utc(MIDNIGHT - 1 + 600)}</time>" in beat  # its last fire
            assert "echo &#x27;&lt;script&gt;alert(1)&lt;/script&gt;&#x27;" in beat
            assert "p&lt;b&gt;" in beat
            assert f'href="/tasks/{newest}">#{newest}</a> <span class="badge st-waiting">' in beat
            assert f'href="/tasks/{older}">#{older}</a>' in beat
            assert beat.index(f"#{newest}<") < beat.index(f"#{older}<")  # newest first
            nightly = _row(text, "nightly")
            assert "<code>0 3 * * *</code>" in nightly
            assert "Europe/Berlin" in nightly
            assert "never" in nightly  # no fire yet
            assert "none yet" in nightly
            # 03:00 in Berlin is 01:00 UTC in June.
            assert f"<time>{utc(MIDNIGHT + 3600)}</time>" in nightly
            assert "data-action" not in text


async def test_a_runs_schedule_shows_on_its_task_page_and_in_the_lists(db: Path) -> None:
    """A run's page says which schedule submitted it and for which tick, linking the
    schedules page; the tasks list has its schedule in the Schedule column; a task
    submitted by hand names none."""
    async with opened(db) as client:
        newest, plain = await with_schedules(client)
        async with http(create_app(client)) as web:
            page = (await web.get(f"/tasks/{newest}")).text
            assert (
                '<dt>Schedule</dt><dd><a href="/schedules#schedule-beat">beat</a>'
                f" (tick {utc(MIDNIGHT - 1 + 600)})</dd>"
            ) in page
            assert "<dt>Schedule</dt>" not in (await web.get(f"/tasks/{plain}")).text
            listed = (await web.get("/")).text
            assert "<th>Schedule</th>" in listed
            run_row = re.search(rf'<tr data-task="{newest}">.*?</tr>', listed)
            assert run_row is not None
            assert 'td class="schedule"><a href="/schedules#schedule-beat">beat</a>' in run_row[0]
            plain_row = re.search(rf'<tr data-task="{plain}">.*?</tr>', listed)
            assert plain_row is not None
            assert '<td class="schedule"></td>' in plain_row[0]
            waiting = (await web.get("/waiting")).text  # the waiting list has the column too
            assert 'href="/schedules#schedule-beat"' in waiting


async def test_pause_and_resume_need_access_csrf_and_a_known_schedule(db: Path) -> None:
    """Read-only: 403 and nothing changes. With the token: no or a wrong CSRF token,
    or another origin, is refused; the page's CSRF token pauses and resumes (the store
    says so); a bearer may too; an unknown name is 404; a name with a slash and a space
    reaches its schedule."""
    async with opened(db) as client:
        await with_schedules(client)
        await client.add_schedule("ops/weekly report", ["true"], cron="0 6 * * 1")
        async with http(create_app(client)) as web:
            page = await web.get("/schedules")
            refused = await web.post(
                "/api/schedules/beat/pause",
                json={},
                headers={"x-csrf-token": csrf_of(page.text), "origin": HOST},
            )
            assert refused.status_code == 403
            assert "read-only" in refused.json()["error"]
        assert not (await client.get_schedule("beat")).paused

        async with http(create_app(client, token=TOKEN)) as web:
            assert (await web.post("/api/schedules/beat/pause", json={})).status_code == 401
            csrf = await signed_in(web)
            listed = (await web.get("/schedules")).text
            assert 'data-action="pause" data-label="beat"' in listed
            for headers in (
                {},
                {"x-csrf-token": "0" * 64},
                {"x-csrf-token": csrf, "origin": "http://evil.test"},
                {"x-csrf-token": csrf, "sec-fetch-site": "cross-site"},
            ):
                response = await web.post("/api/schedules/beat/pause", json={}, headers=headers)
                assert response.status_code == 403, headers
            form = await web.post(
                "/api/schedules/beat/pause",
                content=b"x=1",
                headers={"content-type": "application/x-www-form-urlencoded", "x-csrf-token": csrf},
            )
            assert form.status_code == 415
            assert not (await client.get_schedule("beat")).paused

            own = {"x-csrf-token": csrf, "origin": HOST, "sec-fetch-site": "same-origin"}
            paused = await web.post("/api/schedules/beat/pause", json={}, headers=own)
            assert paused.status_code == 200, paused.text
            assert paused.json()["schedule"]["paused"] is True
            assert (await client.get_schedule("beat")).paused
            listed = (await web.get("/schedules")).text
            assert "paused" in _row(listed, "beat")
            assert 'data-action="resume" data-label="beat"' in listed
            resumed = await web.post("/api/schedules/beat/resume", json={}, headers=own)
            assert resumed.status_code == 200
            assert not (await client.get_schedule("beat")).paused

            bearer = {"authorization": f"Bearer {TOKEN}"}
            slashed = await web.post(
                "/api/schedules/ops%2Fweekly%20report/pause", json={}, headers=bearer
            )
            assert slashed.status_code == 200, slashed.text
            assert (await client.get_schedule("ops/weekly report")).paused
            assert not (await client.get_schedule("beat")).paused

            unknown = await web.post("/api/schedules/nope/pause", json={}, headers=bearer)
            assert unknown.status_code == 404
            assert unknown.json() == {"error": "no schedule 'nope'"}
            bad_body = await web.post(
                "/api/schedules/beat/pause", content=b"{", headers={**JSON, **bearer}
            )
            assert bad_body.status_code == 400
            assert (await web.get("/api/schedules/beat/pause")).status_code == 405
        assert not (await client.get_schedule("beat")).paused


async def test_a_closed_store_makes_the_schedules_page_503(db: Path) -> None:
    """The store failing under the page is the dashboard's usual 503, as HTML."""
    async with opened(db) as client:
        await with_schedules(client)
        app = create_app(client)
    async with http(app) as web:
        page = await web.get("/schedules")
        assert page.status_code == 503, page.text
        assert "the task store is unavailable" in page.text


def _row(page: str, name: str) -> str:
    found = re.search(rf'<tr id="schedule-[^"]*" data-schedule="{re.escape(name)}".*?</tr>', page)
    assert found is not None, name
    return found[0]
