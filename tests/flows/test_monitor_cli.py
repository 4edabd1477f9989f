"""``python -m flows.monitor`` on bad input: exit code 2 and one message naming the file or
setting and the fix (no prediction log; no watched model in the registry), nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.monitor import HISTORY, main
from tests.builders import TEST_PARAMS


def _repo(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    raw = {name: dict(section) for name, section in TEST_PARAMS.items()}
    raw["register"] = {**raw["register"], "model_name": "nobody-registered-me"}
    raw["monitor"] = {"metrics_url": None}
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return root


def test_no_log_and_no_watched_model_exit_2_with_the_fix(
    prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    repo = _repo(tmp_path)
    assert main(["--repo", str(repo)]) == 2
    err = capsys.readouterr().err
    assert "data/predictions: no prediction log folder" in err and "serve.sample_rate" in err

    (repo / "data" / "predictions").mkdir(parents=True)
    assert main(["--repo", str(repo)]) == 2
    err = capsys.readouterr().err
    assert "no watched model: models:/nobody-registered-me@champion" in err
    assert "register a model first" in err
    assert not (repo / HISTORY).exists()


def test_a_relative_sqlite_store_is_opened_in_the_repo_not_the_cwd(
    prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    repo = _repo(tmp_path / "repo")
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["mlflow"] = {**raw.get("mlflow", {}), "tracking_uri": "sqlite:///mlflow/mlflow.db"}
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    (repo / "mlflow").mkdir()
    (repo / "data" / "predictions").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["--repo", str(repo)]) == 2
    assert "no watched model: models:/nobody-registered-me@champion" in capsys.readouterr().err
    assert (repo / "mlflow" / "mlflow.db").is_file() and not (elsewhere / "mlflow").exists()
