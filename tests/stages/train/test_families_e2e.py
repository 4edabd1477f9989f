"""The transformer and rnn families end to end on real public tables: features -> train ->
evaluate -> export -> registered pyfunc, the way the pipeline and the service run them.

rnn: seattle-weather (vega_datasets) as windows of the last 7 days, label = the next day's
weather. transformer: sklearn's breast cancer table.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest

from model.servable import log_servable
from stages.common.io import read_json, write_parquet
from stages.evaluate import stage as evaluate
from stages.export import stage as export
from stages.features import stage as features
from stages.register.manifest import record_version
from stages.train import stage as train
from tests.builders import breast_cancer_frame, make_params

WEATHER_COLUMNS = ("precipitation", "temp_max", "temp_min", "wind")
DAYS = 7


def weather_windows(days: int = DAYS) -> pd.DataFrame:
    """seattle-weather as one row per day ``t``: the ``days`` days before it, step-major
    (``d0_precipitation .. d0_wind, d1_precipitation, ...``, d0 the oldest), and ``weather``
    on day ``t`` as the label."""
    from importlib.resources import files

    daily = pd.read_csv(str(files("vega_datasets") / "_data" / "seattle-weather.csv"))
    rows = {
        f"d{step}_{col}": daily[col].shift(days - step).to_numpy()
        for step in range(days)
        for col in WEATHER_COLUMNS
    }
    frame = pd.DataFrame(rows).assign(weather=daily["weather"])
    return frame.iloc[days:].reset_index(drop=True)


def run_family(root: Path, frame: pd.DataFrame, overrides: dict) -> dict:
    """The real stages on ``frame``, then register the model and predict through the pyfunc."""
    params = make_params(overrides)
    write_parquet(root / "validated" / "data.parquet", frame)
    features.run(root / "validated", root / "features", params)
    train.run(root / "features", root / "no-report", root / "models", root / "history.csv", params)
    metrics = evaluate.run(
        root / "features", root / "models", root / "eval", root / "metrics.json", params
    )
    export.run(root / "features", root / "models", root / "export.json", params)
    test_rows = pd.read_parquet(root / "features" / "test.parquet")
    with mlflow.start_run():
        info = log_servable(
            root / "features" / "preprocessor.joblib",
            root / "models" / "model.pt",
            test_rows.head(5),
            registered_model_name="family-clf",
        )
    record_version(mlflow.MlflowClient(), "family-clf", str(info.registered_model_version))
    served = mlflow.pyfunc.load_model(f"models:/family-clf/{info.registered_model_version}")
    target = params.ingest.target
    predictions = served.predict(test_rows.drop(columns=[target]))
    return {
        "metrics": metrics,
        "export": read_json(root / "export.json"),
        "served_accuracy": float((predictions["prediction"] == test_rows[target]).mean()),
        "predictions": predictions,
        "run": mlflow.get_run(read_json(root / "models" / "run.json")["run_id"]),
    }


@pytest.mark.slow
def test_rnn_on_weather_windows_trains_evaluates_exports_and_serves(
    tmp_path: Path, mlflow_uri: str
) -> None:
    frame = weather_windows()
    overrides = {
        "ingest": {"target": "weather"},
        # a series: split in time order, with a window's length between the splits, so that
        # no day is both in a training window and a scored one
        "features": {"split": "ordered", "gap_rows": DAYS},
        "train": {
            "model": "rnn",
            "rnn": {"sequence_length": DAYS, "cell": "gru", "hidden_size": 32},
            "lr": 0.005,
            "max_epochs": 12,
            "patience": 4,
        },
        "register": {"min_metrics": {}, "max_metrics": {}},
    }

    out = run_family(tmp_path, frame, overrides)

    classes = sorted(frame["weather"].unique())
    predictions = out["predictions"]
    assert set(predictions["prediction"]) <= set(classes)
    assert predictions[[f"proba_{c}" for c in classes]].sum(axis=1).round(5).eq(1).all()
    # tomorrow's weather from the last week: better than always answering the commonest
    test_rows = pd.read_parquet(tmp_path / "features" / "test.parquet")
    majority = test_rows["weather"].value_counts(normalize=True).max()
    assert test_rows["d0_temp_max"].iloc[0] == frame["d0_temp_max"].iloc[-len(test_rows)]
    assert out["metrics"]["accuracy"] > majority
    assert out["served_accuracy"] == pytest.approx(out["metrics"]["accuracy"])
    run = out["run"]
    assert run.data.params["train.rnn.sequence_length"] == str(DAYS)
    steps = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/data/sequence_steps.json")
    assert steps["steps"][0] == [f"d0_{col}" for col in WEATHER_COLUMNS]
    assert len(steps["steps"]) == DAYS
    assert out["export"]  # export ran for the sequence net (its variants or a reason)


@pytest.mark.slow
def test_transformer_on_breast_cancer_trains_evaluates_exports_and_serves(
    tmp_path: Path, mlflow_uri: str
) -> None:
    overrides = {
        "train": {
            "model": "transformer",
            "transformer": {"d_token": 16, "n_blocks": 1, "n_heads": 2},
            "max_epochs": 10,
            "patience": 4,
        },
    }

    out = run_family(tmp_path, breast_cancer_frame(), overrides)

    assert out["metrics"]["accuracy"] > 0.9
    assert out["served_accuracy"] == pytest.approx(out["metrics"]["accuracy"])
    assert out["run"].data.params["train.transformer.d_token"] == "16"
    assert out["export"]
