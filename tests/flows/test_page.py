"""flows/page.py: the page the flow writes at the end of a run shows only what that run
finished, is logged to MLflow's ``pages`` experiment of the project's store, and never fails
the run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest

from flows.page import EXPERIMENT, PAGE, publish_page
from flows.summary import render_markdown, summarize_run

ROOT = Path(__file__).resolve().parents[2]


def _repo(tmp_path: Path) -> Path:
    """A checkout with params.yaml and an earlier run's registration and metrics."""
    repo = tmp_path / "repo"
    (repo / "reports").mkdir(parents=True)
    shutil.copy2(ROOT / "params.yaml", repo / "params.yaml")
    (repo / "reports" / "registration.json").write_text(
        json.dumps({"model_name": "classifier", "version": 7, "decision": "promoted"})
    )
    (repo / "reports" / "metrics.json").write_text(json.dumps({"accuracy": 0.5}))
    return repo


def test_failed_run_page_in_the_projects_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = _repo(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # params' relative sqlite store
    monkeypatch.chdir(tmp_path)  # the flow process need not run in the checkout
    summary = {
        "status": "failed",
        "flow_run_id": "abc",
        "stages": {"ingest": "ran", "validate": "ran", "train": "failed", "register": "not run"},
        "error": "stage train failed: loss is NaN",
    }
    result = publish_page(repo, summary)

    assert result is not None and Path(result["path"]) == repo / PAGE
    html = (repo / PAGE).read_text(encoding="utf-8")
    assert "stage train failed: loss is NaN" in html and "Prefect flow run abc" in html
    # register and evaluate did not finish in this run: the earlier run's files are not shown
    assert "No model registered by the last run." in html and "version 7" not in html
    assert "Test metrics: not available." in html
    store = repo / "mlflow" / "mlflow.db"  # params' sqlite:///mlflow/mlflow.db, from the repo
    assert store.is_file() and not (tmp_path / "mlflow").exists()
    client = mlflow.MlflowClient(f"sqlite:///{store}")
    run_id = result["mlflow_url"].rsplit("/", 1)[-1]
    assert client.get_experiment(client.get_run(run_id).info.experiment_id).name == EXPERIMENT
    assert [a.path for a in client.list_artifacts(run_id)] == ["index.html"]
    assert mlflow.get_tracking_uri() != f"sqlite:///{store}"  # nothing left set in the process


def test_a_page_never_fails_the_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    repo = _repo(tmp_path)
    (repo / "params.yaml").write_text("train: {max_epochs: -1}\n")  # bad: no MLflow, a page still
    result = publish_page(repo, {"status": "completed", "stages": {"ingest": "ran"}})
    assert result == {"path": str(repo / PAGE), "mlflow_url": None}

    (repo / PAGE).unlink()
    (repo / PAGE).mkdir()  # cannot be written: said, not raised
    assert publish_page(repo, {"status": "completed", "stages": {}}) is None
    assert "could not write or log reports/index.html" in caplog.text


def test_the_summary_links_the_page() -> None:
    summary = summarize_run(["ingest"], {"ingest": "ran"}, {}, "http://127.0.0.1:5000")
    summary["page"] = {"path": "/r/reports/index.html", "mlflow_url": "http://127.0.0.1:5000/#/x"}
    markdown = render_markdown(summary)
    assert "## Page\n\n`/r/reports/index.html`: the run on one page that opens offline" in markdown
    assert "([in MLflow](http://127.0.0.1:5000/#/x))" in markdown
