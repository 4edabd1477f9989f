"""Train: fit the MLP (tables) or CNN (images) with early stopping, log it all to MLflow.

Reads top to bottom: config -> device/dtype/seed -> data -> model -> optimizer -> loop ->
checkpoint. The loop (``train_model``) is pure: tensors in, best weights and history out; the
MLflow run, the checkpoint and the history CSV are ``run``'s job.

    python -m stages.train --features data/features --validation-report reports/validation \
        --out models --history reports/train/history.csv
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from stages.common import tracking
from stages.common.cli import build_parser, run_main
from stages.common.config import Params, TrainParams
from stages.common.errors import PipelineError
from stages.common.io import atomic_path, read_parquet, write_text
from stages.common.nets import build_network, select_device
from stages.common.preprocess import FittedPreprocessor, load_preprocessor

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_accuracy")
INPUT_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}  # MLflow inputs
EVAL_BATCH = 4096  # rows per forward pass when scoring the validation split


@dataclass(frozen=True)
class TrainData:
    """Transformed features and class ids, already on the training device."""

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor


@dataclass(frozen=True)
class TrainResult:
    """The best checkpoint (by validation loss, on CPU) and the per-epoch history."""

    state_dict: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    best_epoch: int
    best_val_loss: float
    stopped_early: bool


# ----------------------------------------------------------------------------- pure core


def seed_torch(seed: int, device: torch.device) -> None:
    """Seed torch; on CPU also insist on deterministic kernels (same seed -> same weights)."""
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)


def make_train_data(splits: dict[str, pd.DataFrame], preprocessor: FittedPreprocessor,
                    device: torch.device) -> TrainData:
    """Transform the train/val splits and move them to ``device`` once (the data is small)."""
    def _tensors(df: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        X = torch.from_numpy(preprocessor.transform(df)).to(device)
        y = torch.from_numpy(preprocessor.encode_labels(df[preprocessor.target])).to(device)
        return X, y

    return TrainData(*_tensors(splits["train"]), *_tensors(splits["val"]))


def _autocast(device: torch.device) -> torch.autocast:
    # bf16 on CUDA only: CPU autocast is slow for small nets and would break bit-exact reruns.
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=device.type == "cuda")


def evaluate_split(network: nn.Module, X: torch.Tensor, y: torch.Tensor,
                   device: torch.device) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``network`` on one split, in eval mode."""
    network.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    with torch.inference_mode():
        for start in range(0, len(X), EVAL_BATCH):
            xb, yb = X[start:start + EVAL_BATCH], y[start:start + EVAL_BATCH]
            with _autocast(device):
                logits = network(xb)
            loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
            correct += (logits.argmax(dim=1) == yb).sum()
    return loss_sum.item() / len(X), correct.item() / len(X)


