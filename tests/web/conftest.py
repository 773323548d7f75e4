"""Browser tests: a live helix server driven by headless Chromium through Playwright.

The browser is Debian's `chromium` (`apt-get install -y chromium`), which Playwright drives through
`executable_path`; without it these tests skip with a message saying how to install it (`.ci/run`
installs it, so CI never skips them). Screenshots go to each test's tmp dir.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.api.conftest import LiveServer, long_model_dir, start_live_server  # noqa: F401 (fixture)

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
INSTALL_HINT = "apt-get update && apt-get install -y chromium (and pip install -e '.[test]' for playwright)"
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
API_KEY = "sk-playground-test"


def chromium_path() -> str | None:
    """The Chromium executable to drive, or None."""
    for candidate in CHROMIUM_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return shutil.which("chromium")


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the whole session (skips with an install hint when absent)."""
    executable = chromium_path()
    if executable is None:
        pytest.skip(f"Chromium is not installed: {INSTALL_HINT}")
    sync_api = pytest.importorskip("playwright.sync_api", reason=f"playwright is missing: {INSTALL_HINT}")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield chromium
        chromium.close()


class ConsoleLog:
    """Console errors and uncaught page errors seen by one page."""

    def __init__(self, page) -> None:
        self.errors: list[str] = []
        page.on("console", lambda msg: msg.type == "error" and self.errors.append(msg.text))
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))


@pytest.fixture
def new_page(browser):
    """`new_page(viewport=DESKTOP) -> (page, console)`; every context is closed after the test."""
    contexts = []

    def make(viewport: dict = DESKTOP):
        context = browser.new_context(viewport=viewport)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(30_000)
        return page, ConsoleLog(page)

    yield make
    for context in contexts:
        context.close()


@pytest.fixture(scope="module")
def web_server(tiny_model_dir) -> LiveServer:
    """One server (no API key) on the tiny model for a test module."""
    live = start_live_server(tiny_model_dir)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir) -> LiveServer:
    """A server started with `--api-key API_KEY`."""
    live = start_live_server(tiny_model_dir, server={"api_key": API_KEY})
    yield live
    live.stop()
