"""Building blocks of the training loop: precision, optimizer, LR schedule, model wrapping."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stages.common.config import TrainParams
from stages.common.errors import ConfigError
from stages.train.distributed import DistInfo


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
