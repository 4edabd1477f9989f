"""reports/index.html of a real pipeline run, written by `make page`'s code, logged to MLflow,
rendered in Chromium with no network: every section and chart drawn, nothing failed."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from flows.page import EXPERIMENT, make_page, run_from_dvc
from tests.browser.harness import assert_clean
from tests.conftest import Reproduced

pytestmark = pytest.mark.slow  # the session's reproduced pipeline (one dvc repro)

SECTIONS = ("stages", "models", "gate", "quarantine", "curves", "monitor")


def _monitor_history(repo: Path) -> None:
    """Two checks as flows/monitor.py appends them (NOTES14-A's fields): ok, then retrain."""
    stamp = "20260102T000000Z"
    (repo / "reports" / "monitor" / stamp).mkdir(parents=True)
    (repo / "reports" / "monitor" / stamp / "drift.html").write_text(
        "<html><body>drift</body></html>"
    )
    common = {
        "model_name": "classifier",
        "model_version": "1",
        "alias": "champion",
        "f1_macro": None,
    }
    checks = [
        {
            **common,
            "checked_at": "2026-01-01T12:00:00+00:00",
            "rows": 300,
            "drift_share": 0.0,
            "drifted_columns": [],
            "psi": 0.02,
            "bad_row_share": 0.0,
            "accuracy": 0.95,
            "accuracy_source": "estimated",
            "decision": "ok",
            "reasons": [],
            "report_dir": None,
        },
        {
            **common,
            "checked_at": "2026-01-02T00:00:00+00:00",
            "rows": 300,
            "drift_share": 0.5,
            "drifted_columns": ["mean_radius"],
            "psi": 0.4,
            "bad_row_share": 0.0,
            "accuracy": 0.8,
            "accuracy_source": "estimated",
            "decision": "retrain",
            "reasons": ["15 of 30 features drifted"],
            "report_dir": f"reports/monitor/{stamp}",
        },
    ]
    (repo / "reports" / "monitor" / "history.jsonl").write_text(
        "".join(json.dumps(check) + "\n" for check in checks)
    )


def test_index_page_offline(
    pipeline_run: Reproduced, open_page, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", pipeline_run.uri)
    repo = pipeline_run.repo
    _monitor_history(repo)
    run = run_from_dvc(repo)
    assert run is not None
    result = make_page(repo, run)

    page_file = Path(result["path"])
    assert page_file == repo / "reports" / "index.html"
    client = mlflow.MlflowClient(pipeline_run.uri)
    run_id = result["mlflow_url"].rsplit("/", 1)[-1]
    assert [a.path for a in client.list_artifacts(run_id)] == ["index.html"]
    assert client.get_experiment(client.get_run(run_id).info.experiment_id).name == EXPERIMENT

    visit = open_page(page_file.as_uri(), name="index")
    page = visit.page
    for anchor in SECTIONS:
        assert page.locator(f"section#{anchor}").is_visible(), anchor
    assert page.locator("#stages tbody tr").count() == len(run.stages)
    # drawn: the confusion matrix, ROC/PR and loss curves, the monitor's charts
    assert page.locator("#models svg rect").count() >= 4
    assert page.locator("#curves svg polyline").count() >= 2
    assert page.locator("#monitor svg circle").count() >= 2
    assert page.locator("#monitor tr.retrain").count() == 1
    drift = page.locator('#monitor a[href$="drift.html"]')
    assert (page_file.parent / drift.get_attribute("href")).is_file()
    docs = page.locator("nav a", has_text="Data Docs")
    assert (page_file.parent / docs.get_attribute("href")).is_file()
    assert visit.requested == [page_file.as_uri()]  # the page alone: everything is in it
    assert_clean(visit)
