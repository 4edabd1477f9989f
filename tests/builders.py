"""Builders shared by the stage and serving tests: real stages on sklearn's breast cancer data."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd

from stages.common import tracking
from stages.common.config import Params, parse_params
from stages.common.io import write_parquet
from stages.features import stage as features
from stages.train import stage as train

# A small GX suite with every column type, for the validate and suite tests.
SUITE = {
    "name": "tiny",
    "meta": {"target": "label"},
    "expectations": [
        {
            "type": "expect_table_columns_to_match_set",
            "kwargs": {
                "column_set": ["x", "n", "color", "flag", "when", "label"],
                "exact_match": True,
            },
        },
        {
            "type": "expect_table_row_count_to_be_between",
            "kwargs": {"min_value": 2, "max_value": 1000},
        },
        *(
            {
                "type": "expect_column_values_to_be_in_type_list",
                "kwargs": {"column": name, "type_list": types},
            }
            for name, types in [
                ("x", ["float64"]),
                ("n", ["int64", "Int64Dtype"]),
                ("color", ["str"]),
                ("flag", ["bool", "BooleanDtype"]),
                ("when", ["datetime64[us]"]),
                ("label", ["int64", "Int64Dtype"]),
            ]
        ),
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "x"}},
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "n", "mostly": 0.8}},
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "label"}},
        {
            "type": "expect_column_values_to_be_between",
            "kwargs": {"column": "x", "min_value": 0, "max_value": 10},
        },
        {
            "type": "expect_column_values_to_be_between",
            "kwargs": {"column": "n", "min_value": 0, "max_value": 100},
        },
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "color", "value_set": ["blue", "red"]},
        },
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "label", "value_set": [0, 1]},
        },
        {
            "type": "expect_column_unique_value_count_to_be_between",
            "kwargs": {"column": "label", "min_value": 2},
        },
    ],
}

TEST_PARAMS = {
    "base": {"device": "cpu"},
    "train": {"hidden_sizes": [16], "lr": 0.01, "max_epochs": 20, "patience": 5},
    "register": {
        "model_name": "test-clf",
        "min_metrics": {"accuracy": 0.8, "roc_auc_macro": 0.85},
        "max_metrics": {"log_loss": 0.6},
    },
}


def make_params(overrides: dict | None = None) -> Params:
    """The test params (tracking URI from ``MLFLOW_TRACKING_URI``), with ``overrides``."""
    raw = {name: dict(section) for name, section in TEST_PARAMS.items()}
    for name, section in (overrides or {}).items():
        raw[name] = {**raw.get(name, {}), **section}
    return parse_params(raw)


def breast_cancer_frame(drop: int = 0) -> pd.DataFrame:
    """sklearn's breast cancer table as ingest writes it; ``drop`` leaves out feature columns."""
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame.columns = [str(c).replace(" ", "_") for c in frame.columns]
    return frame.drop(columns=list(frame.columns[:drop]))


def build_trained(root: Path, params: Params, frame: pd.DataFrame) -> tuple[Path, Path]:
    """Run the real features and train stages on ``frame``; returns (features dir, model dir)."""
    write_parquet(root / "validated" / "data.parquet", frame)
    features.run(root / "validated", root / "features", params)
    train.run(root / "features", root / "no-report", root / "models", root / "history.csv", params)
    return root / "features", root / "models"


def fresh_run(model_dir: Path, params: Params, tags: dict[str, str] | None = None) -> str:
    """A new MLflow run in the current store that ``model_dir/run.json`` points at."""
    experiment_id = tracking.configure_mlflow(params.mlflow)
    with mlflow.start_run(tags=tags) as active:
        tracking.save_run_info(model_dir, active.info.run_id, experiment_id)
    return active.info.run_id
