"""Without Chromium the browser tests skip on a workstation but fail under CI (review #11)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.browser.conftest import require_chromium


def test_missing_chromium_skips_locally_and_fails_under_ci(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "chromium"
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no Chromium at .*make test-deps"):
        require_chromium(missing)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no Chromium at"):
        require_chromium(missing)
    missing.touch()
    require_chromium(missing)  # there: neither
