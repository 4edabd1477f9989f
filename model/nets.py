"""The networks (an MLP for tables, a small CNN for images) and how to run them.

Shared by train (builds and fits), evaluate and the served model (load and predict).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.errors import ConfigError, DataError


class MLP(nn.Module):
    """Linear -> ReLU -> Dropout per hidden width, then a linear layer to class logits."""

    def __init__(
        self, n_features: int, n_classes: int, hidden_sizes: list[int], dropout: float
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, n_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class CNN(nn.Module):
    """Conv(3x3) -> ReLU (-> 2x2 max-pool while the map is at least 2x2) per channel width,
    then global average pooling, dropout and a linear layer to class logits.

    Takes the same flat ``(n, C*H*W)`` rows as the MLP and reshapes them to ``image_shape``.
    """

    def __init__(
        self, image_shape: list[int], n_classes: int, channels: list[int], dropout: float
    ) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        in_ch, height, width = self.image_shape
        blocks: list[nn.Module] = []
        for out_ch in channels:
            blocks += [nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1), nn.ReLU()]
            if height >= 2 and width >= 2:
                blocks.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(in_ch, n_classes)
        )
        self.channels_last = False  # set by use_channels_last(); not part of the weights

    def use_channels_last(self) -> CNN:
        """Switch weights and inputs to NHWC, the layout cuDNN's tensor-core kernels want."""
        self.channels_last = True
        return self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.reshape(-1, *self.image_shape)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.head(self.features(images))


def build_network(spec: Mapping[str, Any] | Any, n_features: int, n_classes: int) -> nn.Module:
    """A fresh network for ``spec`` (weights from torch's current RNG state).

    Args:
        spec: the architecture fields of params ``train`` (``model``, ``hidden_sizes``,
            ``channels``, ``image_shape``, ``dropout``) as a mapping (train saves them in the
            checkpoint) or as the params object itself (anything with ``model_dump()``).

    Raises:
        ConfigError: the CNN's ``image_shape`` does not hold ``n_features`` values.
    """
    if hasattr(spec, "model_dump"):
        spec = spec.model_dump()
    if spec["model"] == "mlp":
        return MLP(n_features, n_classes, spec["hidden_sizes"], spec["dropout"])
    shape = list(spec.get("image_shape") or [])
    if math.prod(shape) != n_features:
        raise ConfigError(
            f"train.image_shape {shape} holds {math.prod(shape)} values but the "
            f"features have {n_features} columns"
        )
    return CNN(shape, n_classes, spec["channels"], spec["dropout"])


def load_network(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network saved by train; returns (module in eval mode on CPU, checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            "model checkpoint not found; run the train stage first", file=str(path), rule="exists"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise DataError(
            f"not a readable checkpoint: {exc}", file=str(path), rule="checkpoint"
        ) from exc
    module = build_network(
        checkpoint["train_params"], checkpoint["n_features"], checkpoint["n_classes"]
    )
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval(), checkpoint


def select_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu``/``cuda`` as asked.

    Raises:
        ConfigError: ``cuda`` was asked for on a machine without CUDA, or an unknown name.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "base.device: 'cuda' requested but CUDA is not available (use 'auto' or 'cpu')"
        )
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"base.device: unknown device {name!r} (auto | cpu | cuda)")
    return torch.device(name)


def predict_proba(
    module: nn.Module, X: np.ndarray, device: torch.device, batch_size: int = 1024
) -> np.ndarray:
    """Class probabilities ``(n, n_classes)`` as float64 (softmax in float32, no autocast)."""
    module = module.to(device).eval()
    batches = []
    with torch.inference_mode():
        for start in range(0, len(X), batch_size):
            xb = torch.as_tensor(X[start : start + batch_size], dtype=torch.float32, device=device)
            batches.append(torch.softmax(module(xb).float(), dim=1).cpu())
    if not batches:
        n_classes = _n_outputs(module)
        return np.zeros((0, n_classes), dtype=np.float64)
    return torch.cat(batches).numpy().astype(np.float64)


def _n_outputs(module: nn.Module) -> int:
    last = [m for m in module.modules() if isinstance(m, nn.Linear)][-1]
    return last.out_features
