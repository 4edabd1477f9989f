"""Smaller and faster variants of the servable model: ONNX (float32) and ONNX int8.

The register stage calls :func:`log_variants` right after it logs the pyfunc: the network is
exported to ONNX (``torch.onnx.export``, the torch.export-based exporter, batch axis dynamic,
softmax inside the graph) and quantized to int8 with onnxruntime's dynamic quantization (int8
weights, activations quantized per batch at run time: no calibration data needed). Each variant
is scored on the test split against the float network and the numbers are logged to the run as
``variant.<name>.<metric>``; the files go to the run's ``variants/`` folder with the fitted
preprocessor, so a variant serves without torch: the fitted preprocessor (its numpy fast path
for numeric inputs) feeds an onnxruntime session.

:func:`load_variant` gives the service one interface for all three: ``predict(frame)`` returns
the pyfunc's columns (``prediction`` + ``proba_<label>``).
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from model.artifacts import DEFAULT_KEY_ENV
from model.errors import DataError, PipelineError
from model.files import PREPROCESSOR_FILE

if TYPE_CHECKING:
    import onnxruntime
    import pandas as pd
    import torch

    from model.preprocess import FittedPreprocessor

logger = logging.getLogger(__name__)

Variant = Literal["pyfunc", "onnx", "int8"]
VARIANTS: tuple[str, ...] = ("pyfunc", "onnx", "int8")
ONNX_FILES = {"onnx": "model.onnx", "int8": "model.int8.onnx"}  # file per ONNX variant
ARTIFACT_DIR = "variants"  # folder in the MLflow run holding the files above
INPUT_NAME, OUTPUT_NAME = "features", "proba"  # the ONNX graph's input and output
OPSET = 18  # the torch.export-based exporter's default opset; onnxruntime 1.31 runs it
ROW_REPEATS, BATCH_REPEATS, BATCH_SIZE = 200, 50, 64  # latency: median over this many calls


class Predictor(Protocol):
    """What the service calls: raw feature rows in, the pyfunc's output columns out."""

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame: ...


# --- export and quantize --------------------------------------------------------------------


def _with_softmax(module: torch.nn.Module) -> torch.nn.Module:
    from torch import nn

    # Softmax in the graph: the service gets probabilities straight out of onnxruntime.
    return nn.Sequential(module, nn.Softmax(dim=1)).eval()


NOISY_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")  # per-pass chatter, torchvision notes


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


def export_onnx(module: torch.nn.Module, n_features: int, path: str | Path) -> Path:
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
            opset_version=OPSET,
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


def quantize_int8(source: str | Path, dest: str | Path) -> Path:
    """Dynamic int8 quantization: int8 weights, activations quantized per call, float I/O."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # per_channel keeps one scale per output unit: small layers lose much less accuracy.
    with _quiet():
        quantize_dynamic(Path(source), Path(dest), weight_type=QuantType.QInt8, per_channel=True)
    return Path(dest)


# --- run the variants -------------------------------------------------------------------------


def open_session(path: str | Path, threads: int = 1) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session; one thread: requests run in parallel, not their layers."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class OnnxScorer:
    """The fitted preprocessor feeding an ONNX session (no torch at serve time)."""

    preprocessor: FittedPreprocessor
    session: onnxruntime.InferenceSession

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Raw feature rows -> ``prediction`` + ``proba_<label>`` columns."""
        from model.servable import format_predictions

        if len(frame) == 0:  # the fitted imputers refuse an empty matrix
            proba = np.zeros((0, len(self.preprocessor.classes)))
        else:
            X = self.preprocessor.transform(frame)
            (proba,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: X})
        return format_predictions(proba.astype(np.float64), self.preprocessor.classes)


def load_onnx_scorer(folder: str | Path, variant: Variant, threads: int = 1) -> OnnxScorer:
    """Load a variant from a folder written by :func:`build_variants` (or downloaded)."""
    from model.preprocess import load_preprocessor

    folder = Path(folder)
    path = folder / ONNX_FILES[variant]
    if not path.is_file():
        raise DataError(
            f"no {variant} variant here; the register stage writes it",
            file=str(path),
            rule="exists",
        )
    return OnnxScorer(load_preprocessor(folder / PREPROCESSOR_FILE), open_session(path, threads))


def build_variants(
    preprocessor_path: str | Path, network_path: str | Path, folder: str | Path
) -> Path:
    """Write ``model.onnx``, ``model.int8.onnx`` and a copy of the preprocessor to ``folder``."""
    from model.nets import load_network

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    module, checkpoint = load_network(network_path)
    export_onnx(module, checkpoint["n_features"], folder / ONNX_FILES["onnx"])
    quantize_int8(folder / ONNX_FILES["onnx"], folder / ONNX_FILES["int8"])
    shutil.copy2(preprocessor_path, folder / PREPROCESSOR_FILE)
    return folder


# --- evaluate -----------------------------------------------------------------------------


