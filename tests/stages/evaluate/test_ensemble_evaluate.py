"""Evaluate with ``--ensemble``: the ensemble stage's model when it built one, each member scored
beside it on the same test split (``member_<name>_<metric>``); train's model when the stage is
disabled; a report that says built without its file stops evaluate, outputs untouched."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest

from model import metrics as model_metrics
from model.predictors import load_predictor
from stages.common.errors import DataError
from stages.evaluate import scoring
from stages.evaluate import stage as evaluate
from tests.builders import fresh_run, make_params
from tests.stages.register.ensemble_builders import train_member, write_ensemble_dir


@pytest.fixture(scope="module")
def gbdt_member(trained: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_member(trained[0], tmp_path_factory.mktemp("gbdt"), {"train": {"model": "gbdt"}})


@pytest.fixture
def workdir(tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]) -> Path:
    shutil.copytree(trained[0], tmp_path / "features")
    shutil.copytree(trained[1], tmp_path / "models")
    fresh_run(tmp_path / "models", make_params())
    return tmp_path


def _outputs(root: Path) -> tuple[Path, Path]:
    return root / "reports" / "eval", root / "reports" / "metrics.json"


def test_the_ensemble_is_scored_with_each_member_beside_it(
    workdir: Path, gbdt_member: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ensemble = write_ensemble_dir(
        workdir / "ensemble",
        [("train", "train", workdir / "models" / "model.pt"), ("gbdt", "family:gbdt", gbdt_member)],
    )

    with caplog.at_level(logging.INFO, logger="stages.evaluate"):
        metrics = evaluate.run(
            workdir / "features", workdir / "models", *_outputs(workdir), make_params(), ensemble
        )

    names = model_metrics.METRIC_NAMES
    assert {f"member_{m}_{k}" for m in ("train", "gbdt") for k in names} <= set(metrics)
    assert json.loads(_outputs(workdir)[1].read_text()) == metrics
    # each member alone, on the same rows: train's member is train's model as evaluate scores it
    alone = scoring.score(workdir / "features", workdir / "models", make_params())
    train_alone = model_metrics.compute_metrics(alone.test.y, alone.proba)
    assert {k: metrics[f"member_train_{k}"] for k in names} == pytest.approx(train_alone)
    # the ensemble's are the mean of the members' probabilities (method mean)
    scored = scoring.score(workdir / "features", workdir / "models", make_params(), ensemble)
    assert scored.path.name == "model.ensemble.zip" and list(scored.members) == ["train", "gbdt"]
    mean = np.mean(list(scored.members.values()), axis=0)
    assert model_metrics.compute_metrics(scored.test.y, mean) == pytest.approx(
        {k: metrics[k] for k in names}
    )
    # the register gate and the summary read metrics.json as before
    assert model_metrics.read_baselines(metrics)["logistic"]
    run_id = json.loads((workdir / "models" / "run.json").read_text())["run_id"]
    logged = mlflow.MlflowClient().get_run(run_id).data.metrics
    assert logged["test_member_gbdt_accuracy"] == metrics["member_gbdt_accuracy"]
    assert "members beside the ensemble on the same test split" in caplog.text
    assert load_predictor(scored.path).family == "ensemble"


def test_each_member_runs_once_on_test_and_the_fusion_is_the_ensemble_s_own(
    workdir: Path, gbdt_member: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from model import predictors

    ensemble = write_ensemble_dir(
        workdir / "ensemble",
        [("train", "train", workdir / "models" / "model.pt"), ("gbdt", "family:gbdt", gbdt_member)],
        "weighted",
        weights=[0.8, 0.2],
    )
    calls: list[str] = []
    real = predictors.load_predictor

    def counted(path: Path) -> object:  # the real ensemble, its members' calls counted
        loaded = real(path)  # (the ensemble loads its members through it too)
        for name, member in getattr(loaded, "members", []):
            scored = member.predict_proba

            def counting(*args: object, _n: str = name, _f: object = scored) -> object:
                calls.append(_n)
                return _f(*args)  # type: ignore[operator]

            member.predict_proba = counting
        return loaded

    monkeypatch.setattr(predictors, "load_predictor", counted)
    scored = scoring.score(workdir / "features", workdir / "models", make_params(), ensemble)

    assert sorted(calls) == ["gbdt", "train"]  # once each, not again to fuse
    whole = real(ensemble / "model.ensemble.zip")  # its own predict_proba, as served
    expected = whole.predict_proba(whole.features(scored.test.preprocessor, scored.test.frame))
    np.testing.assert_allclose(scored.proba, expected, rtol=0, atol=1e-12)
    weighted = 0.8 * scored.members["train"] + 0.2 * scored.members["gbdt"]
    np.testing.assert_allclose(scored.proba, weighted, atol=1e-12)


def test_a_disabled_ensemble_stage_leaves_train_s_model_judged(workdir: Path) -> None:
    (workdir / "ensemble").mkdir()
    (workdir / "ensemble" / "report.json").write_text('{"status": "disabled"}')

    scored = scoring.score(
        workdir / "features", workdir / "models", make_params(), workdir / "ensemble"
    )

    assert scored.path == workdir / "models" / "model.pt" and scored.members == {}


def test_a_built_report_without_its_file_stops_evaluate_outputs_untouched(workdir: Path) -> None:
    eval_dir, metrics_path = _outputs(workdir)
    eval_dir.mkdir(parents=True)
    metrics_path.write_text('{"accuracy": 0.5}')
    (workdir / "ensemble").mkdir()
    (workdir / "ensemble" / "report.json").write_text('{"status": "built"}')

    with pytest.raises(DataError, match=r"says built but the model file is missing.*ensemble"):
        evaluate.run(
            workdir / "features",
            workdir / "models",
            eval_dir,
            metrics_path,
            make_params(),
            workdir / "ensemble",
        )
    assert metrics_path.read_text() == '{"accuracy": 0.5}' and not any(eval_dir.iterdir())