def _train_epoch(network: nn.Module, optimizer: torch.optim.Optimizer, data: TrainData,
                 order: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """One pass over the train split in ``order``; returns the mean train loss."""
    network.train()
    loss_sum = torch.zeros((), device=device)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        with _autocast(device):
            logits = network(data.X_train[idx])
        loss = F.cross_entropy(logits.float(), data.y_train[idx])  # the loss in float32
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(idx)
    # .item() syncs with the device once per epoch, not once per batch.
    return loss_sum.item() / len(order)


def _check_finite(value: float, what: str, epoch: int, params: TrainParams) -> None:
    if not math.isfinite(value):
        raise PipelineError(
            f"{what} is {value} at epoch {epoch}: training diverged (train.lr={params.lr}); "
            "lower train.lr or check the features for NaN/inf values")


def train_model(network: nn.Module, data: TrainData, params: TrainParams, device: torch.device,
                seed: int, on_epoch: Callable[[dict[str, float]], None] | None = None,
                ) -> TrainResult:
    """Fit ``network`` with AdamW and early stopping on validation loss.

    Args:
        network: freshly built model, already on ``device``.
        data: train/val tensors on ``device``.
        params: the ``train`` section (lr, weight_decay, batch_size, max_epochs, patience).
        device: where to train; bf16 autocast is used on CUDA.
        seed: seeds the batch order (a CPU generator, so it is the same on any device).
        on_epoch: called with each history row (the stage logs it to MLflow).

    Raises:
        PipelineError: the train or validation loss became NaN or infinite.
    """
    optimizer = torch.optim.AdamW(network.parameters(), lr=params.lr,
                                  weight_decay=params.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    n_train = len(data.X_train)
    history: list[dict[str, float]] = []
    best_state, best_epoch, best_val, since_best = None, 0, math.inf, 0

    # disable=None: a live bar in a terminal (`dvc repro`), a log line every 10 epochs otherwise
    with tqdm(total=params.max_epochs, desc="train", unit="epoch", file=sys.stderr,
              dynamic_ncols=True, disable=None) as bar:
        for epoch in range(1, params.max_epochs + 1):
            order = torch.randperm(n_train, generator=generator).to(device)
            train_loss = _train_epoch(network, optimizer, data, order, params.batch_size, device)
            _check_finite(train_loss, "train loss", epoch, params)
            val_loss, val_acc = evaluate_split(network, data.X_val, data.y_val, device)
            _check_finite(val_loss, "validation loss", epoch, params)

            row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                   "val_accuracy": val_acc}
            history.append(row)
            if on_epoch is not None:
                on_epoch(row)
            if val_loss < best_val:
                # Copy to CPU: the next optimizer step would otherwise overwrite the best weights.
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in
                              network.state_dict().items()}
                best_epoch, best_val, since_best = epoch, val_loss, 0
            else:
                since_best += 1
            bar.set_postfix(train_loss=f"{train_loss:.4f}", val_loss=f"{val_loss:.4f}",
                            val_acc=f"{val_acc:.3f}", best=best_epoch, refresh=False)
            bar.update()
            if bar.disable and (epoch == 1 or epoch % 10 == 0):
                logger.info("epoch %d: train_loss %.4f val_loss %.4f val_accuracy %.3f",
                            epoch, train_loss, val_loss, val_acc)
            if since_best >= params.patience:
                break
    stopped_early = len(history) < params.max_epochs
    if stopped_early:
        logger.info("early stop at epoch %d: no val-loss improvement for %d epochs",
                    len(history), params.patience)
    return TrainResult(best_state, history, best_epoch, best_val, stopped_early)


def history_csv(history: list[dict[str, float]]) -> str:
    """The history as CSV text: ``epoch,train_loss,val_loss,val_accuracy``."""
    return pd.DataFrame(history, columns=list(HISTORY_COLUMNS)).to_csv(index=False)


def flatten_params(params: Params, sections: Sequence[str]) -> dict[str, Any]:
    """``{"train.lr": 0.001, ...}`` for the named sections (lists become strings)."""
    flat = {}
    for name in sections:
        for key, value in getattr(params, name).model_dump(mode="json").items():
            flat[f"{name}.{key}"] = value if isinstance(value, (int, float, str, bool)) \
                else str(value)
    return flat


def params_dict(params: Params) -> dict[str, Any]:
    """The whole resolved config as plain JSON-able data."""
    return {field.name: getattr(params, field.name).model_dump(mode="json")
            for field in dataclasses.fields(params)}


# ----------------------------------------------------------------------------- I/O


def _read_splits(features_dir: Path) -> dict[str, pd.DataFrame]:
    return {name: read_parquet(features_dir / f"{name}.parquet")
            for name in ("train", "val", "test")}


def _log_inputs(splits: dict[str, pd.DataFrame], features_dir: Path, target: str) -> None:
    import mlflow

    with warnings.catch_warnings():
        # Harmless MLflow notes: a local path matches two equivalent source types, and the
        # integer target column triggers a schema hint meant for model signatures.
        warnings.filterwarnings("ignore", category=UserWarning,
                                message="(The specified dataset source|Hint: Inferred schema)")
        for name, df in splits.items():
            source = str((features_dir / f"{name}.parquet").resolve())
            dataset = mlflow.data.from_pandas(df, source=source, targets=target,
                                              name=f"{features_dir.name}-{name}")
            mlflow.log_input(dataset, context=INPUT_CONTEXTS[name])


