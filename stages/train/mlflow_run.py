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

from model import nets
from model.preprocess import FittedPreprocessor
from stages.common import tracking
from stages.common.config import Params, TrainParams
from stages.train.checkpoint import TrainingInterrupted, hash_files

logger = logging.getLogger(__name__)

INPUT_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}  # MLflow inputs
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_accuracy")


def history_csv(history: list[dict[str, float]]) -> str:
    """The history as CSV text: ``epoch,train_loss,val_loss,val_accuracy`` (every family)."""
    return pd.DataFrame(history, columns=list(HISTORY_COLUMNS)).to_csv(index=False)


def flatten_params(params: Params, sections: Sequence[str]) -> dict[str, Any]:
    """``{"train.lr": 0.001, "train.transformer.d_token": 32, ...}`` for the named sections:
    nested sections become dotted keys, lists and nulls become strings."""
    flat: dict[str, Any] = {}
    for name in sections:
        flat.update(_flatten(getattr(params, name).model_dump(mode="json"), name))
    return flat


def _flatten(values: dict[str, Any], prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}.{key}"))
        else:
            flat[f"{prefix}.{key}"] = (
                value if isinstance(value, (int, float, str, bool)) else str(value)
            )
    return flat


def sequence_steps(preprocessor: FittedPreprocessor, params: TrainParams) -> list[list[str]]:
    """For ``model: rnn``: the model's input columns grouped per step, as the sequence net
    reads them; [] for the other families. Train calls it before it builds the network.

    Raises:
        ConfigError: the columns do not split into ``rnn.sequence_length`` equal steps (the
            message names them).
    """
    if params.model != "rnn":
        return []
    names = [
        str(name).split("__", 1)[-1]  # "num__rain_d0" -> "rain_d0"
        for name in preprocessor.transformer.get_feature_names_out()
    ]
    return nets.sequence_steps(names, params.rnn.sequence_length)


def _log_sequence_steps(steps: list[list[str]]) -> None:
    """The step grouping into the log and the run; a warning when steps hold unlike columns."""
    import mlflow

    logger.info(
        "rnn: %d steps of %d columns; step 0: %s; step %d: %s",
        len(steps),
        len(steps[0]),
        ", ".join(steps[0]),
        len(steps) - 1,
        ", ".join(steps[-1]),
    )
    if unlike := nets.unlike_steps(steps):
        logger.warning(
            "rnn: step %d holds columns %s, step 0 holds %s (digits aside they should match): "
            "are the window's columns in step-major order, step 0's first?",
            unlike[0],
            steps[unlike[0]],
            steps[0],
        )
    mlflow.log_dict({"steps": steps}, "data/sequence_steps.json")


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
            if steps := sequence_steps(preprocessor, params.train):
                _log_sequence_steps(steps)
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
