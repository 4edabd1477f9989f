"""The gbdt family's fit (stages/train/gbdt.py): history, early stopping, the best kept,
on_epoch exceptions propagate (tuning prunes that way), same seed -> same trees."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer, load_iris
from sklearn.model_selection import train_test_split

from model.gbdt import gbdt_proba
from stages.common.config import TrainParams
from stages.common.errors import ConfigError, PipelineError
from stages.train.gbdt import cross_entropy, fit_gbdt


def _split(loader):
    X, y = loader(return_X_y=True)
    return train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)


def _params(**kw) -> TrainParams:
    gbdt = {"rounds_per_epoch": 5, **kw.pop("gbdt", {})}
    return TrainParams(model="gbdt", gbdt=gbdt, **{"max_epochs": 20, "patience": 3, **kw})


def test_history_rows_and_best_kept_on_breast_cancer():
    X_tr, X_val, y_tr, y_val = _split(load_breast_cancer)
    rows = []
    result = fit_gbdt(X_tr, y_tr, X_val, y_val, _params(), seed=0, on_epoch=rows.append)
    assert rows == result.history
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
    assert set(rows[0]) == {"epoch", "train_loss", "val_loss", "val_accuracy"}
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    best = min(rows, key=lambda r: r["val_loss"])
    assert (result.best_epoch, result.best_val_loss) == (best["epoch"], best["val_loss"])
    # the returned estimator is the best epoch's, not the last one's
    assert result.estimator.n_iter_ == result.best_epoch * 5
    proba = gbdt_proba(result.estimator, X_val, 2)
    assert cross_entropy(proba, y_val) == pytest.approx(result.best_val_loss)
    assert best["val_accuracy"] > 0.9


def test_early_stop_after_patience_epochs_without_improvement():
    X_tr, X_val, y_tr, y_val = _split(load_iris)  # overfits fast: val loss turns up early
    result = fit_gbdt(X_tr, y_tr, X_val, y_val, _params(max_epochs=50, patience=2), seed=0)
    assert result.stopped_early
    assert len(result.history) == result.best_epoch + 2
    full = fit_gbdt(X_tr, y_tr, X_val, y_val, _params(max_epochs=3, patience=10), seed=0)
    assert not full.stopped_early and len(full.history) == 3


def test_same_seed_same_model_and_train_loss_matches_sklearn():
    from sklearn.metrics import log_loss

    X_tr, X_val, y_tr, y_val = _split(load_iris)
    a = fit_gbdt(X_tr, y_tr, X_val, y_val, _params(max_epochs=4, patience=9), seed=1)
    b = fit_gbdt(X_tr, y_tr, X_val, y_val, _params(max_epochs=4, patience=9), seed=1)
    assert a.history == b.history
    np.testing.assert_array_equal(
        a.estimator.predict_proba(X_val), b.estimator.predict_proba(X_val)
    )
    if a.best_epoch == 4:  # the recorded train loss is the mean cross-entropy of the model
        assert a.history[-1]["train_loss"] == pytest.approx(
            log_loss(y_tr, a.estimator.predict_proba(X_tr)), rel=1e-6
        )


def test_on_epoch_exception_propagates_and_stops():
    X_tr, X_val, y_tr, y_val = _split(load_breast_cancer)

    class Pruned(Exception):
        pass

    seen = []

    def prune_at_two(row):
        seen.append(row["epoch"])
        if row["epoch"] == 2:
            raise Pruned

    with pytest.raises(Pruned):
        fit_gbdt(X_tr, y_tr, X_val, y_val, _params(), seed=0, on_epoch=prune_at_two)
    assert seen == [1, 2]


def test_class_absent_from_train_gets_zero_probability():
    X_tr, X_val, y_tr, y_val = _split(load_iris)
    keep = y_tr != 2  # class 2 only in val: finite loss, never predicted
    result = fit_gbdt(X_tr[keep], y_tr[keep], X_val, y_val, _params(max_epochs=2), seed=0)
    proba = gbdt_proba(result.estimator, X_val, 3)
    assert proba.shape == (len(X_val), 3) and (proba[:, 2] == 0).all()
    assert np.isfinite(result.best_val_loss)


def test_refuses_other_families_and_empty_splits():
    X_tr, X_val, y_tr, y_val = _split(load_iris)
    with pytest.raises(ConfigError, match="gbdt"):
        fit_gbdt(X_tr, y_tr, X_val, y_val, TrainParams(model="mlp"), seed=0)
    with pytest.raises(PipelineError, match="validation rows"):
        fit_gbdt(X_tr, y_tr, X_val[:0], y_val[:0], _params(), seed=0)


@pytest.mark.slow
def test_stage_logs_each_epoch_and_the_family_params_to_mlflow(tmp_path, mlflow_uri: str) -> None:
    import mlflow

    from model.predictors import load_predictor, model_file
    from stages.common.io import read_json
    from tests.builders import breast_cancer_frame, build_trained, make_params

    params = make_params({"train": {"model": "gbdt", "max_epochs": 6, "patience": 2}})
    _, models = build_trained(tmp_path, params, breast_cancer_frame())

    history = (tmp_path / "history.csv").read_text().splitlines()
    run = mlflow.MlflowClient().get_run(read_json(models / "run.json")["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.model"] == "gbdt"
    assert run.data.params["train.gbdt.rounds_per_epoch"] == "10"
    logged = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in logged] == list(range(1, len(history)))  # one per history row
    predictor = load_predictor(model_file(models))
    assert predictor.family == "gbdt" and predictor.meta["epoch"] == run.data.metrics["best_epoch"]
    assert predictor.estimator.n_iter_ == 10 * predictor.meta["epoch"]


@pytest.mark.slow
def test_the_stage_fits_the_trees_on_gaps_and_native_categories_and_serves_them(
    tmp_path, mlflow_uri: str
) -> None:
    """palmerpenguins through the real features and train stages: the saved trees were fitted
    on NaN (not an imputed value) and on island and sex as categories, and the served scorer
    answers a row with a missing measure and an island never seen in train."""
    from model.gbdt import NATIVE_INPUTS
    from model.predictors import load_predictor, model_file
    from model.servable import load_scorer
    from stages.validate import stage as validate
    from tests.builders import build_trained, make_params
    from tests.model.test_native_view import penguins_frame

    frame = penguins_frame()
    frame.to_csv(tmp_path / "penguins.csv", index=False)
    validate.write_suite(tmp_path / "penguins.csv", tmp_path / "suite.json", "species", 0.1, 1000)
    params = make_params(
        {
            "train": {"model": "gbdt", "max_epochs": 5, "patience": 2},
            "ingest": {"target": "species"},
            "validate": {"suite_path": str(tmp_path / "suite.json")},
        }
    )
    features, models = build_trained(tmp_path, params, frame)

    predictor = load_predictor(model_file(models))
    scorer = load_scorer(features / "preprocessor.joblib", model_file(models))
    train = pd.read_parquet(features / "train.parquet")
    X = predictor.features(scorer.preprocessor, train)
    assert predictor.meta["inputs"] == NATIVE_INPUTS and np.isnan(X).any()  # gaps kept
    # five measures (numbers first), then island and sex as categories: not one-hot columns
    assert predictor.meta["categorical"] == [False] * 5 + [True, True]
    assert predictor.estimator.is_categorical_.tolist() == predictor.meta["categorical"]
    assert predictor.estimator.n_features_in_ == X.shape[1] == 7

    row = train.drop(columns=["species"]).head(2).assign(island="Atlantis", sex=None)
    row.loc[row.index[0], "bill_length_mm"] = np.nan
    served = scorer.predict(row)
    assert len(served) == 2 and served["prediction"].isin(scorer.preprocessor.classes).all()
    np.testing.assert_allclose(served.filter(like="proba_").sum(axis=1), 1.0, atol=1e-9)
