"""Build export's variants: the network exported to ONNX (float32) and quantized to int8, with
a copy of the fitted preprocessor beside them.

The export and quantization themselves live in :mod:`stages.common.onnx_export` (compress makes
its int8 candidate with the same code); ``export_onnx``, ``quantize_int8`` and ``OPSET`` are
re-exported here for the callers that import them from this module.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from model.files import PREPROCESSOR_FILE
from model.variants import ONNX_FILES
from stages.common.onnx_export import OPSET, export_onnx, quantize_int8

__all__ = ["OPSET", "build_variants", "export_onnx", "quantize_int8"]


def build_variants(
    preprocessor_path: str | Path,
    network_path: str | Path,
    folder: str | Path,
    opset: int = OPSET,
    per_channel: bool = True,
) -> Path:
    """Write ``model.onnx``, ``model.int8.onnx`` and a copy of the preprocessor to ``folder``.

    The int8 copy is quantized dynamically (int8 weights, activations per call): no
    calibration data, whatever the family.
    """
    from model.nets import load_network

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    module, checkpoint = load_network(network_path)
    export_onnx(module, checkpoint["n_features"], folder / ONNX_FILES["onnx"], opset)
    quantize_int8(folder / ONNX_FILES["onnx"], folder / ONNX_FILES["int8"], per_channel)
    shutil.copy2(preprocessor_path, folder / PREPROCESSOR_FILE)
    return folder
