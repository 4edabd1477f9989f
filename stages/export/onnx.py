"""Export the network to ONNX (float32) and quantize it to int8.

``torch.onnx.export`` (the torch.export-based exporter) writes the graph with a dynamic batch
axis and the softmax inside, so onnxruntime returns probabilities. onnxruntime's dynamic
quantization makes the int8 copy: int8 weights, activations quantized per batch at run time
(no calibration data needed).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from model.files import PREPROCESSOR_FILE
from model.variants import INPUT_NAME, ONNX_FILES, OUTPUT_NAME

if TYPE_CHECKING:
    import torch

OPSET = 18  # the torch.export-based exporter's own opset (params export.opset)
NOISY_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")  # per-pass chatter, torchvision notes


def _with_softmax(module: torch.nn.Module) -> torch.nn.Module:
    from torch import nn

    # Softmax in the graph: the service gets probabilities straight out of onnxruntime.
    return nn.Sequential(module, nn.Softmax(dim=1)).eval()


def _drop_quantizer_chatter(record: logging.LogRecord) -> bool:
    # onnxruntime's quantizer logs on the root logger: a "pre-process first" hint (it only
    # speeds up calibration, which dynamic quantization has none of) and one line per tensor.
    return record.name != "root" or record.levelno > logging.WARNING


@contextmanager
def _quiet() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    root = logging.getLogger()
    root.addFilter(_drop_quantizer_chatter)
    try:
        yield
    finally:
        root.removeFilter(_drop_quantizer_chatter)
        for lg, level in zip(loggers, levels, strict=False):
            lg.setLevel(level)


def export_onnx(
    module: torch.nn.Module, n_features: int, path: str | Path, opset: int = OPSET
) -> Path:
    """Export ``module`` (float32 rows -> logits) to ONNX with a dynamic batch axis.

    The graph's output is the softmax of the logits, named ``proba``.
    """
    import onnx
    import torch

    path = Path(path)
    batch = torch.export.Dim("batch")
    example = torch.zeros(2, n_features)  # size 1 would be specialised away by torch.export
    with _quiet():
        program = torch.onnx.export(
            _with_softmax(module),
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    proto = program.model_proto
    # Shapes recorded for the weights go stale when the quantizer transposes them: drop them,
    # onnxruntime infers every shape again when it loads the graph.
    del proto.graph.value_info[:]
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def quantize_int8(source: str | Path, dest: str | Path, per_channel: bool = True) -> Path:
    """Dynamic int8 quantization: int8 weights, activations quantized per call, float I/O.

    ``per_channel`` keeps one scale per output unit: small layers lose much less accuracy.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(
            Path(source), Path(dest), weight_type=QuantType.QInt8, per_channel=per_channel
        )
    return Path(dest)


def build_variants(
    preprocessor_path: str | Path,
    network_path: str | Path,
    folder: str | Path,
    opset: int = OPSET,
    per_channel: bool = True,
) -> Path:
    """Write ``model.onnx``, ``model.int8.onnx`` and a copy of the preprocessor to ``folder``."""
    from model.nets import load_network

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    module, checkpoint = load_network(network_path)
    export_onnx(module, checkpoint["n_features"], folder / ONNX_FILES["onnx"], opset)
    quantize_int8(folder / ONNX_FILES["onnx"], folder / ONNX_FILES["int8"], per_channel)
    shutil.copy2(preprocessor_path, folder / PREPROCESSOR_FILE)
    return folder
