"""The loop closed, for real: a model trained by the real stages on palmerpenguins (a real public
table, not the project's default), served by the real service on 127.0.0.1 logging every
request; the monitor flow (``flows.monitor``) on the shared Prefect test API; the pipeline's
deployment (``flows.schedule.pipeline_deployment``) carrying the retraining trigger.

Unshifted traffic (held-out rows the model never trained on: val + test, each once, lightly
jittered, so a false alarm on unseen data would show) -> "ok", no event, no pipeline run. Shifted
traffic (three features scaled or moved, the class balance tipped to one species) -> drift found
by Evidently, the retraining event emitted, and the trigger creates a pipeline run whose
``reason`` is the monitor's. The deployment has a name of its own and is deleted at the end.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from flows.monitor import HISTORY, monitor
from flows.schedule import pipeline_deployment
from monitoring.reference import FEATURES_TAG
from serving.app import ServiceConfig
from serving.model import load_model
from stages.common.config import load_params
from tests.builders import TEST_PARAMS
from tests.serving.conftest import register_table_model, registry_once, tables_once
from tests.serving.live import live_service, request

pytestmark = pytest.mark.slow

SUFFIX = uuid.uuid4().hex[:6]  # the Prefect harness is shared by the session
MODEL = f"monitor-{SUFFIX}"
DEPLOYMENT = f"monitor-loop-{SUFFIX}"  # not the shared default name
FEATURES_MD5 = "0123456789abcdef0123456789abcdef.dir"  # the version's data, as dvc.lock has it
ROWS_PER_REQUEST = 16
# The held-out rows (val + test, ~124 of 344) are sent each once: drawing them with replacement
# up to 200 repeats rows, and the drift tests, which take rows as independent, then read the
# held-out split's own sampling noise as drift (island, bill length and sex "drifted" so).
MIN_ROWS = 100
JITTER = 0.05  # of each numeric column's standard deviation
SHIFTED_ROWS = 300
TRIGGER_TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class Loop:
    repo: Path
    port: int
    rows: pd.DataFrame  # every row of the table, target "species" included
    held_out: pd.DataFrame  # the val and test splits' rows (never trained on)
    version: str


def _workspace(root: Path, features: Path, port: int) -> Path:
    """A project folder: params.yaml, the features the version was trained on, dvc.lock."""
    shutil.copytree(features, root / "data" / "features")
    lock = {"stages": {"features": {"outs": [{"path": "data/features", "md5": FEATURES_MD5}]}}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    raw = {name: dict(section) for name, section in TEST_PARAMS.items()}
    raw["register"] = {**raw["register"], "model_name": MODEL}
    raw["schedule"] = {**raw.get("schedule", {}), "deployment": DEPLOYMENT}
    raw["monitor"] = {
        "metrics_url": f"http://127.0.0.1:{port}/metrics",
        "min_rows": MIN_ROWS,
        "state_dir": "data/monitor",
    }
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    load_params(root / "params.yaml")  # valid before anything runs
    return root


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    """The penguins model registered as ``MODEL`` v1 (champion, with its test accuracy and
    data lineage), served with every request logged, and the project folder around it."""
    registry = registry_once(tmp_path_factory)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", registry.uri)
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        penguins = tables_once(tmp_path_factory, registry)["penguins"]
        mlflow.set_tracking_uri(registry.uri)
        version = register_table_model(penguins, MODEL)
        client = mlflow.MlflowClient()
        client.set_registered_model_alias(MODEL, "champion", version)
        client.set_model_version_tag(MODEL, version, FEATURES_TAG, FEATURES_MD5)
        train, val, test = (
            pd.read_parquet(penguins.features / f"{s}.parquet") for s in ("train", "val", "test")
        )
        scored = load_model(f"models:/{MODEL}/{version}").predict(test.drop(columns="species"))
        accuracy = float((scored["prediction"].astype(str) == test["species"].astype(str)).mean())
        client.log_metric(
            client.get_model_version(MODEL, version).run_id, "test_accuracy", accuracy
        )
        repo = tmp_path_factory.mktemp("monitor-repo")
        config = ServiceConfig(
            model_name=MODEL,
            tracking_uri=registry.uri,
            sample_rate=1.0,
            log_dir=str(repo / "data" / "predictions"),
            log_flush_interval_s=0.2,
            row_policy="flag",  # shifted rows out of the suite's range are scored and marked
        )
        try:
            with live_service(config) as port:
                _workspace(repo, penguins.features, port)
                rows = pd.concat([train, val, test], ignore_index=True)
                yield Loop(repo, port, rows, pd.concat([val, test], ignore_index=True), version)
        finally:
            mlflow.set_tracking_uri(None)


def _send(loop: Loop, frame: pd.DataFrame) -> None:
    """Score ``frame`` (target dropped) through /predict, then wait until the log has it."""
    inputs = frame.drop(columns="species").astype(object)
    records = inputs.where(inputs.notna(), None).to_dict("records")
    log = loop.repo / "data" / "predictions"
    before = sum(len(pd.read_parquet(p)) for p in log.glob("part-*.parquet"))
    for start in range(0, len(records), ROWS_PER_REQUEST):
        status, body = request(
            loop.port,
            "POST",
            "/predict",
            {"dataframe_records": records[start : start + ROWS_PER_REQUEST]},
        )
        assert status == 200, body[:500]
    deadline = time.monotonic() + 30
    while sum(len(pd.read_parquet(p)) for p in log.glob("part-*.parquet")) < before + len(records):
        assert time.monotonic() < deadline, "the service did not log the rows"
        time.sleep(0.1)


def _unshifted(loop: Loop) -> pd.DataFrame:
    """The held-out rows in a random order, each number moved by a little noise (kept inside
    the table's range, and whole where the column is whole)."""
    sample = loop.held_out.sample(frac=1.0, random_state=11).reset_index(drop=True)
    assert len(sample) >= MIN_ROWS
    rng = np.random.default_rng(11)
    for column in sample.select_dtypes("number").columns.drop("year", errors="ignore"):
        values, known = sample[column].astype(float), loop.rows[column].dropna()
        moved = values + rng.normal(0, JITTER * known.std(), len(values))
        if (known % 1 == 0).all():
            moved = moved.round()
        sample[column] = moved.clip(known.min(), known.max())
    return sample


def _shifted(rows: pd.DataFrame) -> pd.DataFrame:
    """Mostly Gentoo (the class balance tipped), longer bills, heavier, longer flippers."""
    weights = rows["species"].map({"Gentoo": 8.0}).fillna(1.0)
    sample = rows.sample(SHIFTED_ROWS, replace=True, weights=weights, random_state=7).copy()
    sample["bill_length_mm"] = sample["bill_length_mm"] * 1.25
    sample["body_mass_g"] = sample["body_mass_g"] + 900
    sample["flipper_length_mm"] = sample["flipper_length_mm"] + 12
    return sample.reset_index(drop=True)


def _runs_of(deployment_id: Any) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )


