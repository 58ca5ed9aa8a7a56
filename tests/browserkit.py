"""Headless Chromium for the browser tests: Debian's `chromium` package, driven with Playwright
(its Python package talks to the installed browser; no browser is downloaded).

`open_browser()` starts one; `Page` wraps a tab with what the tests ask of it: the text of a
`data-figure` element, waits with deadlines, and screenshots (into `STABLEWS_SCREENSHOTS` when
that is set, which is how the pictures in docs/ are made)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

# As root on a machine with no network beyond loopback: no sandbox, and none of the background
# connections a desktop browser makes (they would be refused, many at a time).
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]
SCREENSHOTS_ENV = "STABLEWS_SCREENSHOTS"


def chromium_binary() -> str:
    path = os.environ.get("STABLEWS_CHROMIUM") or shutil.which("chromium")
    if path is None:
        pytest.fail("chromium not found: apt-get install chromium", pytrace=False)
    return path


def _playwright() -> Any:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail("playwright not installed: python3 -m pip install -e '.[test]'", pytrace=False)
    return async_playwright


class Page:
    """One tab. Uncaught exceptions and console errors are collected: a test can insist on none
    (the browser itself logs every refused WebSocket connection as a console error)."""

    def __init__(self, page: Any, shots: Path) -> None:
        self.page = page
        self.shots = shots
        self.uncaught: list[str] = []
        self.console_errors: list[str] = []
        page.on("pageerror", lambda exc: self.uncaught.append(str(exc)))
        page.on("console", self._console)

    def _console(self, message: Any) -> None:
        if message.type == "error" and "favicon" not in (message.location or {}).get("url", ""):
            self.console_errors.append(message.text)

    async def goto(self, url: str) -> None:
        await self.page.goto(url, wait_until="load")

    async def figure(self, name: str) -> str:
        return (await self.page.locator(f'[data-figure="{name}"]').first.text_content() or "").strip()

    async def evaluate(self, script: str, arg: Any = None) -> Any:
        return await self.page.evaluate(script, arg)

    async def wait_for_function(self, script: str, arg: Any = None, timeout: float = 20.0) -> Any:
        handle = await self.page.wait_for_function(script, arg=arg, timeout=timeout * 1000, polling=50)
        return await handle.json_value()

    async def screenshot(self, name: str) -> Path:
        path = self.shots / name
        await self.page.screenshot(path=str(path), full_page=True)
        return path


@contextlib.asynccontextmanager
async def open_browser(tmp_path: Path, viewport: tuple[int, int] = (1280, 1000)) -> AsyncIterator[Page]:
    """A fresh headless Chromium with one tab; closed at the end."""
    executable = chromium_binary()
    shots = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    async with _playwright()() as driver:
        # Playwright gives the browser a new empty profile of its own.
        browser = await driver.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            # The page's Content-Security-Policy forbids eval, which Playwright's string predicates use.
            # Bypassing it also means markup put into the page as HTML would run: the tests would see it.
            context = await browser.new_context(
                viewport={"width": viewport[0], "height": viewport[1]}, bypass_csp=True
            )
            yield Page(await context.new_page(), shots)
        finally:
            await browser.close()
