"""int8 quantization: the parent network exported to ONNX and quantized, saved as one model file
(``model.int8.onnx``, its meta inside: ``model.onnx_model``) that serves without torch.

Dynamic quantization (weights int8, activations quantized per call) for mlp, transformer and
rnn: their work is matrix products, which onnxruntime runs in int8 with no calibration. A CNN's
work is convolutions, whose activations dynamic quantization leaves in float: it gets static
quantization, the activation scales fixed from ``calibration_rows`` train rows (never test).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from model.onnx_model import save_onnx_model
from stages.common.onnx_export import export_onnx, quantize_int8, quantize_static_int8

DYNAMIC, STATIC = "dynamic", "static"
MODES = {"mlp": DYNAMIC, "transformer": DYNAMIC, "rnn": DYNAMIC, "cnn": STATIC}


def quantizable_reason(family: str) -> str | None:
    """Why int8 ONNX does not apply to ``family``, or None when it does."""
    if family in MODES:
        return None
    if family == "gbdt":
        return (
            "model family gbdt (HistGradientBoosting trees) has no ONNX export here (no "
            "scikit-learn-to-ONNX converter is installed), so no int8 copy"
        )
    if family == "ensemble":
        return (
            "the parent is an ensemble: several models fused in numpy, not one ONNX graph; "
            "distill shrinks it into one student instead"
        )
    return f"int8 ONNX covers the networks (mlp, cnn, transformer, rnn), not a {family} model"


def calibration_rows(X_train: np.ndarray, n_rows: int, seed: int) -> np.ndarray:
    """``n_rows`` train rows drawn without replacement (all of them when fewer), seeded."""
    if len(X_train) <= n_rows:
        return X_train
    picked = np.random.default_rng(seed).choice(len(X_train), size=n_rows, replace=False)
    return X_train[np.sort(picked)]


def quantize(
    parent_path: Path,
    X_train: np.ndarray,
    n_calibration: int,
    seed: int,
    out_path: Path,
    compress_meta: dict[str, Any],
) -> dict[str, Any]:
    """Export the network in ``parent_path`` to ONNX, quantize it to int8, save ``out_path``.

    Returns:
        What the report records: the mode (dynamic or static) and, for static, the
        calibration rows used.
    """
    from model.nets import load_network

    module, meta = load_network(parent_path)
    family = meta["train_params"].get("model", "mlp")
    mode = MODES[family]
    details: dict[str, Any] = {"mode": mode}
    with tempfile.TemporaryDirectory(prefix="compress-onnx-") as tmp:
        float_path = export_onnx(module, meta["n_features"], Path(tmp) / "model.onnx")
        int8_path = Path(tmp) / "model.int8.onnx"
        if mode == STATIC:
            rows = calibration_rows(X_train, n_calibration, seed)
            quantize_static_int8(float_path, int8_path, rows)
            details["calibration_rows"] = len(rows)
        else:
            quantize_int8(float_path, int8_path)
        onnx_meta = {
            "n_features": int(meta["n_features"]),
            "n_classes": int(meta["n_classes"]),
            "train_params": meta["train_params"],
            "epoch": meta.get("epoch"),
            "val_loss": meta.get("val_loss"),
            "compress": {**compress_meta, "quantization": mode, **details},
        }
        save_onnx_model(int8_path, onnx_meta, out_path)
    return details
