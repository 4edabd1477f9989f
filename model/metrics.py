"""A model's test metrics: their names and directions, how they are computed from class
probabilities, and how the baselines' metrics are keyed in ``metrics.json``.

Evaluate computes them for the network and the baselines; register recomputes them on the
model it is about to promote, with this same code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from model.errors import DataError

if TYPE_CHECKING:  # numpy is imported where scores are computed: params.yaml's checks
    import numpy as np  # read the metric names above without it

METRIC_NAMES = ("accuracy", "f1_macro", "roc_auc_macro", "roc_auc_micro", "log_loss")
LOWER_IS_BETTER = frozenset({"log_loss"})  # every other metric: higher is better
RENAMED = {"roc_auc": "roc_auc_macro or roc_auc_micro"}  # old name -> new, for clear errors
BASELINES = ("majority", "logistic")
BASELINE_PREFIX = "baseline_"  # metrics.json key: baseline_<baseline>_<metric>
# evaluate's strong baseline: gbdt on the same test split, a reference beside the model's
# metrics (the run summary's "model vs gbdt"), never part of the gate
STRONG_BASELINE = "gbdt"
STRONG_PREFIX = f"strong_{STRONG_BASELINE}_"  # metrics.json key: strong_gbdt_<metric>
MEMBER_PREFIX = "member_"  # metrics.json key: member_<name>_<metric> (an ensemble's members)


def compute_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Accuracy, macro F1, macro and micro ROC-AUC and log loss of class probabilities.

    Args:
        y_true: class ids ``(n,)``, each an index into the columns of ``proba``.
        proba: class probabilities ``(n, n_classes)``.

    Returns:
        ``{accuracy, f1_macro, roc_auc_macro, roc_auc_micro, log_loss}``. ``roc_auc_macro``:
        the one-vs-rest AUC of each class, averaged (two classes: the AUC of the positive
        class, column 1, which is the same number). ``roc_auc_micro``: one AUC over every
        (row, class) pair.

    Raises:
        DataError: shapes disagree, ids are out of range, or fewer than two classes
            occur in ``y_true`` (ROC-AUC is undefined then). With three or more classes, a
            class absent from ``y_true`` is left out of the macro averages.
    """
    import numpy as np
    from sklearn import metrics as skm

    y_true, proba = check_scores(y_true, proba)
    labels = np.arange(proba.shape[1])
    y_pred = proba.argmax(axis=1)
    present = np.unique(y_true)
    f1_labels = labels
    if proba.shape[1] == 2:
        roc_auc_macro = skm.roc_auc_score(y_true, proba[:, 1])
    elif len(present) < proba.shape[1]:
        # A class no row holds (a season missing from a time-ordered test split): its AUC
        # is undefined and its F1 would count as 0 though nothing was wrong. Both average
        # over the classes that occur, in the labels or the predictions.
        roc_auc_macro = np.mean([skm.roc_auc_score(y_true == c, proba[:, c]) for c in present])
        f1_labels = np.union1d(present, y_pred)
    else:
        roc_auc_macro = skm.roc_auc_score(
            y_true, proba, multi_class="ovr", average="macro", labels=labels
        )
    one_hot = np.eye(proba.shape[1], dtype=np.int64)[y_true]
    return {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "f1_macro": float(
            skm.f1_score(y_true, y_pred, labels=f1_labels, average="macro", zero_division=0)
        ),
        "roc_auc_macro": float(roc_auc_macro),
        "roc_auc_micro": float(skm.roc_auc_score(one_hot.ravel(), proba.ravel())),
        # Softmax ran in float32: renormalise so log loss sees rows that sum to 1 in float64.
        "log_loss": float(
            skm.log_loss(y_true, proba / proba.sum(axis=1, keepdims=True), labels=labels)
        ),
    }


def check_scores(y_true: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    y_true = np.asarray(y_true).astype(np.int64, copy=False)
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or proba.shape[1] < 2 or len(proba) != len(y_true) or not len(y_true):
        raise DataError(
            f"need {len(y_true)} labels and as many rows of >= 2 class "
            f"probabilities, got probabilities of shape {proba.shape}",
            rule="scores_shape",
        )
    if y_true.min() < 0 or y_true.max() >= proba.shape[1]:
        raise DataError(f"class ids must lie in [0, {proba.shape[1]})", rule="class_id_range")
    absent = sorted(set(range(proba.shape[1])) - set(np.unique(y_true).tolist()))
    if len(absent) > proba.shape[1] - 2:
        raise DataError(
            f"class id(s) {absent} absent from the labels: ROC-AUC needs two classes present",
            rule="every_class_present",
        )
    return y_true, proba


def flatten_baselines(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{baseline: {metric: v}}`` -> ``{baseline_<baseline>_<metric>: v}`` (metrics.json keys)."""
    return {
        f"{BASELINE_PREFIX}{name}_{metric}": value
        for name, metrics in scores.items()
        for metric, value in metrics.items()
    }


def read_baselines(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The baselines' metrics back out of a metrics.json mapping: ``{baseline: {metric: v}}``."""
    return {
        name: {
            metric: metrics[key]
            for metric in METRIC_NAMES
            if isinstance(metrics.get(key := f"{BASELINE_PREFIX}{name}_{metric}"), (int, float))
        }
        for name in BASELINES
    }
