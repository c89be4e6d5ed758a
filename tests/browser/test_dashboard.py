"""The dashboard in a real browser, served for real, over a real store and a real pool.

Each test runs on SQLite and on PostgreSQL: uvicorn serves `taskpool.web` over a
`TaskPool` that runs the tasks; headless Chromium signs in, reads the pages, follows
a live log and cancels from the page. What happened is judged from the task's state
and events and from the pool's own attempt process, never from the page alone.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil
from playwright.async_api import Browser, Page, ViewportSize, expect

from taskpool import Status, TaskPool
from taskpool.web import create_app
from tests.browser.serving import served
from tests.helpers import eventually, fast_pool, has_exited, no_attempt_processes, running

TOKEN = "browser-test-token-0123456789"
VIEWPORT: ViewportSize = {"width": 1360, "height": 820}
#: Prints a green, numbered line five times a second, for ever.
TICKER = (
    r"i=0; while :; do i=$((i+1)); "
    r'printf "\033[32mtick %d\033[0m \033]0;title\007ok\n" $i; sleep 0.2; done'
)
EXPECT_TIMEOUT_MS = 30_000


async def sign_in(page: Page, base: str) -> None:
    """Through the login form the token asks for, as an operator would."""
    await page.goto(base + "/")
    await expect(page).to_have_url(re.compile(r"/login\?next="))
    await page.fill('input[name="token"]', TOKEN)
    await page.click("form.login button")
    await expect(page.locator("h1")).to_have_text("Tasks")


async def shoot(page: Page, where: Path, name: str, database: str) -> None:
    if not database.startswith("postgresql://"):  # one set is enough: the pages are alike
        await page.screenshot(path=str(where / f"{name}.png"), full_page=False)


async def test_a_running_task_its_live_log_and_a_cancel_from_the_page(
    database: str, browser: Browser, screenshots: Path
) -> None:
    """The list shows the running task; its log grows on the open page, colours shown
    and the title sequence neutralised; Cancel (confirmed) ends it: the task is
    cancelled by the dashboard's request, and its process is gone."""
    async with fast_pool(database, kill_grace_s=5.0) as pool:
        finished = await pool.submit(["sh", "-c", "echo done"], project="reports")
        await pool.wait(finished, timeout_s=60)
        task_id = await pool.submit(["sh", "-c", TICKER], project="infra", template="apply-prod")
        info = await running(pool, task_id)
        assert info.pid is not None
        leader = psutil.Process(info.pid)  # the pool's own attempt process

        async with served(create_app(pool, token=TOKEN)) as base:
            page = await browser.new_page(viewport=VIEWPORT)
            await sign_in(page, base)
            row = page.locator(f'tr[data-task="{task_id}"]')
            await expect(row.locator(".badge")).to_have_text("running")
            await expect(page.locator(f'tr[data-task="{finished}"] .badge')).to_have_text(
                "succeeded"
            )
            await shoot(page, screenshots, "tasks", database)

            await row.locator(f'a[href$="/tasks/{task_id}"]').click()
            await expect(page.locator("h1")).to_contain_text(f"Task {task_id}")
            log = page.locator("#log")
            await expect(log).to_contain_text("tick 3", timeout=EXPECT_TIMEOUT_MS)
            seen = (await log.inner_text()).count("tick")
            # More lines arrive while the page stays open: the live stream, not a reload.
            await page.wait_for_function(
                "n => document.getElementById('log').innerText.split('tick').length - 1 > n + 2",
                arg=seen,
                timeout=EXPECT_TIMEOUT_MS,
            )
            await expect(log.locator("span.a-f2").first).to_contain_text("tick")
            assert "title" not in await log.inner_text()  # the OSC title set is dropped
            assert await page.title() == f"Task {task_id} · taskpool"
            await shoot(page, screenshots, "task-running", database)

            await page.click('button[data-action="cancel"][data-force="0"]')
            dialog = page.locator("dialog#confirm")
            await expect(dialog).to_be_visible()
            await expect(dialog).to_contain_text(f"Cancel task {task_id}?")
            await shoot(page, screenshots, "cancel-confirm", database)
            await dialog.locator('button[value="go"]').click()

            await expect(page.locator("body")).to_have_attribute(
                "data-ended", "cancelled", timeout=EXPECT_TIMEOUT_MS
            )
            await expect(page.locator("h1 .badge")).to_have_text("cancelled")
            await expect(page.locator(".actions button[data-action=retry]")).to_be_visible()
            await shoot(page, screenshots, "task-cancelled", database)
            await page.close()

        final = await pool.get(task_id)
        assert final.status is Status.CANCELLED, final
        transitions = await pool.events(task_id)
        assert transitions[-1].to_status is Status.CANCELLED
        assert "cancel" in transitions[-1].reason
        assert final.cancel_requested is not None
        await eventually(_gone(leader))
    assert await no_attempt_processes()


def _gone(proc: psutil.Process) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        # psutil compares the start time too: a recycled pid is not our process.
        return has_exited(proc)

    return check


async def test_waiting_view_names_what_holds_a_task_and_the_other_pages_render(
    database: str, browser: Browser, screenshots: Path
) -> None:
    """A task waiting behind another of its non-parallel template: the waiting view and
    its own page say which task holds it; nodes show the pool with its containment,
    heartbeat and fair share; queues count per project."""
    pool: TaskPool
    async with fast_pool(database, fair_share={"infra": 2}) as pool:
        holder = await pool.submit(["sleep", "600"], project="infra", template="apply-prod")
        await running(pool, holder)
        blocked = await pool.submit(["echo", "next"], project="infra", template="apply-prod")
        for n in range(3):
            later = time.time() + 3600 * (n + 1)
            await pool.submit(
                ["make", "report", f"--part={n}"], project="reports", not_before=later
            )

        async with served(create_app(pool, auth=lambda request: True)) as base:
            page = await browser.new_page(viewport=VIEWPORT)
            await page.goto(base + "/waiting")
            row = page.locator(f'tr[data-task="{blocked}"]')
            await expect(row.locator(".badge")).to_have_text("waiting")
            await expect(row.locator("td.reason")).to_contain_text(
                f"template 'apply-prod' is held by task {holder} (running on node"
            )
            await shoot(page, screenshots, "waiting", database)

            await page.goto(f"{base}/tasks/{blocked}")
            await expect(page.locator(".why")).to_contain_text(f"is held by task {holder}")

            await page.goto(base + "/nodes")
            node = (await pool.nodes())[0]
            node_row = page.locator("table.grid tbody tr").first
            await expect(node_row).to_contain_text(node.id[:8])
            await expect(node_row).to_contain_text(node.containment or "unknown")
            await expect(node_row).to_contain_text("live")
            await expect(node_row).to_contain_text("1/4")
            await expect(node_row).to_contain_text("on (infra=2, others 1)")
            await shoot(page, screenshots, "nodes", database)

            await page.goto(base + "/queues")
            await expect(page.locator("table.grid tbody tr").first).to_contain_text("reports")
            await expect(page.locator("table.grid")).to_contain_text("infra")
            await shoot(page, screenshots, "queues", database)

            await page.goto(base + "/?project=reports&status=waiting")
            await expect(page.locator("table.grid tbody tr")).to_have_count(3)
            await page.goto(base + "/?template=apply-prod")
            await expect(page.locator("table.grid tbody tr")).to_have_count(2)
            await page.goto(base + "/?q=echo+next")
            await expect(page.locator("table.grid tbody tr")).to_have_count(1)
            await page.close()
