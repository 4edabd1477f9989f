"""Knowledge distillation: a small student network trained to match the parent's class
probabilities (Hinton et al. 2015), whatever the parent is: a network, a gbdt, an ensemble.

The parent is only asked for probabilities (``predict_proba`` on its own view of the rows), so
its soft targets at temperature T are ``softmax(log p / T)``: for a network that is exactly the
softmax of its logits / T. The loss is ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha)
* CE(student, labels)``: the T^2 keeps the soft term's gradients on the scale of the hard one.
The student is an MLP (``distill_hidden_sizes``) on tables, a CNN (``distill_channels``) when
the parent reads images (``image_shape``); it is trained on train, stopped early on the same
loss on val, and saved as a normal model.pt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.nets import build_network
from stages.compress.fit import FitConfig, checkpoint, fit_network

PROBA_FLOOR = 1e-7  # log of a probability: a gbdt or a vote can give exact zeros


def student_params(
    parent_params: dict[str, Any], hidden_sizes: list[int], channels: list[int]
) -> dict[str, Any]:
    """The student's train params: a CNN when the parent reads images (a cnn, or an ensemble
    whose first member is one), else an MLP; the parent's other settings kept."""
    image = parent_params.get("model") == "cnn" and parent_params.get("image_shape")
    return {
        **parent_params,
        "model": "cnn" if image else "mlp",
        "hidden_sizes": list(hidden_sizes),
        "channels": list(channels),
        "dropout": parent_params.get("dropout", 0.1),
    }


def soft_targets(proba: np.ndarray, temperature: float) -> np.ndarray:
    """Teacher probabilities softened at ``temperature``: ``softmax(log p / T)``, float32."""
    logits = np.log(np.clip(proba, PROBA_FLOOR, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    soft = np.exp(logits)
    return (soft / soft.sum(axis=1, keepdims=True)).astype(np.float32)


def distill_loss(temperature: float, alpha: float):  # noqa: ANN201 - a closure for fit_network
    """``loss(logits, soft, y)``: the soft-target KL (times T^2) mixed with the label loss."""

    def loss(logits: torch.Tensor, soft: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        student = nn.functional.log_softmax(logits / temperature, dim=1)
        kl = nn.functional.kl_div(student, soft, reduction="batchmean")
        hard = nn.functional.cross_entropy(logits, y)
        return alpha * temperature**2 * kl + (1 - alpha) * hard

    return loss


def teacher_proba(parent: Any, split: Any) -> np.ndarray:
    """The parent's probabilities on a split, on its own view of the rows (any family)."""
    return parent.predict_proba(
        split.view(lambda frame: parent.features(split.preprocessor, frame))
    )


def distill(
    parent: Any,
    data: Any,
    cp: Any,
    config: FitConfig,
    out_path: Path,
    compress_meta: dict[str, Any],
) -> dict[str, Any]:
    """Train a student on the parent's soft targets and the labels; save it as ``out_path``.

    Args:
        parent: the loaded parent (``model.predictors.load_predictor``), on the CPU.
        cp: params ``compress`` (student widths, temperature, distill_alpha).

    Returns:
        What the report records: the student's train params (model and widths), its
        parameter count, the best epoch and its val loss.
    """
    spec = student_params(
        parent.meta.get("train_params") or {}, cp.distill_hidden_sizes, cp.distill_channels
    )
    n_features, n_classes = data.train.X.shape[1], parent.n_classes
    torch.manual_seed(config.seed)  # the student's initial weights
    student = build_network(spec, n_features, n_classes)
    soft = {
        name: soft_targets(teacher_proba(parent, getattr(data, name)), cp.temperature)
        for name in ("train", "val")
    }
    result = fit_network(
        student,
        (data.train.X, soft["train"], data.train.y),
        (data.val.X, soft["val"], data.val.y),
        distill_loss(cp.temperature, cp.distill_alpha),
        config,
    )
    meta = {**compress_meta, "temperature": cp.temperature, "alpha": cp.distill_alpha}
    torch.save(checkpoint(student, spec, n_features, n_classes, result, meta), out_path)
    return {
        "student": {
            "model": spec["model"],
            "hidden_sizes" if spec["model"] == "mlp" else "channels": (
                spec["hidden_sizes"] if spec["model"] == "mlp" else spec["channels"]
            ),
            "parameters": sum(p.numel() for p in student.parameters()),
        },
        "fit": {
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "val_loss": result.best_val_loss,
        },
    }
