"""Building blocks of the training loop: precision, optimizer, LR schedule, model wrapping,
the parts one step updates (``LoopParts``), the step itself and scoring a split."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stages.common.config import TrainParams
from stages.common.errors import ConfigError, PipelineError
from stages.train.augment import ImageAugmenter
from stages.train.distributed import DistInfo

EVAL_BATCH = 4096  # rows per forward pass when scoring the validation split


@dataclass(frozen=True)
class Precision:
    """Autocast dtype (None = fp32) and whether fp16 needs a gradient scaler."""

    dtype: torch.dtype | None
    scaler: bool = False

    def autocast(self, device: torch.device) -> AbstractContextManager:
        if self.dtype is None:  # a disabled torch.autocast still costs ~3 us per step
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


def resolve_precision(name: str, device: torch.device) -> Precision:
    """``train.precision`` for this device (auto = bf16 on CUDA, fp32 on CPU).

    Raises:
        ConfigError: fp16 without CUDA (its grad scaler is a CUDA feature here).
    """
    if name == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"train.precision: fp16 needs CUDA (training on {device}); use bf16 or fp32 on CPU"
        )
    if name == "auto":
        # bf16 only on CUDA: CPU autocast is slow for small nets and would break bit-exact reruns
        name = "bf16" if device.type == "cuda" else "fp32"
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    return Precision(dtypes[name], scaler=name == "fp16")


def oom_message(batch_size: int, device: torch.device) -> str:
    """What to do when the device ran out of memory during training."""
    return (
        f"{device} ran out of memory while training with train.batch_size={batch_size}: "
        f"lower train.batch_size (e.g. to {max(1, batch_size // 2)}), or set "
        "train.data_on_device: never to stream the training data instead of keeping it "
        "on the device"
    )


def build_optimizer(params: TrainParams, parameters: Any) -> torch.optim.Optimizer:
    """AdamW or SGD (with momentum) at ``train.lr`` and ``train.weight_decay``."""
    if params.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay
        )
    return torch.optim.AdamW(parameters, lr=params.lr, weight_decay=params.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, params: TrainParams, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A per-step LR schedule over ``max_epochs`` (None for a constant LR)."""
    total = params.max_epochs * steps_per_epoch
    if params.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if params.lr_schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=params.lr, total_steps=total)
    return None


def wrap_model(
    network: nn.Module, params: TrainParams, device: torch.device, dist: DistInfo
) -> nn.Module:
    """channels_last for the CNN on CUDA, then DDP, then torch.compile (in that order)."""
    if params.model == "cnn" and params.channels_last and device.type == "cuda":
        network.use_channels_last()
    model = network
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None
        )
    return torch.compile(model) if params.compile else model


def build_augmenter(params: TrainParams, device: torch.device) -> ImageAugmenter | None:
    """The CNN's on-device augmentation, or None when ``train`` asks for none."""
    if not params.augments:
        return None
    return ImageAugmenter(
        params.image_shape,
        params.augment_crop_pad,
        params.augment_flip,
        params.augment_noise,
        params.augment_seed,
        device,
    )


@dataclass
class LoopParts:
    """What a training step updates and a resume checkpoint restores."""

    network: nn.Module  # the bare network: its weights are saved and scored
    model: nn.Module  # what the step calls: ``network`` wrapped (DDP, torch.compile) or itself
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler | None  # fp16 only
    augment: ImageAugmenter | None
    shuffle: torch.Generator  # the batch order: a CPU generator, the same on any device

    @property
    def augment_generator(self) -> torch.Generator | None:
        return self.augment.generator if self.augment is not None else None


def build_loop_parts(
    network: nn.Module,
    params: TrainParams,
    device: torch.device,
    dist: DistInfo,
    precision: Precision,
    steps_per_epoch: int,
    seed: int,
) -> LoopParts:
    """Wrap ``network``; build its optimizer, LR schedule, grad scaler, augmenter, batch order."""
    model = wrap_model(network, params, device, dist)
    optimizer = build_optimizer(params, network.parameters())
    scheduler = build_scheduler(optimizer, params, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type) if precision.scaler else None
    augment = build_augmenter(params, device)
    shuffle = torch.Generator().manual_seed(seed)
    return LoopParts(network, model, optimizer, scheduler, scaler, augment, shuffle)


def train_step(
    parts: LoopParts,
    xb: torch.Tensor,
    yb: torch.Tensor,
    precision: Precision,
    device: torch.device,
    max_grad_norm: float,
) -> torch.Tensor:
    """One optimizer step on one batch; returns the batch's mean loss (on the device)."""
    if parts.augment is not None:
        xb = parts.augment(xb)
    with precision.autocast(device):
        logits = parts.model(xb)
    loss = F.cross_entropy(logits.float(), yb)  # the loss in float32
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.scaler is not None:
        parts.scaler.scale(loss).backward()
        parts.scaler.unscale_(parts.optimizer)  # clip true gradients, not scaled ones
    else:
        loss.backward()
    if max_grad_norm:
        nn.utils.clip_grad_norm_(parts.network.parameters(), max_grad_norm)
    if parts.scaler is not None:
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
    else:
        parts.optimizer.step()
    if parts.scheduler is not None:
        parts.scheduler.step()
    return loss


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


def check_finite(value: float, what: str, epoch: int, params: TrainParams) -> None:
    """Raise PipelineError (with what to do) when a loss became NaN or inf."""
    if not math.isfinite(value):
        raise PipelineError(
            f"{what} is {value} at epoch {epoch}: training diverged (train.lr={params.lr}); "
            "lower train.lr or check the features for NaN/inf values"
        )
