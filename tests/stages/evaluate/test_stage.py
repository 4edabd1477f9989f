"""Evaluate stage: metrics and curve data on known values, then the stage on a real model."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from model import metrics as model_metrics
from stages.common.errors import DataError
from stages.common.io import write_parquet
from stages.evaluate import stage as evaluate
from stages.features import stage as features
from tests.builders import TEST_PARAMS, breast_cancer_frame, fresh_run, make_params


@pytest.fixture
def workdir(tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]) -> Path:
    """Copies of the trained features and model, attached to a run in this test's store."""
    shutil.copytree(trained[0], tmp_path / "features")
    shutil.copytree(trained[1], tmp_path / "models")
    fresh_run(tmp_path / "models", make_params())
    return tmp_path


# ----------------------------------------------------------------------------- metrics core

BINARY_Y = np.array([0, 0, 1, 1])
BINARY_P = np.array([[0.9, 0.1], [0.4, 0.6], [0.35, 0.65], [0.2, 0.8]])
MULTI_Y = np.array([0, 1, 2, 0])
MULTI_P = np.array([[0.6, 0.3, 0.1], [0.3, 0.4, 0.3], [0.2, 0.2, 0.6], [0.3, 0.5, 0.2]])


def test_binary_metrics_on_known_values() -> None:
    metrics = model_metrics.compute_metrics(BINARY_Y, BINARY_P)

    assert metrics == pytest.approx(
        {
            "accuracy": 0.75,  # row 1 is wrong
            "f1_macro": (2 / 3 + 0.8) / 2,  # class 0: P 1, R 1/2; class 1: P 2/3, R 1
            "roc_auc_macro": 1.0,  # every positive outranks every negative
            # 8 (row, class) pairs: of the 4 x 4 (positive, negative) pairs only 0.4 < 0.6 is wrong
            "roc_auc_micro": 15 / 16,
            "log_loss": -np.mean(np.log([0.9, 0.4, 0.65, 0.8])),
        }
    )


def test_multiclass_metrics_on_known_values() -> None:
    metrics = model_metrics.compute_metrics(MULTI_Y, MULTI_P)

    assert metrics == pytest.approx(
        {
            "accuracy": 0.75,  # row 3 is predicted 1
            "f1_macro": (2 / 3 + 2 / 3 + 1) / 3,
            "roc_auc_macro": (3.5 / 4 + 2 / 3 + 1) / 3,  # one-vs-rest per class (a tie: 1/2), macro
            "roc_auc_micro": _micro_auc(MULTI_Y, MULTI_P),
            "log_loss": -np.mean(np.log([0.6, 0.4, 0.6, 0.3])),
        }
    )


def _micro_auc(y: np.ndarray, proba: np.ndarray) -> float:
    # every (row, class) pair one binary case: the share of (positive, negative) pairs ranked
    # right, a tie counting 1/2
    positive = np.eye(proba.shape[1])[y] == 1
    pairs = [(p, n) for p in proba[positive] for n in proba[~positive]]
    return float(np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs]))


@pytest.mark.parametrize(
    ("y_true", "proba", "shown"),
    [
        (BINARY_Y, BINARY_P, "roc_auc_macro"),  # the positive class's curve: the macro AUC
        (MULTI_Y, MULTI_P, "roc_auc_micro"),  # the micro-averaged curve
    ],
)
def test_roc_image_names_the_auc_it_shows_as_metrics_json_does(
    y_true: np.ndarray, proba: np.ndarray, shown: str
) -> None:
    metrics = model_metrics.compute_metrics(y_true, proba)
    roc = evaluate.build_roc_records(y_true, proba)

    # the curve drawn has the area of the metric its legend names, under the same name
    assert evaluate.curve_area(roc, "fpr", "tpr") == pytest.approx(metrics[shown], abs=1e-5)
    fig = evaluate.plot_curve(
        roc,
        "fpr",
        "tpr",
        evaluate.curve_title("ROC", proba.shape[1]),
        evaluate.roc_legend(metrics, proba.shape[1]),
    )
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend[0] == f"{shown} = {metrics[shown]:.4f}"
    assert "roc_auc" not in metrics  # no unqualified name left to mislead


def test_baselines_majority_class_and_logistic_regression() -> None:
    rng = np.random.default_rng(0)
    X_train = rng.normal(size=(60, 2))
    y_train = np.where(X_train[:, 0] > 0.8, 1, 0)  # class 0 is the majority
    X_test = np.array([[2.0, 0.0], [-2.0, 0.0], [1.5, 1.0]])

    probas = evaluate.baseline_probas(X_train, y_train, X_test, 3, seed=0)

    share = np.bincount(y_train, minlength=3) / len(y_train)
    assert set(probas) == set(model_metrics.BASELINES)
    assert probas["majority"] == pytest.approx(np.tile(share, (3, 1)))  # class 2 unseen: 0
    assert probas["logistic"].argmax(axis=1).tolist() == [1, 0, 1]
    assert probas["logistic"][:, 2].tolist() == [0, 0, 0]


