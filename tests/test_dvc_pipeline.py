"""End to end through the `dvc repro` entry point, in a temporary git + DVC repo.

Real DVC, MLflow (temp sqlite), GX and torch. The Prefect entry point has its own end-to-end
tests in tests/flows/.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from stages.common.io import open_dataset
from tests.conftest import Reproduced, copy_reproduced, dvc, make_pipeline_repo, write_params

pytestmark = pytest.mark.slow


def _digest(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _client(uri: str):
    # Explicit URI: another test may have set MLflow's process-wide tracking URI.
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _champion(uri: str, model_name: str = "classifier"):
    return _client(uri).get_model_version_by_alias(model_name, "champion")


@pytest.fixture(scope="module")
def reproduced(
    reproduced_pipeline: Reproduced, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    """A copy of the session's one real `dvc repro` of the default pipeline, shared by the
    tests of this module."""
    copy = copy_reproduced(reproduced_pipeline, tmp_path_factory.mktemp("dvc-e2e"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", copy.uri)
        yield copy.repo, copy.uri


def test_repro_registers_a_champion_and_leaves_nothing_to_do(reproduced) -> None:
    repo, uri = reproduced
    champion = _champion(uri)
    registration = json.loads((repo / "reports/registration.json").read_text())
    assert registration["decision"] == "promoted"
    assert str(champion.version) == str(registration["version"])

    # ingest always asks its source again; the same rows leave data/raw (and its mtimes) as
    # they were, so DVC runs nothing else.
    before = {p: p.stat().st_mtime_ns for p in (repo / "data").rglob("*") if p.is_file()}
    again = dvc(repo, "repro")
    assert "Running stage 'ingest'" in again.stdout
    for stage in ("validate", "features", "train", "evaluate", "register"):
        assert f"Stage '{stage}' didn't change, skipping" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (repo / "data").rglob("*") if p.is_file()} == before
    status = json.loads(dvc(repo, "status", "--json").stdout or "{}")
    assert status == {"ingest": ["always changed"]}, status


def test_metrics_and_plots_are_readable_by_dvc(reproduced) -> None:
    repo, _ = reproduced
    metrics = json.loads(dvc(repo, "metrics", "show", "--json").stdout)
    values = json.dumps(metrics)
    for name in ("accuracy", "f1_macro", "roc_auc_macro", "roc_auc_micro", "log_loss"):
        assert name in values
    out = repo / "plots-html"
    dvc(repo, "plots", "show", "-o", str(out))
    assert (out / "index.html").stat().st_size > 1000


def test_run_records_lineage(reproduced) -> None:
    repo, uri = reproduced
    client = _client(uri)
    run = client.get_run(_champion(uri).run_id)
    tags = run.data.tags
    head = (repo / ".git/HEAD").read_text()
    assert len(tags["git.commit"]) == 40 and tags["git.dirty"] in ("true", "false")
    assert head  # the repo has a commit, so the tag is a real sha
    assert any(key.startswith("dvc.data/features") for key in tags), tags
    assert run.data.params["train.lr"] == "0.001"
    assert run.inputs.dataset_inputs, "the training data is logged as an MLflow input"
    assert all(d.dataset.digest for d in run.inputs.dataset_inputs)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "validation" in artifacts


def _snapshot(repo: Path) -> dict[str, str]:
    files = [
        p
        for d in ("data/validated", "data/features", "models")
        for p in (repo / d).rglob("*")
        if p.is_file()
    ]
    return {str(p.relative_to(repo)): _digest(p) for p in files}


@pytest.mark.parametrize(
    ("overrides", "csv", "expected"),
    [
        ({"train": {"lr": -0.1}}, None, ["train.lr", "greater than 0"]),
        ({"train": {"model": "xgboost"}}, None, ["train.model"]),
        ({"ingest": {"source": "data/source/missing.csv"}}, None, ["missing.csv"]),
        (
            {"ingest": {"source": "data/source/bad.csv"}},
            "bad_label",
            ["column=target", "rule=label", "max_bad_fraction"],
        ),
        (
            {"ingest": {"source": "data/source/bad.csv"}},
            "text_in_numeric",
            ["column=mean_radius", "rule=type", "twelve"],
        ),
        (
            {"ingest": {"source": "data/source/bad.csv", "target": "diagnosis"}},
            "bad_label",
            ["diagnosis"],
        ),
    ],
    ids=[
        "negative-lr",
        "unknown-model",
        "missing-source",
        "label-outside-set",
        "text-in-numeric-column",
        "missing-target-column",
    ],
)
def test_bad_input_fails_repro_and_changes_nothing(reproduced, overrides, csv, expected) -> None:
    repo, uri = reproduced
    before, champion_before = _snapshot(repo), _champion(uri).version
    params_before = (repo / "params.yaml").read_text()
    if csv:
        _write_bad_csv(repo, csv)
    try:
        write_params(repo, overrides)
        result = dvc(repo, "repro", check=False)
        output = result.stdout + result.stderr
        assert result.returncode != 0, output
        for fragment in expected:
            assert fragment in output, output
        assert _snapshot(repo) == before
        assert _champion(uri).version == champion_before
    finally:
        (repo / "params.yaml").write_text(params_before)
        (repo / "data/source/bad.csv").unlink(missing_ok=True)


def _write_bad_csv(repo: Path, kind: str) -> None:

    df = open_dataset(repo / "data/raw").to_table().to_pandas()
    if kind == "bad_label":  # 10 of 569 rows: over the 1% that may go to quarantine
        df.loc[df.index[:10], "target"] = 7
    elif kind == "text_in_numeric":
        df["mean_radius"] = df["mean_radius"].astype(object)
        df.loc[df.index[3], "mean_radius"] = "twelve"
    df.to_csv(repo / "data/source/bad.csv", index=False)


DIGITS_CNN = {
    "ingest": {"source": "sklearn:digits"},
    "validate": {"suite_path": "suites/digits.json"},
    "train": {"model": "cnn", "image_shape": [1, 8, 8], "max_epochs": 8, "patience": 3, "lr": 0.01},
    "register": {"model_name": "digits", "min_metrics": {"accuracy": 0.8}, "max_metrics": {}},
}


@pytest.mark.stack  # a whole pipeline on real data (~60 s): keeps make test under 20 minutes
def test_cnn_path_on_digits_images(tmp_path: Path, mlflow_uri: str) -> None:
    repo = make_pipeline_repo(tmp_path / "repo", DIGITS_CNN)
    result = dvc(repo, "repro", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    meta = json.loads((repo / "data/features/meta.json").read_text())
    assert meta["classes"] == list(range(10)) and meta["n_features"] == 64
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert metrics["accuracy"] > 0.8
    champion = _champion(mlflow_uri, "digits")
    assert json.loads((repo / "reports/registration.json").read_text())["version"] in (
        champion.version,
        int(champion.version),
    )


def _write_wine_csv(path: Path) -> None:
    """A user's own table: text labels, a text column and a gap in a numeric column."""
    import numpy as np
    from sklearn.datasets import load_wine

    frame = load_wine(as_frame=True).frame
    frame.columns = [str(c).replace("/", "_") for c in frame.columns]
    frame["region"] = np.where(frame.index % 3 == 0, "north", "south")
    frame.loc[5, "alcohol"] = np.nan
    frame["cultivar"] = frame.pop("target").map({0: "barolo", 1: "grignolino", 2: "barbera"})
    frame.to_csv(path, index=False)


