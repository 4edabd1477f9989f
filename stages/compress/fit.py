"""The one small training loop compress needs: fine-tuning a pruned network and training a
distilled student.

Why not train's loop (stages/train/loop.py): no stage imports another (each stage's DVC deps
are its own package plus stages/common and model/), and distillation fits soft targets, a loss
train's loop has no place for. The networks are small and the data in memory, so this loop is
plain on purpose. What it does NOT do that train's loop does: mixed precision (fp32 only), grad
clipping, a learning-rate schedule, DDP (one process), checkpoint/resume, streamed data.

Deterministic as train is: the same seeding (``torch.manual_seed(seed)`` before the first step,
the batch order from a CPU generator seeded alike, so it is the same on any device), and on the
CPU ``torch.use_deterministic_algorithms(True)``, as ``stages.train.loop.seed_torch`` does (on
CUDA neither insists: its deterministic kernels need CUBLAS_WORKSPACE_CONFIG set beforehand), so
a re-run gives the same weights, hence the same compact file and no new registered version.
Early stopping on the validation loss: the weights of the best epoch are kept, the starting
weights counting as epoch 0 (a fine-tuning that only makes things worse returns the network as
it came).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

Loss = Callable[..., torch.Tensor]  # loss(logits, *targets of the same rows)
MIN_IMPROVEMENT = 1e-6  # a smaller drop of the val loss is no improvement (float noise)


@dataclass(frozen=True)
class FitConfig:
    """How to fit: epochs at most, early-stopping patience, AdamW, batch size, seed, device."""

    epochs: int
    patience: int
    lr: float
    weight_decay: float
    batch_size: int
    seed: int
    device: torch.device


@dataclass
class FitResult:
    """The best epoch (0: the starting weights), its val loss and the epochs run."""

    best_epoch: int
    best_val_loss: float
    epochs_run: int


def fit_config(
    train_params: dict[str, Any], epochs: int, lr: float, seed: int, device: Any
) -> FitConfig:
    """The loop's settings: epochs and lr from compress, the rest from the parent's train params
    (patience, weight decay, batch size; train's defaults when the parent has none)."""
    return FitConfig(
        epochs=epochs,
        patience=int(train_params.get("patience", 10)),
        lr=lr,
        weight_decay=float(train_params.get("weight_decay", 1e-4)),
        batch_size=int(train_params.get("batch_size", 64)),
        seed=seed,
        device=torch.device(device),
    )


@contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """torch's deterministic kernels on the CPU meanwhile (train's ``seed_torch`` rule), the
    previous setting restored after (the stage runs in-process in tests and flows)."""
    before = torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread meanwhile (restored after: tests call the stage in-process).

    The measure's fairness: onnxruntime sessions run on one thread (requests run in parallel,
    not their layers), so torch does too. And speed: these small networks gain nothing from a
    second thread, while on a busy 2-core machine two OpenMP threads waiting for each other
    made a tiny CNN's batch 50x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _tensors(arrays: tuple[np.ndarray, ...], device: torch.device) -> list[torch.Tensor]:
    return [
        torch.as_tensor(a, dtype=torch.long if a.dtype.kind in "iu" else torch.float32).to(device)
        for a in arrays
    ]


def _val_loss(module: nn.Module, val: list[torch.Tensor], loss: Loss, batch: int) -> float:
    module.eval()
    X, *targets = val
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(X), batch):
            part = slice(start, start + batch)
            value = loss(module(X[part]), *(t[part] for t in targets))
            total += float(value) * len(X[part])
    return total / max(len(X), 1)


def fit_network(
    module: nn.Module,
    train: tuple[np.ndarray, ...],
    val: tuple[np.ndarray, ...],
    loss: Loss,
    config: FitConfig,
) -> FitResult:
    """Fit ``module`` in place (it ends in eval mode, on the CPU, with the best epoch's weights).

    Args:
        train: ``(X, *targets)``: rows (float32) and what ``loss`` compares the logits with
            (class ids, soft targets...), row by row.
        val: the same for the validation split: only its loss is computed, for early stopping.
        loss: ``loss(logits, *targets) -> mean loss``, the same on both splits.
    """
    with deterministic(config.device):
        return _fit(module, train, val, loss, config)


def _fit(
    module: nn.Module,
    train: tuple[np.ndarray, ...],
    val: tuple[np.ndarray, ...],
    loss: Loss,
    config: FitConfig,
) -> FitResult:
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    module.to(config.device)
    X, *targets = _tensors(train, config.device)
    val_t = _tensors(val, config.device)
    optimizer = torch.optim.AdamW(
        module.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    best = _val_loss(module, val_t, loss, config.batch_size)
    best_state, best_epoch, waited, epoch = copy.deepcopy(module.state_dict()), 0, 0, 0
    for epoch in range(1, config.epochs + 1):
        module.train()
        order = torch.randperm(len(X), generator=generator).to(config.device)
        for start in range(0, len(X), config.batch_size):
            rows = order[start : start + config.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss(module(X[rows]), *(t[rows] for t in targets)).backward()
            optimizer.step()
        current = _val_loss(module, val_t, loss, config.batch_size)
        if current < best - MIN_IMPROVEMENT:
            best, best_epoch, waited = current, epoch, 0
            best_state = copy.deepcopy(module.state_dict())
        else:
            waited += 1
            if waited >= config.patience:
                break
    module.load_state_dict(best_state)
    module.to("cpu").eval()
    return FitResult(best_epoch, best, epoch)


def label_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the class ids (fine-tuning)."""
    return nn.functional.cross_entropy(logits, y)


def checkpoint(
    module: nn.Module,
    train_params: dict[str, Any],
    n_features: int,
    n_classes: int,
    result: FitResult,
    compress: dict[str, Any],
) -> dict[str, Any]:
    """What a compact ``model.pt`` holds: train's checkpoint keys (``load_network`` and
    ``load_predictor`` load it as any model.pt) plus ``compress``: how it was made."""
    return {
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "train_params": train_params,
        "n_features": int(n_features),
        "n_classes": int(n_classes),
        "epoch": result.best_epoch,
        "val_loss": result.best_val_loss,
        "compress": compress,
    }
