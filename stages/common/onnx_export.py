"""Export a network to ONNX and quantize it to int8: shared by export (the run's variants) and
compress (the int8 candidate of the judged model).

``torch.onnx.export`` (the torch.export-based exporter) writes the graph with a dynamic batch
axis and the softmax inside, so onnxruntime returns probabilities. onnxruntime's quantizer makes
the int8 copy, two ways:

- dynamic (:func:`quantize_int8`): int8 weights, activations quantized per call at run time; no
  calibration data. Right for MatMul-heavy graphs (mlp, transformer, rnn).
- static (:func:`quantize_static_int8`): int8 weights and activations, the activation scales
  fixed beforehand from calibration rows (QDQ format). Convolutions need it: dynamic
  quantization leaves their activations in float, so a CNN saves almost nothing.

:func:`pre_process` folds the graph first where the quantizer needs it (an LSTM's weights reach
it through ops the exporter leaves unfolded: the quantizer only quantizes constant weights), and
:func:`int8_weight_share` says how much of a graph's weights did become int8.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

OPSET = 18  # the torch.export-based exporter's own opset (params export.opset)
# The graph's input and output names: model.variants and model.onnx_model run graphs by them.
# Not imported from model.variants: every stage depends on stages/common, so an import here
# would put model.variants (and the serving code it reaches) in every stage's DVC deps; the
# export tests check the names agree.
INPUT_NAME, OUTPUT_NAME = "features", "proba"
NOISY_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")  # per-pass chatter, torchvision notes
CALIBRATION_BATCH = 64  # rows per calibration call (static int8)


def _with_softmax(module: torch.nn.Module) -> torch.nn.Module:
    from torch import nn

    # Softmax in the graph: the service gets probabilities straight out of onnxruntime.
    return nn.Sequential(module, nn.Softmax(dim=1)).eval()


def _drop_quantizer_chatter(record: logging.LogRecord) -> bool:
    # onnxruntime's quantizer logs on the root logger: a "pre-process first" hint (it only
    # speeds up calibration) and one line per tensor.
    return record.name != "root" or record.levelno > logging.WARNING


@contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporter's per-pass logs and the quantizer's root-logger hints meanwhile."""
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

    The graph's input is named ``features`` and its output, the softmax of the logits,
    ``proba`` (:data:`INPUT_NAME`, :data:`OUTPUT_NAME`).
    """
    import onnx
    import torch

    path = Path(path)
    batch = torch.export.Dim("batch")
    example = torch.zeros(2, n_features)  # size 1 would be specialised away by torch.export
    with quiet():
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

    with quiet():
        quantize_dynamic(
            Path(source), Path(dest), weight_type=QuantType.QInt8, per_channel=per_channel
        )
    return Path(dest)


def pre_process(source: str | Path, dest: str | Path) -> Path:
    """onnxruntime's quantization pre-processing: ONNX shape inference and constant folding.

    Symbolic shape inference (a further pass for dynamic shapes) is skipped: the folded
    constants are what the quantizer needs.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with quiet():
        quant_pre_process(str(source), str(dest), skip_symbolic_shape=True)
    return Path(dest)


def int8_weight_share(path: str | Path) -> float:
    """Share of the graph's weight values (tensors of 2+ dimensions: matrices, kernels, an
    LSTM's gates; biases and scales do not count) stored as 8-bit integers."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    tensors = list(graph.initializer) + [
        a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
    ]
    eight_bit = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    counts = {True: 0, False: 0}
    for tensor in tensors:
        if len(tensor.dims) >= 2:
            counts[tensor.data_type in eight_bit] += numpy_helper.to_array(tensor).size
    return counts[True] / max(counts[True] + counts[False], 1)


def quantize_static_int8(
    source: str | Path, dest: str | Path, calibration: np.ndarray, per_channel: bool = True
) -> Path:
    """Static int8 quantization (QDQ): weights and activations int8, float I/O.

    Args:
        calibration: preprocessed rows ``(n, n_features)`` (float32) run through the float
            graph to fix each activation's scale (min/max); training rows, never test rows.
    """
    import numpy as np
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    rows = np.ascontiguousarray(calibration, dtype=np.float32)
    # The softmax stays float: quantized probabilities would not sum to 1 (ROC-AUC refuses
    # them) and a 1/256 step is coarse for a probability.
    softmax = [n.name for n in onnx.load(str(source)).graph.node if n.op_type == "Softmax"]

    class _Rows(CalibrationDataReader):  # the quantizer pulls batches until None
        def __init__(self) -> None:
            self._batches = iter(
                {INPUT_NAME: rows[i : i + CALIBRATION_BATCH]}
                for i in range(0, len(rows), CALIBRATION_BATCH)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    with quiet():
        quantize_static(
            Path(source),
            Path(dest),
            _Rows(),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=softmax,
        )
    return Path(dest)
