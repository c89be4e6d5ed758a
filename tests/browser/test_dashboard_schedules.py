"""The schedules page in a real browser, served for real, over a real store and a
pool whose scheduler fires the schedules, on SQLite and on PostgreSQL: the page lists
each schedule with its next fires and runs, Pause (confirmed) pauses it in the store,
and a run's own page names its schedule. What happened is judged from the store."""

from __future__ import annotations

from pathlib import Path

from playwright.async_api import Browser, expect

from taskpool import Status, TaskPool
from taskpool._explain import utc
from taskpool.web import create_app
from tests.browser.serving import served
from tests.browser.test_dashboard import EXPECT_TIMEOUT_MS, VIEWPORT, shoot
from tests.helpers import eventually, fast_pool


async def test_the_schedules_page_lists_fires_and_runs_and_pauses_from_the_page(
    database: str, browser: Browser, screenshots: Path
) -> None:
    """A one-second schedule the pool fires shows its next three fires and its
    succeeded runs; Pause, confirmed in the dialog, shows it paused and the store has
    it paused (its runs stop); its run's task page names it and links back."""
    pool: TaskPool
    async with fast_pool(database, schedule_interval_s=0.1) as pool:
        await pool.add_schedule(
            "nightly-drift",
            ["terraform", "plan", "-detailed-exitcode"],
            cron="0 3 * * *",
            tz="Europe/Berlin",
            overlap="skip",
            project="infra",
        )
        await pool.add_schedule(
            "weekly-report",
            ["make", "report", "--week"],
            cron="0 6 * * 1",
            misfire="skip",
            project="reports",
            paused=True,
        )
        await pool.add_schedule(
            "heartbeat",
            ["sh", "-c", "echo beat"],
            every_s=1.0,
            overlap="queue",
            misfire="run_all",
            project="ops",
        )

        async def two_succeeded() -> list[int] | None:
            runs = await pool.schedule_runs("heartbeat")
            statuses = [(await pool.get(i)).status for i in runs[-2:]]
            return runs if len(runs) >= 2 and statuses == [Status.SUCCEEDED] * 2 else None

        first_run = (await eventually(two_succeeded))[-1]

        async with served(create_app(pool, auth=lambda request: True)) as base:
            page = await browser.new_page(viewport=VIEWPORT)
            await page.goto(base + "/")
            await page.click('header nav a[href$="/schedules"]')
            await expect(page.locator("h1")).to_have_text("Schedules")
            rows = page.locator("table.schedules tbody tr")
            await expect(rows).to_have_count(3)
            nightly = page.locator('tr[data-schedule="nightly-drift"]')
            await expect(nightly.locator("time")).to_have_count(3)  # its next fires; none yet
            drift = await pool.get_schedule("nightly-drift")
            for tick in drift.next_fires(3):
                await expect(nightly).to_contain_text(utc(tick))
            await expect(nightly).to_contain_text("Europe/Berlin")
            await expect(nightly).to_contain_text("never")
            heartbeat = page.locator('tr[data-schedule="heartbeat"]')
            await expect(heartbeat.locator(".badge").first).to_have_text("active")
            await expect(heartbeat.locator(f'a[href$="/tasks/{first_run}"]')).to_be_visible()
            await expect(heartbeat.locator("ul.runs .badge.st-succeeded").first).to_be_visible()
            weekly = page.locator('tr[data-schedule="weekly-report"]')
            await expect(weekly).to_contain_text("paused")
            await expect(weekly.locator('button[data-action="resume"]')).to_be_visible()
            await shoot(page, screenshots, "schedules", database)

            await heartbeat.locator('button[data-action="pause"]').click()
            dialog = page.locator("dialog#confirm")
            await expect(dialog).to_contain_text("Pause schedule heartbeat?")
            await dialog.locator('button[value="go"]').click()
            await expect(page.locator("body")).to_have_attribute(
                "data-schedule-changed", "heartbeat:pause", timeout=EXPECT_TIMEOUT_MS
            )
            await expect(heartbeat.locator(".badge").first).to_have_text("paused")
            await expect(heartbeat.locator('button[data-action="resume"]')).to_be_visible()
            assert (await pool.get_schedule("heartbeat")).paused

            await page.goto(f"{base}/tasks/{first_run}")
            summary = page.locator("dl.summary")
            await expect(summary).to_contain_text("Schedule")
            await expect(summary).to_contain_text("heartbeat (tick ")
            [by] = (await pool.scheduled_by([first_run])).values()
            await expect(summary).to_contain_text(f"(tick {utc(by.tick)})")
            await summary.locator('a[href$="/schedules#schedule-heartbeat"]').click()
            await expect(page.locator("h1")).to_have_text("Schedules")
            await page.close()

        # Paused: the scheduler submits nothing more for it (the pause and each step
        # lock the schedule's row, so nothing fires after the pause committed).
        settled = await pool.schedule_runs("heartbeat")
        await pool.wait(settled[0], timeout_s=60)
        assert await pool.schedule_runs("heartbeat") == settled