def median_latency_ms(call: Callable[[Any], Any], arg: Any, repeats: int) -> float:
    """Median wall time of ``call(arg)`` in milliseconds, after one warm-up call."""
    call(arg)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(arg)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def take_rows(rows: Any, size: int) -> Any:
    """``size`` rows of a DataFrame or array, cycling through it when it is shorter."""
    index = np.tile(np.arange(len(rows)), math.ceil(size / len(rows)))[:size]
    return rows.iloc[index].reset_index(drop=True) if hasattr(rows, "iloc") else rows[index]


def _latencies(
    name: str, call: Callable[[Any], Any], rows: Any, repeats: tuple[int, int]
) -> dict[str, float]:
    return {
        f"variant.{name}.latency_ms_row": median_latency_ms(call, rows[:1], repeats[0]),
        f"variant.{name}.latency_ms_batch64": median_latency_ms(
            call, take_rows(rows, BATCH_SIZE), repeats[1]
        ),
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
            **_latencies(name, run, X, repeats),
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
    metrics |= _latencies("preprocess", preprocessor.transform, rows, repeats)
    metrics["variant.torch.size_bytes"] = float(Path(network_path).stat().st_size)
    for name, file in ONNX_FILES.items():
        metrics[f"variant.{name}.size_bytes"] = float((folder / file).stat().st_size)
    return metrics


def log_variants(
    preprocessor_path: str | Path, network_path: str | Path, test: pd.DataFrame
) -> dict[str, float]:
    """Build, evaluate and log the ONNX variants to the active MLflow run.

    Args:
        preprocessor_path: the fitted ``preprocessor.joblib`` the pyfunc was logged with.
        network_path: the checkpoint ``model.pt`` the pyfunc was logged with.
        test: the raw test split (feature columns + target).

    Returns:
        The logged metrics (see :func:`evaluate_variants`).
    """
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_variants(preprocessor_path, network_path, Path(tmp) / ARTIFACT_DIR)
        metrics = evaluate_variants(folder, network_path, test)
        mlflow.log_artifacts(str(folder), ARTIFACT_DIR)
    mlflow.log_metrics(metrics)
    logger.info(
        "variants: onnx accuracy drop %.4f, int8 accuracy drop %.4f, int8 %.0f%% of the onnx size",
        metrics["variant.onnx.accuracy_drop"],
        metrics["variant.int8.accuracy_drop"],
        100 * metrics["variant.int8.size_bytes"] / metrics["variant.onnx.size_bytes"],
    )
    return metrics


# --- load for serving ---------------------------------------------------------------------


def load_variant(
    model_uri: str,
    variant: Variant = "pyfunc",
    threads: int = 1,
    key_env: str | None = DEFAULT_KEY_ENV,
) -> Predictor:
    """Load a registered model as the pyfunc or one of its ONNX variants.

    Every file is checked against the hashes the version recorded at registration before it
    is loaded (:mod:`model.artifacts`): a ``models:/`` URI is downloaded and checked,
    a local copy is taken as checked by the caller (:mod:`serving.model` checks its copy),
    and the ``variants/`` files are checked against the versions registered from their run.

    Args:
        model_uri: ``models:/<name>/<version>``, ``models:/<name>@<alias>``, or a local copy
            of a model version (what :mod:`serving.model` passes); the ONNX files come from
            the ``variants/`` folder of the run that logged it.
        variant: ``pyfunc`` (the logged model), ``onnx`` (float32) or ``int8``.
        threads: onnxruntime threads per call (ONNX variants only).
        key_env: env var holding the signing key (params ``register.signing_key_env``).

    Returns:
        An object whose ``predict(frame)`` returns ``prediction`` + ``proba_<label>`` columns.

    Raises:
        ArtifactIntegrityError: a file differs from its recorded hash, or the signature is
            missing or wrong while a key is set.
        PipelineError: an unknown variant, or a version logged without variants.
    """
    import mlflow

    from model.artifacts import ensure_verified, verify_run_variants

    if variant not in VARIANTS:
        raise PipelineError(f"unknown model variant {variant!r} (one of {', '.join(VARIANTS)})")
    if variant == "pyfunc":
        with tempfile.TemporaryDirectory(prefix="variant-model-") as tmp:
            return mlflow.pyfunc.load_model(ensure_verified(model_uri, tmp, key_env))
    run_id = mlflow.models.get_model_info(model_uri).run_id
    folder = Path(tempfile.mkdtemp(prefix="variants-"))
    try:
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=ARTIFACT_DIR, dst_path=str(folder)
        )
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for "not there"
        shutil.rmtree(folder, ignore_errors=True)
        raise PipelineError(
            f"{model_uri}: run {run_id} has no {ARTIFACT_DIR}/ artifacts "
            f"(registered before variants existed?); serve it with variant "
            f"'pyfunc' or register it again ({type(exc).__name__})"
        ) from exc
    try:
        verify_run_variants(run_id, folder / ARTIFACT_DIR, key_env)  # before the unpickling
        return load_onnx_scorer(folder / ARTIFACT_DIR, variant, threads)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # everything is in memory now
