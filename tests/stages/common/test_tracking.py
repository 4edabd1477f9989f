"""Lineage helpers read the real git and dvc.lock; MLflow set-up uses a temp store."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from stages.common.config import MlflowParams
from stages.common.tracking import (
    FLOW_RUN_ENV,
    configure_mlflow,
    dvc_lock_hashes,
    git_state,
    lineage_tags,
)


def test_git_state_reports_commit_and_dirty_flag(tmp_path: Path) -> None:
    assert git_state(tmp_path) == {"git.commit": "unknown", "git.dirty": "false"}
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "t@e.st"],
        ["git", "config", "user.name", "t"],
    ):
        subprocess.run(cmd, cwd=tmp_path, check=True)
    (tmp_path / "a.txt").write_text("1")
    subprocess.run(["git", "add", "a.txt"], cwd=tmp_path, check=True)
    subprocess.run(["git", "commit", "-qm", "c"], cwd=tmp_path, check=True)
    state = git_state(tmp_path)
    assert len(state["git.commit"]) == 40 and state["git.dirty"] == "false"
    (tmp_path / "a.txt").write_text("2")
    assert git_state(tmp_path)["git.dirty"] == "true"


def test_dvc_lock_hashes_and_flow_run_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  ingest:\n    cmd: x\n    outs:\n"
        "    - path: data/raw\n      hash: md5\n      md5: abc.dir\n"
    )
    assert dvc_lock_hashes(tmp_path / "dvc.lock") == {"dvc.data/raw.md5": "abc.dir"}
    monkeypatch.setenv(FLOW_RUN_ENV, "1234")
    tags = lineage_tags(tmp_path)
    assert tags["prefect.flow_run_id"] == "1234" and tags["dvc.data/raw.md5"] == "abc.dir"


def test_configure_mlflow_creates_experiment_beside_the_store(mlflow_uri: str) -> None:
    import mlflow

    experiment_id = configure_mlflow(MlflowParams(experiment="exp"))
    assert configure_mlflow(MlflowParams(experiment="exp")) == experiment_id
    location = mlflow.get_experiment(experiment_id).artifact_location
    assert location.endswith("/mlflow/artifacts")
    assert mlflow.get_tracking_uri() == mlflow_uri


def test_metric_buffer_sends_in_batches(mlflow_uri: str) -> None:
    import mlflow
    from mlflow import MlflowClient

    from stages.common.tracking import MetricBuffer

    configure_mlflow(MlflowParams(experiment="buffer"))
    with mlflow.start_run() as run:
        buffer = MetricBuffer(run.info.run_id, every_s=3600)
        for epoch in range(1, 4):
            buffer.add({"val_loss": 1.0 / epoch}, step=epoch)
        assert MlflowClient().get_metric_history(run.info.run_id, "val_loss") == []
        buffer.flush()
    history = MlflowClient().get_metric_history(run.info.run_id, "val_loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
