"""The training loop: tensors in, best weights and history out (no MLflow, no output files).

``train_model`` builds what the loop updates (wrapped network, optimizer, LR schedule, grad
scaler, augmenter, batch order), restores a resume checkpoint when given one, then runs epochs
until early stopping, checkpointing every ``checkpoint_every_steps`` steps and every epoch.
On CPU the same seed gives the same weights, also across a kill and resume.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from stages.common.config import TrainParams
from stages.common.errors import PipelineError
from stages.train import distributed
from stages.train.batches import StreamedTrainData, TrainData, make_batches
from stages.train.checkpoint import (
    GracefulStop,
    LoopState,
    ResumeStore,
    TrainingInterrupted,
    restore_checkpoint,
    save_checkpoint,
    stop_requested,
)
from stages.train.distributed import DistInfo
from stages.train.training import (
    build_loop_parts,
    check_finite,
    evaluate_split,
    oom_message,
    resolve_precision,
    train_step,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """The best checkpoint (by validation loss, on CPU) and the per-epoch history."""

    state_dict: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    best_epoch: int
    best_val_loss: float
    stopped_early: bool


def seed_torch(seed: int, device: torch.device) -> None:
    """Seed torch; on CPU also insist on deterministic kernels (same seed -> same weights)."""
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)


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
    batches = make_batches(data, params.batch_size, device, dist)
    parts = build_loop_parts(
        network, params, device, dist, precision, batches.steps_per_epoch, seed
    )
    eval_net = network if dist.enabled else parts.model  # every rank scores the whole val split
    state = LoopState() if resume is None else restore_checkpoint(resume, parts, device, dist)

    def save(shuffle_state: torch.Tensor) -> None:
        if store is not None:  # a collective in DDP: every rank gets here, rank 0 writes
            extra = checkpoint_extra or {}
            save_checkpoint(store, state, parts, shuffle_state, device, dist, extra)

    every = params.checkpoint_every_steps
    with (
        _progress_bar(params.max_epochs, len(state.history), dist) as bar,
        stop.deferred() if stop is not None else nullcontext(),
    ):
        try:
            while not state.done:
                epoch_shuffle = parts.shuffle.get_state()  # a mid-epoch resume redraws this order
                if state.batch == 0:
                    state.loss_sum, state.rows = torch.zeros((), device=device), 0
                parts.model.train()
                for xb, yb in batches.epoch(parts.shuffle, state.batch):
                    loss = train_step(parts, xb, yb, precision, device, params.max_grad_norm)
                    state.loss_sum.add_(loss.detach(), alpha=len(yb))  # no .item(): no sync
                    state.rows += len(yb)
                    state.batch += 1
                    state.step += 1
                    if every and state.step % every == 0:
                        save(epoch_shuffle)
                    if stop_requested(stop, state.step, dist, device):
                        save(epoch_shuffle)
                        raise _interrupted(stop, state, store)

                row = _score_epoch(state, eval_net, data, params, device, dist)
                state.history.append(row)
                if on_epoch is not None:
                    on_epoch(row)
                _keep_best(state, network, row["val_loss"])
                # early stopping: ``patience`` epochs without a better validation loss
                state.done = state.since_best >= params.patience or state.epoch == params.max_epochs
                state.epoch, state.batch = state.epoch + 1, 0
                save(parts.shuffle.get_state())
                _report_epoch(bar, row, state.best_epoch, dist)
        except torch.OutOfMemoryError as exc:
            raise PipelineError(oom_message(params.batch_size, device)) from exc
    return _finish(state, params, dist)


def _progress_bar(total: int, initial: int, dist: DistInfo) -> tqdm:
    # disable=None: a live bar in a terminal (`dvc repro`), a log line every 10 epochs otherwise
    return tqdm(
        total=total,
        initial=initial,
        desc="train",
        unit="epoch",
        file=sys.stderr,
        dynamic_ncols=True,
        disable=None if dist.is_main else True,
    )


def _interrupted(
    stop: GracefulStop, state: LoopState, store: ResumeStore | None
) -> TrainingInterrupted:
    return TrainingInterrupted(
        f"training stopped by {stop.signal_name} at epoch {state.epoch}, "
        f"step {state.step}; run the stage again to resume from the "
        f"checkpoint{f' in {store.path}' if store else ''}"
    )


def _score_epoch(
    state: LoopState,
    eval_net: nn.Module,
    data: TrainData | StreamedTrainData,
    params: TrainParams,
    device: torch.device,
    dist: DistInfo,
) -> dict[str, float]:
    """The epoch's history row: the mean train loss over all ranks, val loss and accuracy."""
    # .item() syncs with the device once per epoch, not once per batch.
    train_loss = distributed.sum_all(state.loss_sum, dist).item() / (state.rows * dist.world_size)
    check_finite(train_loss, "train loss", state.epoch, params)
    val_loss, val_acc = evaluate_split(eval_net, data.X_val, data.y_val, device, params.precision)
    check_finite(val_loss, "validation loss", state.epoch, params)
    return {
        "epoch": state.epoch,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_accuracy": val_acc,
    }


def _keep_best(state: LoopState, network: nn.Module, val_loss: float) -> None:
    if val_loss < state.best_val:
        # Copy to CPU: the next optimizer step would otherwise overwrite the best.
        state.best_state = {
            k: v.detach().to("cpu", copy=True) for k, v in network.state_dict().items()
        }
        state.best_epoch, state.best_val, state.since_best = state.epoch, val_loss, 0
    else:
        state.since_best += 1


def _report_epoch(bar: tqdm, row: dict[str, float], best_epoch: int, dist: DistInfo) -> None:
    bar.set_postfix(
        train_loss=f"{row['train_loss']:.4f}",
        val_loss=f"{row['val_loss']:.4f}",
        val_acc=f"{row['val_accuracy']:.3f}",
        best=best_epoch,
        refresh=False,
    )
    bar.update()
    if bar.disable and dist.is_main and (row["epoch"] == 1 or row["epoch"] % 10 == 0):
        logger.info(
            "epoch %d: train_loss %.4f val_loss %.4f val_accuracy %.3f",
            row["epoch"],
            row["train_loss"],
            row["val_loss"],
            row["val_accuracy"],
        )


def _finish(state: LoopState, params: TrainParams, dist: DistInfo) -> TrainResult:
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
