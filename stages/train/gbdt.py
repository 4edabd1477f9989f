"""The gbdt family: scikit-learn's HistGradientBoostingClassifier, grown "epoch" by epoch.

``fit_gbdt`` is the gbdt counterpart of ``loop.train_model``: arrays in, the best estimator and
the history out (no MLflow, no files). Boosting is warm-started ``train.gbdt.rounds_per_epoch``
rounds at a time; after each such epoch it appends a history row (``epoch, train_loss,
val_loss, val_accuracy``, the losses being mean cross-entropy like the networks'), calls
``on_epoch`` with it (the stage logs it to MLflow, tuning reports it and may raise to prune),
and stops after ``train.patience`` epochs without a better validation loss, keeping the best.
The same arrays and seed give the same trees.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.common.config import TrainParams
from stages.common.errors import ConfigError, PipelineError

logger = logging.getLogger(__name__)

_EPS = 1e-15  # probabilities are clipped here before the log (a class absent from train)


@dataclass(frozen=True)
class GbdtResult:
    """The best estimator (by validation loss) and the per-epoch history."""

    estimator: Any  # a fitted sklearn HistGradientBoostingClassifier
    history: list[dict[str, float]]
    best_epoch: int
    best_val_loss: float
    stopped_early: bool


def build_gbdt(params: TrainParams, seed: int, total_rounds: int) -> Any:
    """The warm-startable classifier for ``train.gbdt``.

    ``early_stopping=True`` without validation data only makes scikit-learn record the
    training loss of every round (``train_score_``, on all training rows, from the raw
    predictions it keeps anyway); ``n_iter_no_change`` past the last round means it never
    stops by itself: stopping is ours, by validation loss, per epoch.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    gbdt = params.gbdt
    return HistGradientBoostingClassifier(
        learning_rate=gbdt.learning_rate,
        max_iter=gbdt.rounds_per_epoch,
        max_leaf_nodes=gbdt.max_leaf_nodes,
        min_samples_leaf=gbdt.min_samples_leaf,
        l2_regularization=gbdt.l2_regularization,
        max_bins=gbdt.max_bins,
        early_stopping=True,
        scoring="loss",
        validation_fraction=None,
        n_iter_no_change=total_rounds + 1,
        warm_start=True,
        random_state=seed,
    )


def class_proba(estimator: Any, X: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n, n_classes)`` probabilities; a class the estimator never saw gets 0."""
    proba = np.zeros((len(X), n_classes), dtype=np.float64)
    if len(X):
        proba[:, estimator.classes_] = estimator.predict_proba(X)
    return proba


def cross_entropy(proba: np.ndarray, y: np.ndarray) -> float:
    """Mean ``-log p(true class)`` (what ``F.cross_entropy`` gives the networks)."""
    picked = np.clip(proba[np.arange(len(y)), y], _EPS, 1.0)
    return float(-np.log(picked).mean())


def fit_gbdt(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    params: TrainParams,
    seed: int,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    *,
    n_classes: int | None = None,
) -> GbdtResult:
    """Boost with early stopping on validation loss, ``rounds_per_epoch`` rounds per epoch.

    Args:
        X_train, y_train: the preprocessed training rows and their class ids (0..n-1).
        X_val, y_val: the validation rows (early stopping and the history; never trained on).
        params: the ``train`` section (``gbdt``, ``max_epochs``, ``patience``).
        seed: the estimator's ``random_state``.
        on_epoch: called with each history row; whatever it raises propagates (pruning).
        n_classes: the classes the model predicts (default: the highest class id seen + 1).

    Raises:
        ConfigError: ``params.model`` is not gbdt.
        PipelineError: no training or validation rows, or a loss became NaN/inf.
    """
    if params.model != "gbdt":
        raise ConfigError(f"train.model is {params.model!r}; fit_gbdt trains model: gbdt")
    if len(X_train) == 0 or len(X_val) == 0:
        raise PipelineError(
            f"gbdt needs training and validation rows (got {len(X_train)} and {len(X_val)})"
        )
    y_train, y_val = np.asarray(y_train, dtype=np.int64), np.asarray(y_val, dtype=np.int64)
    if n_classes is None:
        n_classes = int(max(y_train.max(), y_val.max())) + 1
    rounds = params.gbdt.rounds_per_epoch
    estimator = build_gbdt(params, seed, params.max_epochs * rounds)
    history: list[dict[str, float]] = []
    best, best_epoch, best_val, since_best = None, 0, math.inf, 0
    for epoch in range(1, params.max_epochs + 1):
        estimator.set_params(max_iter=epoch * rounds)
        estimator.fit(X_train, y_train)  # warm start: adds this epoch's rounds only
        proba = class_proba(estimator, X_val, n_classes)
        row = {
            "epoch": epoch,
            "train_loss": float(-estimator.train_score_[-1]),
            "val_loss": cross_entropy(proba, y_val),
            "val_accuracy": float((proba.argmax(axis=1) == y_val).mean()),
        }
        _check_finite(row, epoch)
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if row["val_loss"] < best_val:
            # A copy: the next epoch's warm start grows ``estimator`` in place.
            best, best_epoch, best_val, since_best = (
                copy.deepcopy(estimator),
                epoch,
                row["val_loss"],
                0,
            )
        else:
            since_best += 1
        if since_best >= params.patience:
            break
    stopped_early = len(history) < params.max_epochs
    if stopped_early:
        logger.info(
            "gbdt: early stop at epoch %d: no val-loss improvement for %d epochs",
            len(history),
            params.patience,
        )
    return GbdtResult(best, history, best_epoch, best_val, stopped_early)


def _check_finite(row: dict[str, float], epoch: int) -> None:
    for key in ("train_loss", "val_loss"):
        if not math.isfinite(row[key]):
            raise PipelineError(
                f"gbdt {key} is {row[key]} at epoch {epoch}; check the features for NaN/inf "
                "values or lower train.gbdt.learning_rate"
            )