def test_metrics_renormalise_float32_softmax_rows() -> None:
    proba32 = (BINARY_P * (1 + 1e-7)).astype(np.float32)  # rows sum to 1 +- float32 noise

    metrics = model_metrics.compute_metrics(BINARY_Y, proba32)

    assert metrics["log_loss"] == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.65, 0.8])), rel=1e-6)


@pytest.mark.parametrize(
    ("y_true", "proba", "rule"),
    [
        (np.array([0, 0, 0]), np.full((3, 2), 0.5), "every_class_present"),
        (np.array([0, 1]), np.full((3, 2), 0.5), "scores_shape"),
        (np.array([0, 2]), np.full((2, 2), 0.5), "class_id_range"),
    ],
)
def test_metrics_refuse_scores_they_cannot_define(
    y_true: np.ndarray, proba: np.ndarray, rule: str
) -> None:
    with pytest.raises(DataError, match=rf"rule={rule}"):
        model_metrics.compute_metrics(y_true, proba)


def test_curve_records_binary() -> None:
    roc = evaluate.build_roc_records(BINARY_Y, BINARY_P)
    pr = evaluate.build_pr_records(BINARY_Y, BINARY_P)

    assert roc[0] == {"fpr": 0.0, "tpr": 0.0} and roc[-1] == {"fpr": 1.0, "tpr": 1.0}
    assert {"fpr": 0.0, "tpr": 1.0} in roc  # a perfect ranking reaches the corner
    recalls = [r["recall"] for r in pr]
    assert recalls == sorted(recalls) and recalls[-1] == 1.0
    assert set(pr[0]) == {"recall", "precision"}


def test_multiclass_curves_are_micro_averaged_one_vs_rest() -> None:
    from sklearn.metrics import auc

    roc = evaluate.build_roc_records(MULTI_Y, MULTI_P)

    # micro-average: 4 rows x 3 classes = 12 binary cases, 4 of them positive
    micro_auc = auc([r["fpr"] for r in roc], [r["tpr"] for r in roc])
    pairs = [
        (p, n) for p in MULTI_P[np.arange(4), MULTI_Y] for n in MULTI_P[np.eye(3)[MULTI_Y] == 0]
    ]
    expected = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])
    assert micro_auc == pytest.approx(expected, abs=1e-5)
    assert "micro-average one-vs-rest" in evaluate.curve_title("ROC", 3)
    assert evaluate.curve_title("ROC", 2) == "ROC (positive class)"


def test_confusion_records_use_label_values() -> None:
    records = evaluate.build_confusion_records(MULTI_Y, MULTI_P, ["cat", "dog", "eel"])

    assert records == [
        {"actual": "cat", "predicted": "cat"},
        {"actual": "dog", "predicted": "dog"},
        {"actual": "eel", "predicted": "eel"},
        {"actual": "cat", "predicted": "dog"},
    ]


# ----------------------------------------------------------------------------- the stage


def _args(root: Path) -> list[str]:
    return [
        "--features",
        str(root / "features"),
        "--model",
        str(root / "models"),
        "--out",
        str(root / "reports" / "eval"),
        "--metrics",
        str(root / "reports" / "metrics.json"),
    ]


