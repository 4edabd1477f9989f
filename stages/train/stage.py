"""Train: fit the MLP (tables) or CNN (images) with early stopping, log it all to MLflow.

Reads top to bottom: config -> device/dtype/seed -> data -> model -> optimizer -> loop ->
checkpoint. The loop (``train_model``) is pure: tensors in, best weights and history out; the
MLflow run, the resume checkpoints and the outputs are ``run``'s job.

    python -m stages.train --features data/features --validation-report reports/validation \
        --out models --history reports/train/history.csv

With ``train.nproc`` > 1 (or several GPUs visible) the stage re-launches itself under torchrun
(DDP: one process per GPU, gloo on CPU); rank 0 alone talks to MLflow and writes outputs. A
killed run resumes from its last checkpoint in ``--resume-dir`` when started again.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from model.files import NETWORK_FILE, PREPROCESSOR_FILE
from model.nets import build_network, select_device
from model.preprocess import FittedPreprocessor, load_preprocessor
from stages.common import integrity, tracking
from stages.common.cli import build_parser, run_main
from stages.common.config import Params, TrainParams
from stages.common.errors import PipelineError
from stages.common.io import atomic_path, write_text
from stages.train import distributed
from stages.train.augment import ImageAugmenter
from stages.train.batches import (  # noqa: F401
    StreamedTrainData,
    TrainData,
    load_train_data,
    make_batches,
    make_train_data,
)
from stages.train.checkpoint import (
    GracefulStop,
    LoopState,
    ResumeStore,
    TrainingInterrupted,
    hash_files,
    restore_checkpoint,
    resume_key,
    save_checkpoint,
    stop_requested,
)
from stages.train.distributed import DistInfo
from stages.train.training import (
    build_optimizer,
    build_scheduler,
    oom_message,
    resolve_precision,
    wrap_model,
)

logger = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_accuracy")
INPUT_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}  # MLflow inputs
EVAL_BATCH = 4096  # rows per forward pass when scoring the validation split
DEFAULT_RESUME_DIR = ".resume/train"  # outside every DVC output: `dvc repro` leaves it alone


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


def evaluate_split(
    network: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    precision: str = "auto",
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``network`` on one split, in eval mode."""
    network.eval()
    autocast = resolve_precision(precision, device).autocast(device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    with torch.inference_mode():
        for start in range(0, len(X), EVAL_BATCH):
            xb = X[start : start + EVAL_BATCH].to(device, non_blocking=True)
            yb = y[start : start + EVAL_BATCH].to(device, non_blocking=True)
            with autocast:
                logits = network(xb)
            loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
            correct += (logits.argmax(dim=1) == yb).sum()
    return loss_sum.item() / len(X), correct.item() / len(X)


def _check_finite(value: float, what: str, epoch: int, params: TrainParams) -> None:
    if not math.isfinite(value):
        raise PipelineError(
            f"{what} is {value} at epoch {epoch}: training diverged (train.lr={params.lr}); "
            "lower train.lr or check the features for NaN/inf values"
        )


def train_model(
    network: nn.Module,
    data: TrainData | StreamedTrainData,
    params: TrainParams,
    device: torch.device,
    seed: int,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    *,
    dist: DistInfo | None = None,
    store: ResumeStore | None = None,
    resume: dict[str, Any] | None = None,
    stop: GracefulStop | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
) -> TrainResult:
    """Fit ``network`` with early stopping on validation loss.

    Args:
        network: freshly built model, already on ``device``.
        data: train/val tensors on ``device``, or streamed training rows.
        params: the ``train`` section (optimizer, schedule, precision, batch size, ...).
        device: where to train.
        seed: seeds the batch order (a CPU generator, so it is the same on any device).
        on_epoch: called with each history row (the stage logs it to MLflow).
        dist: this process's DDP rank (single process when None); every rank calls this.
        store: where to write resume checkpoints (none when None).
        resume: a checkpoint from ``store`` to continue from, bit-exactly on CPU.
        stop: SIGTERM/SIGINT handler; when it fires, checkpoint and raise.
        checkpoint_extra: saved with every checkpoint (the stage's MLflow run id).

    Raises:
        PipelineError: the loss became NaN/inf, or the device ran out of memory.
        TrainingInterrupted: ``stop`` fired; the checkpoint was written first.
    """
    dist = dist or DistInfo()
    precision = resolve_precision(params.precision, device)
    model = wrap_model(network, params, device, dist)
    eval_net = network if dist.enabled else model  # every rank scores the whole val split
    optimizer = build_optimizer(params, network.parameters())
    batches = make_batches(data, params.batch_size, device, dist)
    scheduler = build_scheduler(optimizer, params, batches.steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type) if precision.scaler else None
    augment = (
        ImageAugmenter(
            params.image_shape,
            params.augment_crop_pad,
            params.augment_flip,
            params.augment_noise,
            params.augment_seed,
            device,
        )
        if params.augments
        else None
    )
    shuffle = torch.Generator().manual_seed(seed)
    state = LoopState()
    if resume is not None:
        state = restore_checkpoint(
            resume,
            network,
            optimizer,
            scheduler,
            scaler,
            shuffle,
            augment.generator if augment else None,
            device,
            dist,
        )

    def save(shuffle_state: torch.Tensor) -> None:
        if store is not None:  # a collective in DDP: every rank gets here, rank 0 writes
            save_checkpoint(
                store,
                state,
                network,
                optimizer,
                scheduler,
                scaler,
                shuffle_state,
                augment.generator if augment else None,
                device,
                dist,
                checkpoint_extra or {},
            )

    every = params.checkpoint_every_steps
    # disable=None: a live bar in a terminal (`dvc repro`), a log line every 10 epochs otherwise
    with (
        tqdm(
            total=params.max_epochs,
            initial=len(state.history),
            desc="train",
            unit="epoch",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=None if dist.is_main else True,
        ) as bar,
        stop.deferred() if stop is not None else nullcontext(),
    ):
        try:
            while not state.done:
                epoch_shuffle = shuffle.get_state()  # a mid-epoch resume redraws this order
                if state.batch == 0:
                    state.loss_sum, state.rows = torch.zeros((), device=device), 0
                model.train()
                for xb, yb in batches.epoch(shuffle, state.batch):
                    if augment is not None:
                        xb = augment(xb)
                    with precision.autocast(device):
                        logits = model(xb)
                    loss = F.cross_entropy(logits.float(), yb)  # the loss in float32
                    optimizer.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.unscale_(optimizer)  # clip true gradients, not scaled ones
                    else:
                        loss.backward()
                    if params.max_grad_norm:
                        nn.utils.clip_grad_norm_(network.parameters(), params.max_grad_norm)
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    if scheduler is not None:
                        scheduler.step()
                    state.loss_sum.add_(
                        loss.detach(), alpha=len(yb)
                    )  # no .item(): no sync per step
                    state.rows += len(yb)
                    state.batch += 1
                    state.step += 1
                    if every and state.step % every == 0:
                        save(epoch_shuffle)
                    if stop_requested(stop, state.step, dist, device):
                        save(epoch_shuffle)
                        raise TrainingInterrupted(
                            f"training stopped by {stop.signal_name} at epoch {state.epoch}, "
                            f"step {state.step}; run the stage again to resume from the "
                            f"checkpoint{f' in {store.path}' if store else ''}"
                        )

                # .item() syncs with the device once per epoch, not once per batch.
                train_loss = distributed.sum_all(state.loss_sum, dist).item() / (
                    state.rows * dist.world_size
                )
                _check_finite(train_loss, "train loss", state.epoch, params)
                val_loss, val_acc = evaluate_split(
                    eval_net, data.X_val, data.y_val, device, params.precision
                )
                _check_finite(val_loss, "validation loss", state.epoch, params)

                row = {
                    "epoch": state.epoch,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "val_accuracy": val_acc,
                }
                state.history.append(row)
                if on_epoch is not None:
                    on_epoch(row)
                if val_loss < state.best_val:
                    # Copy to CPU: the next optimizer step would otherwise overwrite the best.
                    state.best_state = {
                        k: v.detach().to("cpu", copy=True) for k, v in network.state_dict().items()
                    }
                    state.best_epoch, state.best_val, state.since_best = state.epoch, val_loss, 0
                else:
                    state.since_best += 1
                state.done = state.since_best >= params.patience or state.epoch == params.max_epochs
                state.epoch, state.batch = state.epoch + 1, 0
                save(shuffle.get_state())

                bar.set_postfix(
                    train_loss=f"{train_loss:.4f}",
                    val_loss=f"{val_loss:.4f}",
                    val_acc=f"{val_acc:.3f}",
                    best=state.best_epoch,
                    refresh=False,
                )
                bar.update()
                if bar.disable and dist.is_main and (row["epoch"] == 1 or row["epoch"] % 10 == 0):
                    logger.info(
                        "epoch %d: train_loss %.4f val_loss %.4f val_accuracy %.3f",
                        row["epoch"],
                        train_loss,
                        val_loss,
                        val_acc,
                    )
        except torch.OutOfMemoryError as exc:
            raise PipelineError(oom_message(params.batch_size, device)) from exc

    stopped_early = len(state.history) < params.max_epochs
    if stopped_early and dist.is_main:
        logger.info(
            "early stop at epoch %d: no val-loss improvement for %d epochs",
            len(state.history),
            params.patience,
        )
    return TrainResult(
        state.best_state, state.history, state.best_epoch, state.best_val, stopped_early
    )


def history_csv(history: list[dict[str, float]]) -> str:
    """The history as CSV text: ``epoch,train_loss,val_loss,val_accuracy``."""
    return pd.DataFrame(history, columns=list(HISTORY_COLUMNS)).to_csv(index=False)


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


# ----------------------------------------------------------------------------- I/O


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


def _save_models(
    out_dir: Path, checkpoint: dict[str, Any], run_id: str, experiment_id: str
) -> None:
    # One atomic swap of the whole folder: model.pt and run.json always belong together.
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        torch.save(checkpoint, tmp / NETWORK_FILE)
        tracking.save_run_info(tmp, run_id, experiment_id)


def _open_mlflow_run(params: Params, resume: dict[str, Any] | None) -> tuple[Any, str, bool]:
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


def _resume_store(
    resume_dir: str | Path,
    params: Params,
    features_dir: Path,
    device: torch.device,
    streamed: bool,
    dist: DistInfo,
) -> ResumeStore:
    config = {
        "train": params.train.model_dump(mode="json"),
        "seed": params.base.seed,
        "device": device.type,
        "world_size": dist.world_size,
        "streamed": streamed,
    }
    data_hash = hash_files(
        [features_dir / name for name in ("train.parquet", "val.parquet", PREPROCESSOR_FILE)]
    )
    return ResumeStore(Path(resume_dir), resume_key(config, data_hash))


def run(
    features_dir: str | Path,
    validation_report: str | Path,
    out_dir: str | Path,
    history_path: str | Path,
    params: Params,
    *,
    resume_dir: str | Path = DEFAULT_RESUME_DIR,
    resume: bool = True,
    params_file: str | Path | None = None,
) -> TrainResult:
    """Train on ``features_dir``; write ``out_dir/model.pt`` + ``run.json`` and the history.

    Everything is logged to one MLflow run (params, config, per-epoch metrics, dataset inputs,
    the validation report). A failure ends that run FAILED and writes no output; SIGTERM ends
    it KILLED after a checkpoint. A re-run resumes from ``resume_dir`` (unless ``resume`` is
    False) and continues the same MLflow run. Under torchrun every rank calls this; only
    rank 0 logs and writes. ``params_file`` (the one ``params`` came from) and dvc.lock are
    logged under ``lineage/``, so that ``flows.reproduce`` can rebuild the run.
    """
    features_dir, out_dir = Path(features_dir), Path(out_dir)
    dist = distributed.current()
    with GracefulStop() as stop:
        # config (the params arrive resolved; the preprocessor defines the inputs and classes)
        preprocessor = load_preprocessor(features_dir / PREPROCESSOR_FILE)
        # device / dtype / seed
        device = distributed.setup(dist, select_device(params.base.device))
        try:
            seed_torch(params.base.seed, device)
            resolve_precision(params.train.precision, device)  # a bad choice fails before I/O
            # data
            data, splits = load_train_data(features_dir, preprocessor, params.train, device)
            n_features, n_classes = preprocessor.n_features, len(preprocessor.classes)
            # model
            network = build_network(params.train, n_features, n_classes).to(device)
            # resume state
            store = _resume_store(
                resume_dir, params, features_dir, device, isinstance(data, StreamedTrainData), dist
            )
            if not resume and dist.is_main:
                store.clear()
            state = store.load() if resume else None
            if state is None and dist.is_main:
                store.clear_others()
            if not dist.is_main:
                return train_model(
                    network,
                    data,
                    params.train,
                    device,
                    params.base.seed,
                    dist=dist,
                    store=store,
                    resume=state,
                    stop=stop,
                )
            logger.info(
                "training %s (%d features -> %d classes) on %s x%d, %d val rows",
                params.train.model,
                n_features,
                n_classes,
                device,
                dist.world_size,
                len(data.X_val),
            )
            return _train_tracked(
                network,
                data,
                splits,
                preprocessor,
                params,
                device,
                dist,
                store,
                state,
                stop,
                features_dir,
                Path(validation_report),
                out_dir,
                Path(history_path),
                params_file,
            )
        finally:
            distributed.teardown(dist)


def _train_tracked(
    network: nn.Module,
    data: TrainData | StreamedTrainData,
    splits: dict[str, pd.DataFrame],
    preprocessor: FittedPreprocessor,
    params: Params,
    device: torch.device,
    dist: DistInfo,
    store: ResumeStore,
    state: dict[str, Any] | None,
    stop: GracefulStop,
    features_dir: Path,
    validation_report: Path,
    out_dir: Path,
    history_path: Path,
    params_file: str | Path | None,
) -> TrainResult:
    """Rank 0: the loop inside one MLflow run that never stays RUNNING, then the outputs."""
    import mlflow

    n_features, n_classes = preprocessor.n_features, len(preprocessor.classes)
    metrics: tracking.MetricBuffer | None = None
    # The params file as the stage read it (stages.common.cli.run_main took it): logged under
    # lineage/, and compared with the file before any output is written.
    snapshot = integrity.snapshot_for(params_file) if params_file is not None else None
    try:
        active, experiment_id, resumed = _open_mlflow_run(params, state)
        if resumed:
            mlflow.set_tag("resumed_at_step", state["step"])
        else:
            # the data versions train reads; its own outputs are tagged by register, which
            # hashes the files once DVC has locked them
            mlflow.set_tags(
                {
                    **tracking.lineage_tags(stage="train"),
                    "device": str(device),
                    "world_size": dist.world_size,
                }
            )
            mlflow.log_params(
                {
                    **flatten_params(params, ("base", "ingest", "features", "train")),
                    "data.n_features": n_features,
                    "data.n_classes": n_classes,
                    "data.classes": str(preprocessor.classes),
                }
            )
            mlflow.log_dict(params_dict(params), "config/params.json")
            tracking.log_lineage(
                ".",
                params_file,
                validation_report,
                params_text=snapshot.text if snapshot is not None else None,
            )
            _log_inputs(splits, features_dir, preprocessor.target)

        # optimizer + loop (per-epoch metrics go out in batches: logging never stalls training)
        metrics = tracking.MetricBuffer(active.info.run_id)
        result = train_model(
            network,
            data,
            params.train,
            device,
            params.base.seed,
            on_epoch=lambda row: metrics.add(
                {k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"])
            ),
            dist=dist,
            store=store,
            resume=state,
            stop=stop,
            checkpoint_extra={"run_id": active.info.run_id},
        )
        if stop.requested:  # a signal during the last epoch's scoring: its checkpoint is saved
            raise TrainingInterrupted(
                f"training stopped by {stop.signal_name} after the last "
                "epoch; run the stage again to write the outputs"
            )
        metrics.flush()
        mlflow.log_metrics({"best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss})

        # checkpoint + history (logged first, written last: a failure above writes nothing)
        history = history_csv(result.history)
        mlflow.log_text(history, "train/history.csv")
        if validation_report.is_dir():
            mlflow.log_artifacts(str(validation_report), artifact_path="validation")
        else:
            logger.warning("no validation report at %s; not logged", validation_report)
        checkpoint = {
            "state_dict": result.state_dict,
            "train_params": params.train.model_dump(mode="json"),
            "n_features": n_features,
            "n_classes": n_classes,
            "epoch": result.best_epoch,
            "val_loss": result.best_val_loss,
        }
        if snapshot is not None:  # params.yaml edited while training: no output, run FAILED
            snapshot.check_unchanged("train")
        _save_models(out_dir, checkpoint, active.info.run_id, experiment_id)
        write_text(history_path, history)
    except TrainingInterrupted as exc:
        _end_run("KILLED", metrics, exc)
        raise
    except BaseException as exc:
        _end_run("FAILED", metrics, exc)
        raise
    _end_run("FINISHED", metrics)
    store.clear()  # done: a new run with these params and data starts fresh
    logger.info(
        "best epoch %d (val_loss %.4f) of %d; wrote %s and %s",
        result.best_epoch,
        result.best_val_loss,
        len(result.history),
        out_dir / NETWORK_FILE,
        history_path,
    )
    return result


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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stages.train --features DIR --validation-report DIR --out DIR --history F``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser("train", "Train the network with early stopping; log to MLflow.")
    parser.add_argument("--features", required=True, help="features folder (features stage)")
    parser.add_argument(
        "--validation-report",
        required=True,
        help="validation report folder, logged to MLflow under validation/",
    )
    parser.add_argument("--out", required=True, help="model folder: model.pt + run.json")
    parser.add_argument("--history", required=True, help="per-epoch history CSV")
    parser.add_argument(
        "--resume-dir",
        default=DEFAULT_RESUME_DIR,
        help="resume checkpoints (kept out of DVC outputs; removed on success)",
    )
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="discard this training's resume checkpoint and start over",
    )

    def body(args: argparse.Namespace, params: Params) -> None:
        nproc = distributed.resolve_nproc(params.train.nproc, params.base.device)
        if nproc > 1 and not distributed.current().enabled:
            distributed.launch_torchrun(nproc, "stages.train", argv)
            return
        run(
            args.features,
            args.validation_report,
            args.out,
            args.history,
            params,
            resume_dir=args.resume_dir,
            resume=not args.no_resume,
            params_file=args.params,
        )

    return run_main("train", parser, body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
