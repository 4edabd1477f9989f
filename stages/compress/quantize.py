"""int8 quantization: the parent network exported to ONNX and quantized, saved as one model file
(``model.int8.onnx``, its meta inside: ``model.onnx_model``) that serves without torch.

Dynamic quantization (weights int8, activations quantized per call) for mlp, transformer and
rnn: their work is matrix products, which onnxruntime runs in int8 with no calibration. A CNN's
work is convolutions, whose activations dynamic quantization leaves in float: it gets static
quantization, the activation scales fixed from ``calibration_rows`` train rows (never test).

An rnn's graph is pre-processed first (constant folding): the exporter leaves the LSTM's weights
behind ops the quantizer does not follow, and it only quantizes constant weights; folded, the
LSTM becomes onnxruntime's ``DynamicQuantizeLSTM``. onnxruntime has no int8 GRU, so a GRU
parent is skipped (only its small head would become int8: a copy that is int8 in name only).
``details.int8_weight_share`` says how much of each graph's weights did become int8.

The float ONNX graph the int8 one is made from is kept aside (``float_out``) so the stage can
measure it too: the gate compares the int8 copy with the parent as it is, the details also say
what int8 itself buys over float ONNX.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from model.onnx_model import save_onnx_model
from stages.common.onnx_export import (
    export_onnx,
    int8_weight_share,
    pre_process,
    quantize_int8,
    quantize_static_int8,
)

DYNAMIC, STATIC = "dynamic", "static"
MODES = {"mlp": DYNAMIC, "transformer": DYNAMIC, "rnn": DYNAMIC, "cnn": STATIC}
FLOAT = "none (the float graph the int8 copy is made from)"  # meta "quantization" of float_out


def quantizable_reason(family: str, train_params: dict[str, Any] | None = None) -> str | None:
    """Why int8 ONNX does not apply to ``family`` (the parent's ``train_params`` for an rnn's
    cell), or None when it does."""
    if family == "rnn" and ((train_params or {}).get("rnn") or {}).get("cell", "gru") == "gru":
        return (
            "the rnn's cell is a GRU and onnxruntime has no int8 GRU kernel (only "
            "DynamicQuantizeLSTM): dynamic int8 would leave the GRU in float and quantize only "
            "the head; train.rnn.cell: lstm gets an int8 copy, prune or distill shrink a GRU"
        )
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
    float_out: Path | None = None,
) -> dict[str, Any]:
    """Export the network in ``parent_path`` to ONNX, quantize it to int8, save ``out_path``
    (and the float graph, with the same meta, at ``float_out`` when given).

    Returns:
        What the report records: the mode (dynamic or static), whether the graph was
        pre-processed, the share of weight values stored as int8 and, for static, the
        calibration rows used.
    """
    from model.nets import load_network

    module, meta = load_network(parent_path)
    family = meta["train_params"].get("model", "mlp")
    mode = MODES[family]
    details: dict[str, Any] = {"mode": mode}
    onnx_meta = {
        "n_features": int(meta["n_features"]),
        "n_classes": int(meta["n_classes"]),
        "train_params": meta["train_params"],
        "epoch": meta.get("epoch"),
        "val_loss": meta.get("val_loss"),
    }
    with tempfile.TemporaryDirectory(prefix="compress-onnx-") as tmp:
        float_path = export_onnx(module, meta["n_features"], Path(tmp) / "model.onnx")
        if float_out is not None:
            float_meta = {**onnx_meta, "compress": {**compress_meta, "quantization": FLOAT}}
            save_onnx_model(float_path, float_meta, float_out)
        source = float_path
        details["pre_processed"] = family == "rnn"
        if family == "rnn":
            source = pre_process(float_path, Path(tmp) / "model.pre.onnx")
        int8_path = Path(tmp) / "model.int8.onnx"
        if mode == STATIC:
            rows = calibration_rows(X_train, n_calibration, seed)
            quantize_static_int8(source, int8_path, rows)
            details["calibration_rows"] = len(rows)
        else:
            quantize_int8(source, int8_path)
        details["int8_weight_share"] = round(int8_weight_share(int8_path), 4)
        onnx_meta["compress"] = {**compress_meta, "quantization": mode, **details}
        save_onnx_model(int8_path, onnx_meta, out_path)
    return details


def versus_float(float_onnx: Any, int8: Any, metric: str) -> dict[str, Any]:
    """What int8 buys over the float ONNX graph (both :class:`stages.compress.measure.
    Measurement` on the same test rows): the float graph's numbers and int8's speedups and size
    ratio against it. The float graph is not kept (export ships one of train's model)."""
    tiny = 1e-12
    return {
        "float_onnx": {
            metric: float_onnx.metrics[metric],
            "size_bytes": float_onnx.size_bytes,
            "latency_ms_row": float_onnx.latency_ms_row,
            "latency_ms_batch64": float_onnx.latency_ms_batch64,
        },
        "int8_vs_float_onnx": {
            "speedup": float_onnx.latency_ms_row / max(int8.latency_ms_row, tiny),
            "speedup_batch64": float_onnx.latency_ms_batch64 / max(int8.latency_ms_batch64, tiny),
            "size_ratio": float_onnx.size_bytes / max(int8.size_bytes, 1),
        },
    }
