"""Issue 12's "done when", end to end on a fresh project: `make tune` (which brings the
features up to date first) writes tuned values into params.yaml, then `make run` trains them
and registers the result through the gate.

Real Prefect (test server), real DVC repo, real MLflow store, trials as real processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from flows.pipeline import pipeline
from tests.conftest import make_pipeline_repo

# A slow starting lr outside the searched range: the study has no baseline trial, so the
# best trial's value is written back whatever it is, and it must differ.
START_LR = 0.0003
TUNED = {
    "train": {"hidden_sizes": [16], "lr": START_LR, "max_epochs": 8, "patience": 3},
    "tune": {
        "trials": 3,
        "pruner": "none",
        "space": {"mlp": {"lr": {"low": 0.003, "high": 0.03, "log": True}}},
    },
}


@pytest.mark.slow
@pytest.mark.stack
def test_tune_writes_params_and_the_next_run_registers_the_tuned_model(
    prefect_api: str, tmp_path: Path, mlflow_uri: str
) -> None:
    repo = make_pipeline_repo(tmp_path / "repo", TUNED)
    assert not (repo / "data/features").exists()  # a fresh clone: make tune makes them first

    tune = subprocess.run(
        [sys.executable, "-m", "flows.tune", "--repo", str(repo)],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert tune.returncode == 0, tune.stdout[-3000:] + tune.stderr[-3000:]
    tuned_lr = yaml.safe_load((repo / "params.yaml").read_text())["train"]["lr"]
    assert 0.003 <= tuned_lr <= 0.03 and tuned_lr != START_LR

    assert "dvc repro features" in tune.stderr
    run = pipeline(repo=str(repo), return_state=True)

    assert run.is_completed(), run.message
    stages = run.result()["stages"]
    assert stages["train"] == "ran" and stages["features"] == "skipped"  # tune made them
    record = json.loads((repo / "reports/registration.json").read_text())
    # read once the runs are done (the stale pages once seen here came from the pre-flight
    # check's plain open() of the store: test_preflight's test of a store held open)
    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    version = client.get_model_version("classifier", str(record["version"]))
    assert str(record["version"]) == "1"  # the tuned model, judged by the gate like any other
    train_run = client.get_run(version.run_id)
    assert float(train_run.data.params["train.lr"]) == pytest.approx(tuned_lr)
    assert record["decision"]  # promoted, or kept as challenger: the gate decided and said so