@pytest.mark.slow
def test_main_writes_metrics_and_plots_and_logs_them_to_the_train_run(
    workdir: Path, tmp_path: Path
) -> None:
    params_file = tmp_path / "params.yaml"
    params_file.write_text(json.dumps(TEST_PARAMS))  # JSON is YAML

    assert evaluate.main([*_args(workdir), "--params", str(params_file)]) == 0

    metrics = json.loads((workdir / "reports" / "metrics.json").read_text())
    baselines = {
        f"baseline_{b}_{m}" for b in model_metrics.BASELINES for m in model_metrics.METRIC_NAMES
    }
    strong = {f"{evaluate.STRONG_PREFIX}{m}" for m in model_metrics.METRIC_NAMES}
    assert set(metrics) == set(model_metrics.METRIC_NAMES) | baselines | strong
    assert metrics["strong_gbdt_accuracy"] > 0.9  # the strong baseline: reported, not gated
    assert "gbdt" not in model_metrics.read_baselines(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["accuracy"] > 0.8 and metrics["roc_auc_macro"] > 0.9  # a real, trained model
    # the baselines, scored on the same test split
    test = pd.read_parquet(workdir / "features" / "test.parquet")
    majority = pd.read_parquet(workdir / "features" / "train.parquet")["target"].mode()[0]
    assert metrics["baseline_majority_accuracy"] == pytest.approx(
        (test["target"] == majority).mean()
    )
    assert metrics["baseline_majority_roc_auc_macro"] == 0.5  # one score for every row
    assert metrics["baseline_logistic_accuracy"] > 0.9  # breast cancer is nearly linear
    assert (
        model_metrics.read_baselines(metrics)["logistic"]["f1_macro"]
        == metrics["baseline_logistic_f1_macro"]
    )
    out = workdir / "reports" / "eval"
    assert sorted(p.name for p in out.iterdir()) == sorted(evaluate.PLOT_FILES)
    n_test = len(pd.read_parquet(workdir / "features" / "test.parquet"))
    confusion = json.loads((out / "confusion.json").read_text())
    assert len(confusion) == n_test and set(confusion[0]) == {"actual", "predicted"}
    roc = json.loads((out / "roc.json").read_text())
    assert set(roc[0]) == {"fpr", "tpr"}
    assert (out / "roc_curve.png").read_bytes()[:4] == b"\x89PNG"

    client = mlflow.MlflowClient()
    run = client.get_run(json.loads((workdir / "models" / "run.json").read_text())["run_id"])
    assert run.data.metrics == pytest.approx({f"test_{k}": v for k, v in metrics.items()})
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert logged == {f"eval/{name}" for name in (*evaluate.PLOT_FILES, "metrics.json")}


def test_main_fails_on_a_model_that_does_not_fit_the_features(
    workdir: Path, tmp_path: Path
) -> None:
    # previous outputs, which a failed run must leave exactly as they were
    (workdir / "reports" / "eval").mkdir(parents=True)
    (workdir / "reports" / "eval" / "roc.json").write_text("[]")
    (workdir / "reports" / "metrics.json").write_text('{"accuracy": 0.5}')
    # features with fewer columns than the checkpoint was trained on
    other = features.run(
        _write_validated(tmp_path / "other", breast_cancer_frame(drop=5)),
        tmp_path / "other" / "features",
        make_params(),
    )
    assert other.meta["n_features"] == 25
    shutil.rmtree(workdir / "features")
    shutil.copytree(tmp_path / "other" / "features", workdir / "features")

    params_file = tmp_path / "params.yaml"
    params_file.write_text(json.dumps(TEST_PARAMS))
    with pytest.raises(
        DataError,
        match=r"model expects 30 features .* gives 25.*"
        r"model\.pt, rule=model_matches_features",
    ):
        evaluate.run(*_args(workdir)[1::2], make_params())
    assert evaluate.main([*_args(workdir), "--params", str(params_file)]) == 1

    assert (workdir / "reports" / "metrics.json").read_text() == '{"accuracy": 0.5}'
    assert [p.name for p in (workdir / "reports" / "eval").iterdir()] == ["roc.json"]
    assert (workdir / "reports" / "eval" / "roc.json").read_text() == "[]"


def _write_validated(root: Path, frame: pd.DataFrame) -> Path:
    write_parquet(root / "validated" / "data.parquet", frame)
    return root / "validated"


def test_unknown_label_in_the_test_split_names_file_and_column(workdir: Path) -> None:
    test_file = workdir / "features" / "test.parquet"
    test = pd.read_parquet(test_file)
    test.loc[test.index[0], "target"] = 7
    write_parquet(test_file, test)

    with pytest.raises(
        DataError,
        match=r"label\(s\) \['7'\] not among the trained classes "
        r".*test\.parquet, column=target, rule=label_in_classes",
    ):
        evaluate.run(*_args(workdir)[1::2], make_params())
    assert not (workdir / "reports").exists()


def test_a_class_absent_from_the_test_split_is_left_out_of_the_macro_averages() -> None:
    # a time-ordered split of a seasonal series: no "snow" (class 2) in the test rows
    y_true = np.array([0, 0, 1, 1, 0])
    proba = np.array(
        [[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.4, 0.5, 0.1], [0.3, 0.6, 0.1]]
    )

    metrics = model_metrics.compute_metrics(y_true, proba)

    # predicted [0, 0, 1, 1, 1]: F1 0.8 for both present classes; snow, never in the labels
    # nor predicted, does not pull the average down to 0.53
    assert metrics["f1_macro"] == pytest.approx(0.8)
    # one misranked pair of six for each present class; snow's AUC is undefined, left out
    assert metrics["roc_auc_macro"] == pytest.approx(5 / 6)
