"""The run summary's "model vs gbdt" table (flows/summary.py): evaluate's strong baseline."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.summary import mlflow_ui_url, render_markdown, summarize_run

STAGES = ["train", "evaluate"]
METRICS = {
    "accuracy": 0.95,
    "log_loss": 0.12,
    "baseline_logistic_accuracy": 0.93,
    "strong_gbdt_accuracy": 0.96,
    "strong_gbdt_log_loss": 0.1,
}


def test_model_vs_gbdt_table_on_the_same_test_split() -> None:
    reports = {"metrics": METRICS, "registration": None, "run": None}
    summary = summarize_run(STAGES, dict.fromkeys(STAGES, "ran"), reports, "http://x")

    assert summary["versus_gbdt"] == {
        "accuracy": {"model": 0.95, "gbdt": 0.96},
        "log_loss": {"model": 0.12, "gbdt": 0.1},
    }
    markdown = render_markdown(summary)
    assert "## Model vs gbdt on the same test split" in markdown
    assert "| accuracy | 0.9500 | 0.9600 |" in markdown
    assert "| strong_gbdt_accuracy |" not in markdown  # not repeated in the metrics table
    assert "| baseline_logistic_accuracy | 0.9300 |" in markdown


def test_no_table_without_a_strong_baseline() -> None:
    old = {k: v for k, v in METRICS.items() if not k.startswith("strong_")}
    for metrics in (old, None):
        reports = {"metrics": metrics, "registration": None, "run": None}
        summary = summarize_run(STAGES, {"train": "ran"}, reports, "http://x")
        assert summary["versus_gbdt"] is None
        assert "Model vs gbdt" not in render_markdown(summary)


def test_the_mlflow_link_is_the_tracking_server_when_runs_go_to_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the stack (make run REMOTE=1) the link opens the MLflow server, not `make ui`'s port."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001/")
    assert mlflow_ui_url(tmp_path) == "http://127.0.0.1:5001"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow/mlflow.db")
    assert mlflow_ui_url(tmp_path) == "http://127.0.0.1:5000"
