"""Smaller and faster variants of the servable model: ONNX (float32) and ONNX int8, loaded.

The export stage (``stages/export``) writes them: the network exported to ONNX (softmax inside
the graph, batch axis dynamic) and quantized to int8, with a copy of the fitted preprocessor, in
the train run's ``variants/`` folder. A variant serves without torch: the fitted preprocessor
(its numpy fast path for numeric inputs) feeds an onnxruntime session. This module holds only
what loading and serving them needs (the file names, the session, the scorer).

:func:`load_variant` gives the service one interface for all three: ``predict(frame)`` returns
the pyfunc's columns (``prediction`` + ``proba_<label>``).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from model.artifacts import DEFAULT_KEY_ENV
from model.errors import DataError, PipelineError
from model.files import PREPROCESSOR_FILE

if TYPE_CHECKING:
    import onnxruntime
    import pandas as pd

    from model.preprocess import FittedPreprocessor

logger = logging.getLogger(__name__)

Variant = Literal["pyfunc", "onnx", "int8"]
VARIANTS: tuple[str, ...] = ("pyfunc", "onnx", "int8")
ONNX_FILES = {"onnx": "model.onnx", "int8": "model.int8.onnx"}  # file per ONNX variant
ARTIFACT_DIR = "variants"  # folder in the MLflow run holding the files above
INPUT_NAME, OUTPUT_NAME = "features", "proba"  # the ONNX graph's input and output


class Predictor(Protocol):
    """What the service calls: raw feature rows in, the pyfunc's output columns out."""

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame: ...


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
    """Load a variant from a folder the export stage wrote (or one downloaded from a run)."""
    from model.preprocess import load_preprocessor

    folder = Path(folder)
    path = folder / ONNX_FILES[variant]
    if not path.is_file():
        raise DataError(
            f"no {variant} variant here; the export stage writes it",
            file=str(path),
            rule="exists",
        )
    return OnnxScorer(load_preprocessor(folder / PREPROCESSOR_FILE), open_session(path, threads))


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
    from model.loading import SERVING_KEEP, load_pyfunc

    if variant not in VARIANTS:
        raise PipelineError(f"unknown model variant {variant!r} (one of {', '.join(VARIANTS)})")
    if variant == "pyfunc":
        with tempfile.TemporaryDirectory(prefix="variant-model-") as tmp:
            return load_pyfunc(ensure_verified(model_uri, tmp, key_env), keep=SERVING_KEEP)
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
            "(registered before variants existed, with export.enabled false, or a model family "
            "export skips, like gbdt?); serve it with variant 'pyfunc' or export and register "
            f"it again ({type(exc).__name__})"
        ) from exc
    try:
        verify_run_variants(run_id, folder / ARTIFACT_DIR, key_env)  # before the unpickling
        return load_onnx_scorer(folder / ARTIFACT_DIR, variant, threads)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # everything is in memory now
