"""The gbdt family end to end on two real tables: train -> evaluate (with the strong baseline)
-> export (skipped, with the reason) -> register -> the service's loader predicts.

breast_cancer (sklearn: numeric, two classes), vega_datasets' cars.json (nulls in two
columns, a free-text name column, a date-like text column, three classes) and palmerpenguins
(nulls, text island and sex). Real MLflow. The served model answers a row with a missing
number and a category never seen in train (the trees take both natively).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from model.gbdt import GBDT_FILE, TRUSTED_TYPES, load_gbdt, save_gbdt
from model.metrics import METRIC_NAMES, read_baselines
from model.predictors import load_predictor, model_file
from stages.common.errors import DataError
from stages.register import stage as register
from tests.builders import breast_cancer_frame, build_trained, make_params
from tests.stages.register.test_stage import LOOSE, NAME, params_file, prepare, register_args

GBDT = {
    "train": {"model": "gbdt", "max_epochs": 20, "patience": 3, "gbdt": {"rounds_per_epoch": 5}}
}


def _cars() -> pd.DataFrame:
    import vega_datasets

    path = Path(vega_datasets.__file__).parent / "_data" / "cars.json"
    return pd.read_json(path)


def _table(name: str, root: Path) -> tuple[pd.DataFrame, dict, str]:
    """(frame, params overrides, target) of a real table."""
    if name == "breast_cancer":
        return breast_cancer_frame(), GBDT, "target"
    from stages.validate import stage as validate
    from tests.model.test_native_view import penguins_frame

    frame, target = (_cars(), "Origin") if name == "cars" else (penguins_frame(), "species")
    assert frame.isna().any().any()  # gaps (cars: Horsepower, MPG; penguins: measures, sex)
    root.mkdir(parents=True, exist_ok=True)
    frame.to_csv(root / f"{name}.csv", index=False)
    validate.write_suite(root / f"{name}.csv", root / f"{name}.json", target, 0.1, 1000)
    overrides = {
        **GBDT,
        "ingest": {"target": target},
        "validate": {"suite_path": str(root / f"{name}.json")},
        **LOOSE,  # a small, hard table: the point here is that a gbdt registers and serves
    }
    return frame, overrides, target


# table -> (a number column left empty, a text column given a category train never saw)
GAPS = {
    "breast_cancer": ("mean_radius", None),
    "cars": ("Horsepower", "Year"),
    "penguins": ("bill_length_mm", "island"),
}


@pytest.mark.slow
@pytest.mark.parametrize("table", ["breast_cancer", "cars", "penguins"])
def test_gbdt_trains_evaluates_skips_export_registers_and_serves(
    table: str, tmp_path: Path, mlflow_uri: str
) -> None:
    from serving.model import load_model

    frame, overrides, target = _table(table, tmp_path / "table")
    params = make_params(overrides)
    source = build_trained(tmp_path / "src", params, frame)
    assert model_file(source[1]).name == GBDT_FILE  # no model.pt beside it
    history = pd.read_csv(tmp_path / "src" / "history.csv")
    assert list(history.columns) == ["epoch", "train_loss", "val_loss", "val_accuracy"]

    work = prepare(tmp_path / "work", source, params, export=True)

    exported = json.loads((work / "reports" / "export.json").read_text())
    assert exported["status"] == "skipped" and exported["files"] == {}
    assert "gbdt" in exported["reason"]
    evaluated = json.loads((work / "reports" / "metrics.json").read_text())
    assert {f"strong_gbdt_{m}" for m in METRIC_NAMES} <= set(evaluated)
    assert set(read_baselines(evaluated)) == {"majority", "logistic"}  # the gate's, unchanged
    assert evaluated["accuracy"] > evaluated["baseline_majority_accuracy"]

    assert register.main(register_args(work, params_file(tmp_path / "p.yaml", overrides))) == 0

    record = json.loads((work / "reports" / "registration.json").read_text())
    assert record["decision"] == "promoted" and record["version"] == 1
    assert record["metrics"] == pytest.approx(  # served == evaluated
        {k: evaluated[k] for k in METRIC_NAMES}, abs=1e-6
    )
    stored = mlflow.artifacts.list_artifacts(f"models:/{NAME}/1/artifacts")
    assert GBDT_FILE in {Path(a.path).name for a in stored}
    # the service's loader: hash-checked, the pyfunc with the model code it shipped
    served = load_model(f"models:/{NAME}@champion")
    test = pd.read_parquet(work / "features" / "test.parquet")
    out = served.predict(test.drop(columns=[target]).head(20))
    classes = load_predictor(model_file(work / "models")).meta["n_classes"]
    assert len(out) == 20 and len(out.filter(like="proba_").columns) == classes
    np.testing.assert_allclose(out.filter(like="proba_").sum(axis=1), 1.0, atol=1e-9)
    # a row with a missing number and (for the text tables) a category unseen in train
    number, text = GAPS[table]
    row = test.drop(columns=[target]).head(1).assign(**{number: np.nan})
    if text is not None:
        row[text] = "never seen in train"
    gap = served.predict(row)
    assert len(gap) == 1 and np.isclose(gap.filter(like="proba_").sum(axis=1).iloc[0], 1.0)
    with pytest.raises(Exception, match="gbdt"):  # no ONNX variant to serve: says why
        load_model(f"models:/{NAME}@champion", variant="onnx")


def test_a_gbdt_file_asking_for_other_types_is_refused_before_loading(tmp_path: Path) -> None:
    from sklearn.datasets import load_iris
    from sklearn.ensemble import HistGradientBoostingClassifier

    X, y = load_iris(return_X_y=True)
    good = save_gbdt(HistGradientBoostingClassifier(max_iter=3).fit(X, y), {"n": 1}, tmp_path / "a")
    estimator, meta = load_gbdt(good)
    assert meta == {"n": 1} and estimator.n_iter_ == 3
    assert len(TRUSTED_TYPES) == 3  # trees, and the partial(check_array) of native categories

    # a payload holding a type that is not a HistGradientBoosting part: never loaded
    import skops.io

    skops.io.dump({"format": 1, "estimator": _Sneaky(), "meta": "{}"}, tmp_path / "bad.skops")
    with pytest.raises(DataError, match=r"types not trusted .*_Sneaky.*rule=trusted_types"):
        load_gbdt(tmp_path / "bad.skops")
    # functools.partial is trusted only around check_array: around anything else, refused
    import functools
    import os

    sneaky = {"format": 1, "estimator": functools.partial(os.getcwd), "meta": "{}"}
    skops.io.dump(sneaky, tmp_path / "partial.skops")
    with pytest.raises(DataError, match=r"types not trusted .*getcwd"):
        load_gbdt(tmp_path / "partial.skops")
    (tmp_path / "garbled.skops").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(DataError, match="not a readable skops file"):
        load_gbdt(tmp_path / "garbled.skops")
    with pytest.raises(DataError, match=r"no trained model in the folder"):
        model_file(tmp_path / "nowhere")


class _Sneaky:
    """A type of ours: skops must refuse to rebuild it from a file."""
