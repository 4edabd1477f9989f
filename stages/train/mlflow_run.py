"""The MLflow run of one training: opened (or the checkpoint's run reopened), described once
(tags, params, config, lineage, dataset inputs), fed per-epoch metrics, given the results,
and always ended: FINISHED, KILLED (SIGTERM/SIGINT) or FAILED, never left RUNNING.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from model.preprocess import FittedPreprocessor
from stages.common import tracking
from stages.common.config import Params
from stages.train.checkpoint import TrainingInterrupted, hash_files

logger = logging.getLogger(__name__)

INPUT_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}  # MLflow inputs


def flatten_params(params: Params, sections: Sequence[str]) -> dict[str, Any]:
    """``{"train.lr": 0.001, ...}`` for the named sections (lists become strings)."""
    flat = {}
    for name in sections:
        for key, value in getattr(params, name).model_dump(mode="json").items():
            flat[f"{name}.{key}"] = (
                value if isinstance(value, (int, float, str, bool)) else str(value)
            )
    return flat


def params_dict(params: Params) -> dict[str, Any]:
    """The whole resolved config as plain JSON-able data."""
    return {
        field.name: getattr(params, field.name).model_dump(mode="json")
        for field in dataclasses.fields(params)
    }


@dataclass(frozen=True)
class TrainingRun:
    """The open run; per-epoch metrics go out in batches, so logging never stalls training."""

    run_id: str
    experiment_id: str
    metrics: tracking.MetricBuffer

    def log_epoch(self, row: dict[str, float]) -> None:
        """Queue one history row as metrics at step ``row["epoch"]``."""
        self.metrics.add({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

    def log_results(
        self, best_epoch: int, best_val_loss: float, history: str, validation_report: Path
    ) -> None:
        """The last metrics, the best epoch, the history CSV and the validation report."""
        import mlflow

        self.metrics.flush()
        mlflow.log_metrics({"best_epoch": best_epoch, "best_val_loss": best_val_loss})
        mlflow.log_text(history, "train/history.csv")
        if validation_report.is_dir():
            mlflow.log_artifacts(str(validation_report), artifact_path="validation")
        else:
            logger.warning("no validation report at %s; not logged", validation_report)


@contextmanager
def training_run(
    params: Params,
    resume: dict[str, Any] | None,
    *,
    preprocessor: FittedPreprocessor,
    splits: dict[str, pd.DataFrame],
    features_dir: Path,
    validation_report: Path,
    params_file: str | Path | None,
    params_text: str | None,
    device: torch.device,
    world_size: int,
) -> Iterator[TrainingRun]:
    """Open the run (the ``resume`` checkpoint's run when it still exists, else a described
    new one); end it FINISHED, or KILLED/FAILED when the block raises (and re-raise)."""
    import mlflow

    metrics: tracking.MetricBuffer | None = None
    try:
        active, experiment_id, resumed = _open_run(params, resume)
        if resumed:
            mlflow.set_tag("resumed_at_step", resume["step"])
        else:
            # the data versions train reads; its own outputs are tagged by register, which
            # hashes the files once DVC has locked them
            mlflow.set_tags(
                {
                    **tracking.lineage_tags(stage="train"),
                    "device": str(device),
                    "world_size": world_size,
                }
            )
            mlflow.log_params(
                {
                    **flatten_params(params, ("base", "ingest", "features", "train")),
                    "data.n_features": preprocessor.n_features,
                    "data.n_classes": len(preprocessor.classes),
                    "data.classes": str(preprocessor.classes),
                }
            )
            mlflow.log_dict(params_dict(params), "config/params.json")
            tracking.log_lineage(".", params_file, validation_report, params_text=params_text)
            _log_inputs(splits, features_dir, preprocessor.target)
        metrics = tracking.MetricBuffer(active.info.run_id)
        yield TrainingRun(active.info.run_id, experiment_id, metrics)
    except TrainingInterrupted as exc:
        _end_run("KILLED", metrics, exc)
        raise
    except BaseException as exc:
        _end_run("FAILED", metrics, exc)
        raise
    _end_run("FINISHED", metrics)


def _open_run(params: Params, resume: dict[str, Any] | None) -> tuple[Any, str, bool]:
    """(active run, experiment id, resumed?): the checkpoint's run when it still exists."""
    import mlflow
    from mlflow.exceptions import MlflowException

    experiment_id = tracking.configure_mlflow(params.mlflow)
    run_id = (resume or {}).get("run_id")
    if run_id:
        try:
            mlflow.get_run(run_id)
            return mlflow.start_run(run_id=run_id), experiment_id, True
        except MlflowException:
            logger.warning("MLflow run %s of the checkpoint is gone; starting a new run", run_id)
    return mlflow.start_run(run_name=f"train-{params.train.model}"), experiment_id, False


def _log_inputs(splits: dict[str, pd.DataFrame], features_dir: Path, target: str) -> None:
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():
        # Harmless MLflow notes: a local path matches two equivalent source types, and the
        # integer target column triggers a schema hint meant for model signatures.
        warnings.filterwarnings(
            "ignore",
            category=UserWarning,
            message="(The specified dataset source|Hint: Inferred schema)",
        )
        for name, context in INPUT_CONTEXTS.items():
            path = features_dir / f"{name}.parquet"
            if name in splits:
                dataset = mlflow.data.from_pandas(
                    splits[name],
                    source=str(path.resolve()),
                    targets=target,
                    name=f"{features_dir.name}-{name}",
                )
            else:  # streamed: never loaded whole, so describe it by its file hash
                dataset = MetaDataset(
                    resolve_dataset_source(str(path.resolve())),
                    name=f"{features_dir.name}-{name}",
                    digest=hash_files([path])[:8],
                )
            mlflow.log_input(dataset, context=context)


def _end_run(
    status: str, metrics: tracking.MetricBuffer | None, error: BaseException | None = None
) -> None:
    # The run never stays RUNNING: a failed flush (a full disk) ends it FAILED, and while
    # ``error`` is handled nothing here raises over it (tracking.end_run).
    try:
        if metrics is not None:
            metrics.flush()  # the epochs before a failure stay visible in the run
    except Exception as exc:
        if error is None:
            tracking.end_run("FAILED", exc)
            raise
        logger.warning("the last epochs' metrics were not logged: %s", exc)
    tracking.end_run(status, error)
