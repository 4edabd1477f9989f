"""``python -m flows.artifacts``: a bad params file is one error message and exit 1, not a
traceback (the checks themselves: tests/serving/test_artifact_integrity.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flows import artifacts as artifacts_cli


@pytest.mark.parametrize("text", ["register: [unclosed\n", "register:\n  no_such_key: 1\n"])
def test_a_bad_params_file_is_one_error_and_exit_1_not_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(text)

    with caplog.at_level(logging.ERROR):
        code = artifacts_cli.main(["verify", "models:/m/1", "--params", str(params)])

    assert code == 1
    [record] = [r for r in caplog.records if r.name == "flows.artifacts"]
    assert record.getMessage().startswith(f"{params}: ") and record.exc_info is None
