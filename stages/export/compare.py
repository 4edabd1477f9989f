"""Score the ONNX variants against the float network: accuracy, its drop, the largest
probability gap, file size and latency (the network alone, and the preprocessor before it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from model.files import PREPROCESSOR_FILE
from model.variants import INPUT_NAME, ONNX_FILES, OUTPUT_NAME, open_session
from stages.common.latency import BATCH_SIZE, row_and_batch_ms

if TYPE_CHECKING:
    import onnxruntime
    import pandas as pd

ROW_REPEATS, BATCH_REPEATS = 200, 50  # latency: median over this many calls (params export.*)


def latencies(
    name: str, call: Callable[[Any], Any], rows: Any, repeats: tuple[int, int]
) -> dict[str, float]:
    """``variant.<name>.latency_ms_row`` and ``_batch64``: median ms of one row, of 64 rows."""
    row_ms, batch_ms = row_and_batch_ms(call, rows, repeats)
    return {
        f"variant.{name}.latency_ms_row": row_ms,
        f"variant.{name}.latency_ms_batch{BATCH_SIZE}": batch_ms,
    }


def compare_variants(
    runners: dict[str, Callable[[np.ndarray], np.ndarray]],
    X: np.ndarray,
    labels: np.ndarray,
    reference: str = "torch",
    repeats: tuple[int, int] = (ROW_REPEATS, BATCH_REPEATS),
) -> dict[str, float]:
    """Accuracy, drop vs ``reference``, largest probability gap and latency of each network.

    Args:
        runners: name -> function from preprocessed rows ``(n, n_features)`` float32 to class
            probabilities ``(n, n_classes)``.
        X: the preprocessed test rows; labels: their class ids.
        reference: the runner the others are compared with (the float network).
        repeats: how many calls the single-row and the batch-of-64 medians are taken over.

    Returns:
        ``{"variant.<name>.<metric>": value}`` with metrics ``accuracy``, ``accuracy_drop``
        (reference accuracy minus this one's; positive = worse), ``max_proba_diff``,
        ``latency_ms_row`` and ``latency_ms_batch64`` (the network alone, preprocessing not
        included: it is the same for every variant).
    """
    probas = {name: np.asarray(run(X), dtype=np.float64) for name, run in runners.items()}
    accuracy = {
        name: float((proba.argmax(axis=1) == labels).mean()) for name, proba in probas.items()
    }
    metrics: dict[str, float] = {}
    for name, run in runners.items():
        metrics |= {
            f"variant.{name}.accuracy": accuracy[name],
            f"variant.{name}.accuracy_drop": accuracy[reference] - accuracy[name],
            f"variant.{name}.max_proba_diff": float(np.abs(probas[name] - probas[reference]).max()),
            **latencies(name, run, X, repeats),
        }
    return metrics


def _session_runner(session: onnxruntime.InferenceSession) -> Callable[[np.ndarray], np.ndarray]:
    return lambda X: session.run([OUTPUT_NAME], {INPUT_NAME: X})[0]


def evaluate_variants(
    folder: str | Path,
    network_path: str | Path,
    test: pd.DataFrame,
    repeats: tuple[int, int] = (ROW_REPEATS, BATCH_REPEATS),
) -> dict[str, float]:
    """Score the float network (torch, as the pyfunc runs it) and both ONNX variants on ``test``.

    Returns:
        :func:`compare_variants`' metrics, ``variant.<name>.size_bytes`` of each file, and
        ``variant.preprocess.latency_ms_row``/``_batch64``: the fitted preprocessor, which
        every variant runs first.
    """
    import torch

    from model.nets import load_network, predict_proba
    from model.preprocess import load_preprocessor

    folder = Path(folder)
    preprocessor = load_preprocessor(folder / PREPROCESSOR_FILE)
    module, _ = load_network(network_path)
    runners = {
        "torch": lambda X: predict_proba(module, X, torch.device("cpu")),
        **{name: _session_runner(open_session(folder / file)) for name, file in ONNX_FILES.items()},
    }
    rows = test[preprocessor.feature_columns]
    X = preprocessor.transform(rows)
    metrics = compare_variants(
        runners, X, preprocessor.encode_labels(test[preprocessor.target]), repeats=repeats
    )
    metrics |= latencies("preprocess", preprocessor.transform, rows, repeats)
    metrics["variant.torch.size_bytes"] = float(Path(network_path).stat().st_size)
    for name, file in ONNX_FILES.items():
        metrics[f"variant.{name}.size_bytes"] = float((folder / file).stat().st_size)
    return metrics
