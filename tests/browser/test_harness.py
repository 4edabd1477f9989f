"""The harness catches what would break offline: a request off this machine, a missing local
file, a console error, an uncaught script error."""

from __future__ import annotations

from pathlib import Path

from tests.browser.harness import is_local


def test_problems_are_caught(open_page, tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><body><p>broken</p>"
        '<img src="https://cdn.example.com/logo.png">'
        '<link rel="stylesheet" href="missing.css">'
        "<script>console.error('boom'); undefinedFunction();</script></body></html>"
    )
    visit = open_page(page.as_uri(), name="harness-broken")
    problems = "\n".join(visit.problems)
    assert "blocked a request off this machine: https://cdn.example.com/logo.png" in problems
    assert "missing.css" in problems
    assert "console error: boom" in problems
    assert "page error:" in problems and "undefinedFunction" in problems
    visit.problems.clear()  # caught: this test passes


def test_local_means_this_machine() -> None:
    assert is_local("file:///tmp/x.html") and is_local("http://127.0.0.1:5000/x")
    assert is_local("data:image/png;base64,AA") and is_local("http://localhost:8000/docs")
    assert not is_local("https://cdn.jsdelivr.net/npm/x.js")
    assert not is_local("http://127.0.0.1.example.com/x")