@pytest.mark.stack  # a whole pipeline on a real table (~55 s): as above
def test_own_csv_with_text_columns_and_gaps(tmp_path: Path, mlflow_uri: str) -> None:
    import subprocess
    import sys

    import mlflow
    import pandas as pd

    repo = make_pipeline_repo(
        tmp_path / "repo",
        {
            "ingest": {"source": "data/source/wine.csv", "target": "cultivar"},
            "validate": {"suite_path": "suites/wine.json"},
            "train": {"max_epochs": 60, "patience": 10, "lr": 0.01},
            "register": {"model_name": "wine"},
        },
    )
    _write_wine_csv(repo / "data/source/wine.csv")
    # The README's steps: ingest, write a suite from the trusted snapshot, then repro.
    for args in (
        ["stages.ingest", "--out", "data/raw"],
        ["stages.validate", "suite", "--snapshot", "data/raw", "--out", "suites/wine.json"],
    ):
        subprocess.run([sys.executable, "-m", *args], cwd=repo, check=True, capture_output=True)
    result = dvc(repo, "repro", check=False)
    assert result.returncode == 0, result.stdout + result.stderr

    registration = json.loads((repo / "reports/registration.json").read_text())
    assert registration["decision"] == "promoted", registration["reason"]
    mlflow.set_tracking_uri(mlflow_uri)  # not a process-wide URI an earlier test left
    model = mlflow.pyfunc.load_model("models:/wine@champion")
    rows = pd.read_parquet(repo / "data/features/test.parquet").drop(columns=["cultivar"])
    rows.loc[rows.index[0], "alcohol"] = float("nan")  # imputed, as in training
    predicted = model.predict(rows.head(3))
    assert set(predicted["prediction"]) <= {"barolo", "grignolino", "barbera"}
    assert {"proba_barbera", "proba_barolo", "proba_grignolino"} <= set(predicted.columns)
