"""The browser harness: headless Chromium (the distribution's; ``make test-deps`` installs it)
opening pages that must work offline.

Every page request that is not ``file:``, ``data:``, ``blob:`` or a loopback host is blocked and
recorded; a blocked or failed request, an HTTP error answer, a console error and an uncaught
page error are problems, and a test fails on any (``assert_clean``). Each page's screenshot is
kept under ``$TEST_ARTIFACTS/browser/`` (default ``tests/.artifacts/browser/``), also when the
test fails.

Chromium itself (the browser process, not a page) asks Google for accounts
(``accounts.google.com/ListAccounts``: IdentityManager, which no switch turns off) and GCM
(``android.clients.google.com/checkin``) right after start, whatever the switches below say.
``--host-resolver-rules`` maps every name but loopback to "not found" inside Chromium, so those
requests end before a DNS query: nothing leaves the machine. The session's net log checks that
(``reached_outside``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
CHROMIUM_ARGS = [
    "--no-sandbox",  # root in a container: Chromium's sandbox needs user namespaces
    "--disable-background-networking",  # no safe-browsing, translate, variations fetches
    "--disable-component-update",
    "--disable-client-side-phishing-detection",
    "--disable-domain-reliability",
    "--disable-default-apps",
    "--disable-sync",
    "--metrics-recording-only",  # record metrics, never upload them
    "--no-first-run",
    "--no-default-browser-check",
    "--no-pings",
    # the guarantee: no name but loopback resolves, so no request leaves the machine
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
]
VIEWPORT = {"width": 1280, "height": 900}
_LOOPBACK_ADDRESS = re.compile(r"(127\.|\[::1\]|::1)")


def artifacts_dir() -> Path:
    """Where screenshots go: ``$TEST_ARTIFACTS/browser`` or ``tests/.artifacts/browser``."""
    base = os.environ.get("TEST_ARTIFACTS")
    return (Path(base) if base else ROOT / "tests" / ".artifacts") / "browser"


def is_local(url: str) -> bool:
    """Whether loading ``url`` stays on this machine."""
    parts = urlsplit(url)
    if parts.scheme in ("file", "data", "blob", "about"):
        return True
    return parts.scheme in ("http", "https", "ws") and (parts.hostname or "") in LOOPBACK


@dataclass
class Visit:
    """One page opened by ``open_page``: the Playwright page and what went wrong on it."""

    page: Any  # playwright.sync_api.Page
    name: str
    problems: list[str] = field(default_factory=list)
    requested: list[str] = field(default_factory=list)


def watch(context: Any, page: Any, visit: Visit) -> None:
    """Record every request of ``context``, block those off this machine, note problems."""

    def route(route: Any) -> None:
        url = route.request.url
        visit.requested.append(url)
        if is_local(url):
            route.continue_()
        else:
            visit.problems.append(f"blocked a request off this machine: {url}")
            route.abort("blockedbyclient")

    def console(message: Any) -> None:
        if message.type == "error":
            visit.problems.append(f"console error: {message.text} ({message.location.get('url')})")

    def failed(request: Any) -> None:
        if is_local(request.url):  # the blocked ones are noted already
            visit.problems.append(f"request failed: {request.url} ({request.failure})")

    def answered(response: Any) -> None:
        if response.status >= 400:
            visit.problems.append(f"HTTP {response.status}: {response.url}")

    context.route("**/*", route)
    page.on("console", console)
    page.on("pageerror", lambda exc: visit.problems.append(f"page error: {exc}"))
    page.on("requestfailed", failed)
    page.on("response", answered)


def assert_clean(visit: Visit) -> None:
    """Fail naming every problem the page had (blocked or failed requests, errors)."""
    assert not visit.problems, f"{visit.name}:\n" + "\n".join(visit.problems)


def safe_name(name: str) -> str:
    """A file name for a screenshot."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:120]


def reached_outside(net_log: Path) -> list[str]:
    """DNS queries and connections to anything but loopback in a Chromium net log."""
    try:
        log = json.loads(net_log.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []  # Chromium wrote none (killed): the pages' own checks still ran
    names = {value: key for key, value in log["constants"]["logEventTypes"].items()}
    left = set()
    for event in log.get("events", []):
        kind, params = names.get(event.get("type")), event.get("params") or {}
        host = params.get("hostname")  # on a query's start event only
        if kind == "DNS_TRANSACTION" and host and host not in LOOPBACK:
            left.add(f"DNS query for {host}")
        addresses = params.get("address_list") or []
        if kind == "TCP_CONNECT" and addresses and not _LOOPBACK_ADDRESS.match(str(addresses[0])):
            left.add(f"connection to {addresses}")
    return sorted(left)
