"""Structured pruning: whole hidden neurons (mlp) or conv channels (cnn) removed, so the network
really is smaller (fewer weights to store and to multiply), then fine-tuned.

Unstructured pruning (zeroing single weights) would leave every tensor its size: no smaller
file and no faster dense kernels. Here each hidden layer keeps the ``1 - prune_fraction`` share
of its units with the largest L1 norm of incoming weights (a unit whose weights are small
contributes little), and the next layer loses the matching input columns. The result is a
network of the same family with narrower layers: ``train_params`` ``hidden_sizes`` or
``channels`` say the new widths, so ``model.nets.load_network`` rebuilds it like any model.pt.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.nets import build_network
from stages.compress.fit import FitConfig, checkpoint, fit_network, label_loss

PRUNABLE = {"mlp": "hidden_sizes", "cnn": "channels"}  # family -> the train_params widths


def prunable_reason(family: str) -> str | None:
    """Why structured pruning does not apply to ``family``, or None when it does."""
    if family in PRUNABLE:
        return None
    if family in ("transformer", "rnn"):
        return (
            f"structured pruning covers mlp hidden units and cnn channels; a {family}'s "
            "attention heads and recurrent units are not pruned here"
        )
    return f"structured pruning needs a network (mlp or cnn); the parent is {family!r}"


def _chain(module: nn.Module) -> list[nn.Module]:
    """The layers whose widths pruning changes, in order: each Linear (mlp) or each Conv2d
    then the head's Linear (cnn); the last one is the output layer, never pruned."""
    return [m for m in module.modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def kept_units(weight: torch.Tensor, fraction: float) -> torch.Tensor:
    """Sorted indices of the output units to keep: the largest L1 norms of incoming weights
    (over inputs and kernel positions), at least one unit."""
    keep = max(1, math.ceil(weight.shape[0] * (1 - fraction)))
    norms = weight.detach().abs().reshape(weight.shape[0], -1).sum(dim=1)
    # stable: equal norms keep the earlier unit, so the result does not depend on the sort
    order = torch.argsort(norms, descending=True, stable=True)
    return torch.sort(order[:keep]).values


def prune_network(
    module: nn.Module,
    train_params: dict[str, Any],
    n_features: int,
    n_classes: int,
    fraction: float,
) -> tuple[nn.Module, dict[str, Any]]:
    """A narrower copy of ``module`` (mlp or cnn) and its train params.

    Each hidden layer keeps its strongest ``1 - fraction`` units (:func:`kept_units`); the next
    layer keeps the matching inputs. Returns the new network (eval mode) and ``train_params``
    with the new widths.
    """
    field = PRUNABLE[train_params["model"]]
    layers = _chain(module)
    weights = [layer.weight.detach().clone() for layer in layers]
    biases = [layer.bias.detach().clone() for layer in layers]
    widths = []
    for i in range(len(layers) - 1):
        keep = kept_units(weights[i], fraction)
        weights[i], biases[i] = weights[i][keep], biases[i][keep]
        weights[i + 1] = weights[i + 1][:, keep]
        widths.append(len(keep))
    spec = {**train_params, field: widths}
    pruned = build_network(spec, n_features, n_classes)
    with torch.no_grad():
        for layer, weight, bias in zip(_chain(pruned), weights, biases, strict=True):
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    return pruned.eval(), spec


def prune(
    parent_path: Path,
    data: Any,
    fraction: float,
    config: FitConfig,
    out_path: Path,
    compress_meta: dict[str, Any],
) -> dict[str, Any]:
    """Prune the network in ``parent_path``, fine-tune it on train (early stopping on val) and
    save it as ``out_path`` (a model.pt).

    Returns:
        What the report records: widths before and after, parameters before and after,
        the fine-tuning's best epoch and val loss.
    """
    from model.nets import load_network

    module, meta = load_network(parent_path)
    params = meta["train_params"]
    field = PRUNABLE[params["model"]]
    pruned, spec = prune_network(module, params, meta["n_features"], meta["n_classes"], fraction)
    result = fit_network(
        pruned, (data.train.X, data.train.y), (data.val.X, data.val.y), label_loss, config
    )
    saved = checkpoint(pruned, spec, meta["n_features"], meta["n_classes"], result, compress_meta)
    torch.save(saved, out_path)
    return {
        "widths": {"parent": list(params[field]), "pruned": list(spec[field])},
        "parameters": {"parent": _count(module), "pruned": _count(pruned)},
        "finetune": {
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "val_loss": result.best_val_loss,
        },
    }


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