def test_drift_in_served_traffic_triggers_retraining_and_unshifted_traffic_does_not(
    prefect_api: str, loop: Loop
) -> None:
    from prefect.client.orchestration import get_client

    params = load_params(loop.repo / "params.yaml")
    assert params.schedule.deployment == DEPLOYMENT
    deployment_id = pipeline_deployment(loop.repo, params).apply()
    try:
        _check_the_loop(loop, deployment_id)
    finally:
        with get_client(sync_client=True) as client:
            for run in _runs_of(deployment_id):
                client.delete_flow_run(run.id)
            client.delete_deployment(deployment_id)


def _check_the_loop(loop: Loop, deployment_id: Any) -> None:
    repo = str(loop.repo)
    unshifted = _unshifted(loop)
    _send(loop, unshifted)  # unseen rows from the training distribution
    ok = monitor(repo)
    assert ok["decision"] == "ok", ok["reasons"]
    assert ok["rows"] == len(unshifted) and ok["model_version"] == loop.version
    assert ok["accuracy_source"] == "estimated" and ok["service"]["available"]
    assert not ok["event_emitted"]
    assert ok["service"]["requests"] >= len(unshifted) // ROWS_PER_REQUEST

    again = monitor(repo)  # the watermark moved on: nothing new to decide on
    assert again["decision"] == "waiting" and again["rows"] == 0

    _send(loop, _shifted(loop.rows))
    drifted = monitor(repo)
    assert drifted["decision"] == "retrain" and drifted["event_emitted"]
    assert drifted["rows"] == SHIFTED_ROWS
    assert {"bill_length_mm", "body_mass_g", "flipper_length_mm"} <= set(drifted["drifted_columns"])
    reason = "; ".join(drifted["reasons"])
    assert "feature drift" in reason and "bill_length_mm" in reason

    deadline = time.monotonic() + TRIGGER_TIMEOUT_S
    while not (runs := _runs_of(deployment_id)):
        assert time.monotonic() < deadline, "the retraining event started no pipeline run"
        time.sleep(0.5)
    [run] = runs  # one: the unshifted check asked for nothing
    assert run.parameters["reason"] == reason

    history = [json.loads(line) for line in (loop.repo / HISTORY).read_text().splitlines()]
    assert [h["decision"] for h in history] == ["ok", "waiting", "retrain"]
    report = loop.repo / drifted["report_dir"]
    assert json.loads((report / "report.json").read_text())["drift"]["share"] >= 0.3
    assert (report / "drift.html").stat().st_size > 10_000
    runs_logged = mlflow.search_runs(experiment_names=["monitoring"], output_format="list")
    assert {r.data.tags["decision"] for r in runs_logged} == {"ok", "retrain"}