def _save_models(out_dir: Path, checkpoint: dict[str, Any], run_id: str,
                 experiment_id: str) -> None:
    # One atomic swap of the whole folder: model.pt and run.json always belong together.
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        torch.save(checkpoint, tmp / MODEL_FILE)
        tracking.save_run_info(tmp, run_id, experiment_id)


def run(features_dir: str | Path, validation_report: str | Path, out_dir: str | Path,
        history_path: str | Path, params: Params) -> TrainResult:
    """Train on ``features_dir``; write ``out_dir/model.pt`` + ``run.json`` and the history.

    Everything is logged to one MLflow run (params, config, per-epoch metrics, dataset inputs,
    the validation report); a failure ends that run FAILED and writes no output.
    """
    import mlflow

    features_dir, out_dir = Path(features_dir), Path(out_dir)
    # config (the params arrive resolved; the preprocessor defines the inputs and classes)
    preprocessor = load_preprocessor(features_dir / "preprocessor.joblib")
    # device / dtype / seed
    device = select_device(params.base.device)
    seed_torch(params.base.seed, device)
    # data
    splits = _read_splits(features_dir)
    data = make_train_data(splits, preprocessor, device)
    n_features, n_classes = data.X_train.shape[1], len(preprocessor.classes)
    # model
    network = build_network(params.train, n_features, n_classes).to(device)
    logger.info("training %s (%d features -> %d classes) on %s, %d train / %d val rows",
                params.train.model, n_features, n_classes, device, len(data.X_train),
                len(data.X_val))

    experiment_id = tracking.configure_mlflow(params.mlflow)
    with mlflow.start_run(run_name=f"train-{params.train.model}") as active:
        mlflow.set_tags({**tracking.lineage_tags(), "device": str(device)})
        mlflow.log_params({**flatten_params(params, ("base", "ingest", "features", "train")),
                           "data.n_features": n_features, "data.n_classes": n_classes,
                           "data.classes": str(preprocessor.classes)})
        mlflow.log_dict(params_dict(params), "config/params.json")
        _log_inputs(splits, features_dir, preprocessor.target)

        # optimizer + loop
        result = train_model(network, data, params.train, device, params.base.seed,
                             on_epoch=lambda row: mlflow.log_metrics(
                                 {k: v for k, v in row.items() if k != "epoch"},
                                 step=int(row["epoch"])))
        mlflow.log_metrics({"best_epoch": result.best_epoch,
                            "best_val_loss": result.best_val_loss})

        # checkpoint + history (logged first, written last: a failure above writes nothing)
        history = history_csv(result.history)
        mlflow.log_text(history, "train/history.csv")
        if Path(validation_report).is_dir():
            mlflow.log_artifacts(str(validation_report), artifact_path="validation")
        else:
            logger.warning("no validation report at %s; not logged", validation_report)
        checkpoint = {"state_dict": result.state_dict,
                      "train_params": params.train.model_dump(mode="json"),
                      "n_features": n_features, "n_classes": n_classes,
                      "epoch": result.best_epoch, "val_loss": result.best_val_loss}
        _save_models(out_dir, checkpoint, active.info.run_id, experiment_id)
        write_text(history_path, history)
    logger.info("best epoch %d (val_loss %.4f) of %d; wrote %s and %s", result.best_epoch,
                result.best_val_loss, len(result.history), out_dir / MODEL_FILE, history_path)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stages.train --features DIR --validation-report DIR --out DIR --history F``."""
    parser = build_parser("train", "Train the network with early stopping; log to MLflow.")
    parser.add_argument("--features", required=True, help="features folder (features stage)")
    parser.add_argument("--validation-report", required=True,
                        help="validation report folder, logged to MLflow under validation/")
    parser.add_argument("--out", required=True, help="model folder: model.pt + run.json")
    parser.add_argument("--history", required=True, help="per-epoch history CSV")

    def body(args: argparse.Namespace, params: Params) -> None:
        run(args.features, args.validation_report, args.out, args.history, params)

    return run_main("train", parser, body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
