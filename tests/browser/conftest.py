"""A real browser for the dashboard's tests: Debian's headless Chromium, driven by
Playwright from PyPI (never `playwright install`: the machines reach package
registries only). Missing Chromium is installed with apt-get when running as root;
otherwise the run fails saying so. It is never skipped."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, async_playwright

CHROMIUM = "/usr/bin/chromium"
APT_TIMEOUT_S = 900
ROOT = Path(__file__).resolve().parents[2]
#: Set to 1 to copy this run's screenshots over the README's (docs/screenshots/).
UPDATE_SCREENSHOTS_ENV = "TASKPOOL_UPDATE_SCREENSHOTS"
SCREENSHOT_DIR_ENV = "TASKPOOL_SCREENSHOT_DIR"


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium binary, installed from the Debian archive if it is missing."""
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail(
            f"the browser tests need Chromium at {CHROMIUM}: install Debian's package "
            "(apt-get install -y chromium) or run the tests as root so that they install it",
            pytrace=False,
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S
        )
        if done.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}", pytrace=False)
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"apt-get installed chromium but {CHROMIUM} is not there", pytrace=False)
    return CHROMIUM


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    """A headless Chromium of this test's own (a process tree closed when it ends)."""
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=chromium,
            headless=True,
            # Root has no user namespace sandbox here; /dev/shm may be small in containers.
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where this run's screenshots go: TASKPOOL_SCREENSHOT_DIR if set (for CI to keep),
    else a temporary directory; printed at the end, and copied to docs/screenshots
    when TASKPOOL_UPDATE_SCREENSHOTS=1."""
    chosen = os.environ.get(SCREENSHOT_DIR_ENV)
    where = Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    where.mkdir(parents=True, exist_ok=True)
    yield where
    print(f"\ndashboard screenshots: {where}")
    if os.environ.get(UPDATE_SCREENSHOTS_ENV) == "1":
        target = ROOT / "docs" / "screenshots"
        target.mkdir(parents=True, exist_ok=True)
        for shot in sorted(where.glob("*.png")):
            shutil.copy(shot, target / shot.name)
