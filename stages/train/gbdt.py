"""The gbdt family: scikit-learn's HistGradientBoostingClassifier, grown "epoch" by epoch.

``fit_gbdt`` is the gbdt counterpart of ``loop.train_model``: arrays in, the best estimator and
the history out (no MLflow, no files); ``run_gbdt`` is the train stage's gbdt branch around it.
The arrays are the fitted preprocessor's tree view of the rows (``native_inputs``): numbers
with their gaps as NaN, categorical columns as category codes split natively
(``categorical_features``), so the trees see neither imputed values nor one-hot columns.

Boosting is warm-started ``train.gbdt.rounds_per_epoch`` rounds at a time; after each such
epoch it appends a history row (``epoch, train_loss, val_loss, val_accuracy``, the losses
being mean cross-entropy like the networks'), calls ``on_epoch`` with it (the stage logs it
to MLflow, tuning reports it and may raise to prune), and stops after ``train.patience``
epochs without a better validation loss, keeping the best. The same arrays and seed give the
same trees.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from model.files import PREPROCESSOR_FILE
from model.gbdt import GBDT_FILE, NATIVE_INPUTS, gbdt_proba, save_gbdt
from model.preprocess import FittedPreprocessor, load_preprocessor
from stages.common import integrity, tracking
from stages.common.config import Params, TrainParams
from stages.common.errors import ConfigError, PipelineError
from stages.common.io import atomic_path, read_parquet, write_text

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


def build_gbdt(
    params: TrainParams, seed: int, total_rounds: int, categorical: Sequence[bool] | None = None
) -> Any:
    """The warm-startable classifier for ``train.gbdt``; ``categorical`` marks the columns
    it splits as categories (HistGradientBoosting's ``categorical_features``).

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
        categorical_features=np.array(categorical, dtype=bool) if any(categorical or ()) else None,
    )


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
    categorical: Sequence[bool] | None = None,
) -> GbdtResult:
    """Boost with early stopping on validation loss, ``rounds_per_epoch`` rounds per epoch.

    Args:
        X_train, y_train: the preprocessed training rows and their class ids (0..n-1).
        X_val, y_val: the validation rows (early stopping and the history; never trained on).
        params: the ``train`` section (``gbdt``, ``max_epochs``, ``patience``).
        seed: the estimator's ``random_state``.
        on_epoch: called with each history row; whatever it raises propagates (pruning).
        n_classes: the classes the model predicts (default: the highest class id seen + 1).
        categorical: which columns are categories (codes 0..k-1, NaN for missing), e.g.
            :func:`native_inputs`' mask; default none.

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
    estimator = build_gbdt(params, seed, params.max_epochs * rounds, categorical)
    history: list[dict[str, float]] = []
    best, best_epoch, best_val, since_best = None, 0, math.inf, 0
    for epoch in range(1, params.max_epochs + 1):
        estimator.set_params(max_iter=epoch * rounds)
        estimator.fit(X_train, y_train)  # warm start: adds this epoch's rounds only
        proba = gbdt_proba(estimator, X_val, n_classes)
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


# --- the train stage's gbdt branch ---------------------------------------------------------


def native_inputs(
    splits: dict[str, pd.DataFrame], preprocessor: FittedPreprocessor, params: TrainParams
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[bool]]:
    """What gbdt trains on: each split's tree view by the fitted preprocessor (NaN kept,
    categories as codes: ``transform_native``), its class ids, and the categorical mask
    (a column with more than ``train.gbdt.max_bins`` categories stays an ordered code)."""
    X = {name: preprocessor.transform_native(df) for name, df in splits.items()}
    y = {name: preprocessor.encode_labels(df[preprocessor.target]) for name, df in splits.items()}
    return X, y, preprocessor.native_categorical(params.gbdt.max_bins)


def fit_gbdt_splits(
    splits: dict[str, pd.DataFrame],
    preprocessor: FittedPreprocessor,
    params: TrainParams,
    seed: int,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> GbdtResult:
    """:func:`fit_gbdt` on the raw ``train`` and ``val`` splits, as the stage fits it (and
    tuning should, so that a trial scores the model the stage would train)."""
    X, y, categorical = native_inputs(splits, preprocessor, params)
    return fit_gbdt(
        X["train"],
        y["train"],
        X["val"],
        y["val"],
        params,
        seed,
        on_epoch,
        n_classes=len(preprocessor.classes),
        categorical=categorical,
    )


def model_meta(
    result: GbdtResult, train: TrainParams, n_features: int, n_classes: int, categorical: list[bool]
) -> dict[str, Any]:
    """What model.skops holds beside the trees (also for an ensemble member, so both load
    alike): the params, sizes, best epoch and the tree view it scores (model.gbdt)."""
    return {
        "train_params": train.model_dump(mode="json"),
        "n_features": int(n_features),
        "n_classes": n_classes,
        "epoch": result.best_epoch,
        "val_loss": result.best_val_loss,
        "inputs": NATIVE_INPUTS,  # scored on transform_native (model.gbdt)
        "categorical": categorical,
    }


def run_gbdt(
    params: Params,
    features_dir: Path,
    validation_report: Path,
    out_dir: Path,
    history_path: Path,
    *,
    params_file: str | Path | None = None,
) -> GbdtResult:
    """The train stage for ``model: gbdt``: the same inputs, MLflow run and outputs as a
    network (``out_dir/model.skops`` + ``run.json``, the history CSV), fitted by
    :func:`fit_gbdt` on the preprocessor's tree view of the rows.

    It reads the train and val splits only (test is described in MLflow by its file hash).
    No resume checkpoints: a killed run starts over (boosting the default data takes seconds).
    """
    import torch  # the MLflow run's device argument (and mlflow_run imports it anyway)

    from stages.train.checkpoint import GracefulStop
    from stages.train.mlflow_run import history_csv, training_run

    with GracefulStop():  # SIGTERM/SIGINT: the MLflow run ends KILLED, nothing is written
        preprocessor = load_preprocessor(features_dir / PREPROCESSOR_FILE)
        splits = {name: read_parquet(features_dir / f"{name}.parquet") for name in ("train", "val")}
        X, y, categorical = native_inputs(splits, preprocessor, params.train)
        n_classes = len(preprocessor.classes)
        logger.info(
            "training gbdt (%d columns, %d categorical, NaN kept -> %d classes) on %d rows, "
            "%d val rows",
            X["train"].shape[1],
            sum(categorical),
            n_classes,
            len(X["train"]),
            len(X["val"]),
        )
        snapshot = integrity.snapshot_for(params_file) if params_file else None
        with training_run(
            params,
            None,
            preprocessor=preprocessor,
            splits=splits,
            features_dir=features_dir,
            validation_report=validation_report,
            params_file=params_file,
            params_text=snapshot.text if snapshot is not None else None,
            device=torch.device("cpu"),
            world_size=1,
        ) as mlrun:
            result = fit_gbdt(
                X["train"],
                y["train"],
                X["val"],
                y["val"],
                params.train,
                params.base.seed,
                on_epoch=mlrun.log_epoch,
                n_classes=n_classes,
                categorical=categorical,
            )
            history = history_csv(result.history)
            mlrun.log_results(result.best_epoch, result.best_val_loss, history, validation_report)
            if snapshot is not None:  # params.yaml edited while training: no output, run FAILED
                snapshot.check_unchanged("train")
            meta = model_meta(result, params.train, X["train"].shape[1], n_classes, categorical)
            with atomic_path(out_dir) as tmp:  # one swap: model.skops and run.json together
                tmp.mkdir()
                save_gbdt(result.estimator, meta, tmp / GBDT_FILE)
                tracking.save_run_info(tmp, mlrun.run_id, mlrun.experiment_id)
            write_text(history_path, history)
    logger.info(
        "gbdt: best epoch %d (val_loss %.4f, %d rounds) of %d; wrote %s and %s",
        result.best_epoch,
        result.best_val_loss,
        result.estimator.n_iter_,
        len(result.history),
        out_dir / GBDT_FILE,
        history_path,
    )
    return result
