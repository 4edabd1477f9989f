"""Browser fixtures: ``browser`` (one Chromium per session) and ``open_page``; what counts as a
problem and where screenshots go: ``tests/browser/harness.py``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.harness import (
    CHROMIUM,
    CHROMIUM_ARGS,
    VIEWPORT,
    Visit,
    artifacts_dir,
    reached_outside,
    safe_name,
    watch,
)
from tests.conftest import Reproduced, copy_reproduced


def require_chromium(path: Path) -> None:
    """Skip when Chromium is not at ``path``; fail instead under CI (env ``CI`` set), where
    `make test-deps` installs it and the browser tests must run, not pass as skips."""
    if not path.exists():
        missing = f"no Chromium at {path}: `make test-deps` installs it (root, apt-get)"
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)


# Package scope, not session: Playwright's sync API keeps an asyncio event loop running in the
# main thread while it is open, and every later test that calls asyncio.run() or Prefect's sync
# API (which then hands back coroutines) would break. It closes after the last browser test.
@pytest.fixture(scope="package")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium for the browser tests (skipped when it is not installed, failed
    under CI, where `make test-deps` installs it); at the end, its net log must show nothing
    reached outside this machine."""
    require_chromium(CHROMIUM)
    from playwright.sync_api import sync_playwright

    net_log = tmp_path_factory.mktemp("chromium") / "net-log.json"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=[*CHROMIUM_ARGS, f"--log-net-log={net_log}"]
        )
        try:
            yield browser
        finally:
            browser.close()
    outside = reached_outside(net_log)
    assert not outside, f"Chromium reached outside this machine: {outside}"


@pytest.fixture
def open_page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Callable[..., Visit]]:
    """``open_page(url, name=None, init_script=None) -> Visit``: load ``url`` in a fresh
    context (no cache or storage shared with other tests), watching every request; the page's
    screenshot is saved when the test ends, passed or failed."""
    visits: list[tuple[Visit, Any]] = []

    def open_(url: str, name: str | None = None, init_script: str | None = None) -> Visit:
        context = browser.new_context(viewport=VIEWPORT, service_workers="block")
        page = context.new_page()
        visit = Visit(page, name or f"{request.node.name}-{len(visits)}")
        visits.append((visit, context))
        watch(context, page, visit)
        if init_script:
            context.add_init_script(init_script)
        page.goto(url, wait_until="load")
        return visit

    yield open_
    folder = artifacts_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for visit, context in visits:
        try:
            visit.page.screenshot(path=str(folder / f"{safe_name(visit.name)}.png"), full_page=True)
        finally:
            context.close()


@pytest.fixture(scope="session")
def pipeline_run(
    reproduced_pipeline: Reproduced, tmp_path_factory: pytest.TempPathFactory
) -> Reproduced:
    """One copy of the session's reproduced pipeline for every browser test: they add pages
    to it (the index page, the plots) and read the rest, so one copy serves them all."""
    return copy_reproduced(reproduced_pipeline, tmp_path_factory.mktemp("browser-run"))
