"""The networks and how to run them: an MLP or an FT-Transformer for tables, a small CNN for
images, a sequence net (GRU, LSTM or attention) for rows that are windows of a series.

Shared by train (builds and fits), evaluate and the served model (load and predict).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
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
        self.n_classes = n_classes
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
        self.n_classes = n_classes
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


class FTTransformer(nn.Module):
    """FT-Transformer for tables: one token per feature, a [CLS] token, pre-norm attention
    blocks, and the class logits read from the [CLS] token.

    Each feature ``j`` becomes the token ``x_j * W_j + b_j`` (a weight and a bias vector of
    width ``d_token`` per feature), so attention mixes features, not positions.
    """

    def __init__(
        self,
        n_features: int,
        n_classes: int,
        d_token: int,
        n_blocks: int,
        n_heads: int,
        ffn_factor: float,
        dropout: float,
    ) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.weight = nn.Parameter(torch.empty(n_features, d_token))
        self.bias = nn.Parameter(torch.empty(n_features, d_token))
        self.cls = nn.Parameter(torch.empty(1, 1, d_token))
        bound = 1 / math.sqrt(d_token)  # the FT-Transformer paper's tokenizer init
        for tensor in (self.weight, self.bias, self.cls):
            nn.init.uniform_(tensor, -bound, bound)
        self.blocks = _encoder(d_token, n_heads, round(ffn_factor * d_token), dropout, n_blocks)
        self.head = nn.Sequential(nn.LayerNorm(d_token), nn.ReLU(), nn.Linear(d_token, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.unsqueeze(-1) * self.weight + self.bias  # (n, F, d_token)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        return self.head(self.blocks(tokens)[:, 0])


class SequenceNet(nn.Module):
    """A sequence encoder for rows that are windows of a series.

    A flat row ``(T*F,)`` holds ``T`` steps of ``F`` values, step 0's columns first; it is read
    as ``(T, F)``. ``cell`` gru/lstm: a recurrent net, logits from its state after the last
    step. ``cell`` transformer: each step projected to ``hidden_size`` plus a learned position
    embedding, pre-norm attention blocks, logits from the mean over the steps.
    """

    def __init__(
        self,
        sequence_length: int,
        step_features: int,
        n_classes: int,
        cell: str,
        hidden_size: int,
        num_layers: int,
        n_heads: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.sequence_length, self.step_features, self.cell = sequence_length, step_features, cell
        if cell == "transformer":
            self.embed = nn.Linear(step_features, hidden_size)
            self.position = nn.Parameter(torch.zeros(1, sequence_length, hidden_size))
            nn.init.normal_(self.position, std=0.02)
            self.encoder = _encoder(hidden_size, n_heads, 2 * hidden_size, dropout, num_layers)
            self.norm = nn.LayerNorm(hidden_size)
        else:
            rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[cell]
            self.encoder = rnn(
                step_features,
                hidden_size,
                num_layers=num_layers,
                batch_first=True,
                dropout=dropout if num_layers > 1 else 0.0,  # between stacked layers only
            )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_size, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = x.reshape(-1, self.sequence_length, self.step_features)
        if self.cell == "transformer":
            states = self.encoder(self.embed(steps) + self.position)
            return self.head(self.norm(states.mean(dim=1)))
        outputs, _ = self.encoder(steps)
        return self.head(outputs[:, -1])


def _encoder(width: int, n_heads: int, ffn: int, dropout: float, n_blocks: int) -> nn.Module:
    """``n_blocks`` pre-norm self-attention blocks over ``(n, tokens, width)``."""
    block = nn.TransformerEncoderLayer(
        width, n_heads, ffn, dropout, activation="gelu", batch_first=True, norm_first=True
    )
    # no nested tensors: every row has the same number of tokens, and no padding mask
    return nn.TransformerEncoder(block, n_blocks, enable_nested_tensor=False)


def build_network(spec: Mapping[str, Any] | Any, n_features: int, n_classes: int) -> nn.Module:
    """A fresh network for ``spec`` (weights from torch's current RNG state).

    Args:
        spec: params ``train`` (``model``, ``dropout`` and the chosen family's fields:
            ``hidden_sizes``; ``channels`` + ``image_shape``; the ``transformer`` or ``rnn``
            section) as a mapping (train saves it in the checkpoint; one written before the
            transformer/rnn families has no such sections, and needs none) or as the params
            object itself (anything with ``model_dump()``).

    Raises:
        ConfigError: the CNN's ``image_shape`` does not hold ``n_features`` values, the
            features do not split into ``rnn.sequence_length`` equal steps, the family's
            section is missing, or ``model`` names no network (gbdt).
    """
    if hasattr(spec, "model_dump"):
        spec = spec.model_dump()
    family, dropout = spec["model"], spec["dropout"]
    if family == "mlp":
        return MLP(n_features, n_classes, spec["hidden_sizes"], dropout)
    if family == "cnn":
        shape = list(spec.get("image_shape") or [])
        if math.prod(shape) != n_features:
            raise ConfigError(
                f"train.image_shape {shape} holds {math.prod(shape)} values but the "
                f"features have {n_features} columns"
            )
        return CNN(shape, n_classes, spec["channels"], dropout)
    if family == "transformer":
        t = _section(spec, "transformer")
        return FTTransformer(
            n_features,
            n_classes,
            t["d_token"],
            t["n_blocks"],
            t["n_heads"],
            t["ffn_factor"],
            dropout,
        )
    if family == "rnn":
        r = _section(spec, "rnn")
        steps = r["sequence_length"]
        if not steps or n_features % steps:
            raise ConfigError(
                f"rnn.sequence_length {steps}: the features' {n_features} columns do not split "
                "into that many steps of equal width"
            )
        return SequenceNet(
            steps,
            n_features // steps,
            n_classes,
            r["cell"],
            r["hidden_size"],
            r["num_layers"],
            r["n_heads"],
            dropout,
        )
    raise ConfigError(f"train.model {family!r} is no network (mlp | cnn | transformer | rnn)")


def _section(spec: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    section = spec.get(name)
    if not isinstance(section, Mapping):
        raise ConfigError(f"train.model {name!r} needs the train.{name} section; it is missing")
    return section


def sequence_steps(columns: Sequence[str], sequence_length: int | None) -> list[list[str]]:
    """The feature columns as the sequence net reads them: ``sequence_length`` steps of equal
    width, in column order (step 0's columns first).

    Raises:
        ConfigError: no ``sequence_length``, or the columns do not split evenly (the message
            names the columns).
    """
    n = len(columns)
    if not sequence_length:
        raise ConfigError("model 'rnn' needs rnn.sequence_length: the steps in each row's window")
    if n % sequence_length:
        shown = ", ".join(columns[:12]) + (", ..." if n > 12 else "")
        raise ConfigError(
            f"rnn.sequence_length {sequence_length}: the {n} feature columns ({shown}) do not "
            f"split into {sequence_length} steps of equal width ({n} % {sequence_length} = "
            f"{n % sequence_length}); a window row holds the same columns for every step, "
            "step 0's first"
        )
    width = n // sequence_length
    return [list(columns[i * width : (i + 1) * width]) for i in range(sequence_length)]


def unlike_steps(steps: Sequence[Sequence[str]]) -> list[int]:
    """Steps whose column names, digits aside, differ from step 0's, position by position
    (``rain_t0, temp_t0 | rain_t1, temp_t1`` match): a hint that the columns are not in
    step-major order, e.g. one-hot columns moved behind the numeric ones."""
    masked = [[re.sub(r"\d+", "#", name) for name in step] for step in steps]
    return [i for i, step in enumerate(masked) if step != masked[0]]


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
    if hasattr(module, "n_classes"):
        return module.n_classes
    last = [m for m in module.modules() if isinstance(m, nn.Linear)][-1]
    return last.out_features
