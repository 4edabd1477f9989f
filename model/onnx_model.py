"""A compact model as one ONNX file: the int8 graph with its metadata inside, served through
onnxruntime (no torch at prediction time).

The compress stage writes it (``compact/quantize/model.int8.onnx``). Unlike export's variants,
which ride beside the float network in a run's ``variants/`` folder, this file is a model of
its own: :func:`model.predictors.load_predictor` loads it like ``model.pt``, and register can
register it as a version. So it carries what a loaded model must know (``n_features``,
``n_classes``, the parent's ``train_params``, how it was made) in the ONNX ``metadata_props``
under the key ``meta`` (JSON): one file, nothing beside it to lose or mismatch.

Imports only ``model.errors``/``model.files`` and third-party packages: the module ships with
the registered model, and every stage's DVC deps reach it through ``model.predictors``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from model.errors import DataError
from model.files import atomic_path

if TYPE_CHECKING:
    import onnxruntime
    import pandas as pd

    from model.preprocess import FittedPreprocessor

META_KEY = "meta"  # the metadata_props entry holding the model's meta (JSON)
FAMILY = "onnx"
REQUIRED_META = ("n_features", "n_classes")


def save_onnx_model(source: bytes | str | Path, meta: dict[str, Any], path: str | Path) -> Path:
    """Write the ONNX graph ``source`` (bytes or a file) to ``path`` with ``meta`` inside.

    Args:
        meta: JSON-able; at least ``n_features`` and ``n_classes``. Replaces any ``meta``
            entry the graph held; other metadata entries are kept.

    Raises:
        DataError: ``meta`` lacks a required key, or ``source`` is no ONNX graph.
    """
    import onnx

    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise DataError(
            f"the ONNX model's meta lacks {missing}: a loaded model needs them",
            file=str(path),
            rule="onnx_meta",
        )
    try:
        proto = (
            onnx.load_from_string(source)
            if isinstance(source, bytes)
            else onnx.load(str(source), load_external_data=False)
        )
    except Exception as exc:  # onnx raises protobuf's DecodeError and others
        where = "the given bytes" if isinstance(source, bytes) else str(source)
        raise DataError(f"not an ONNX graph ({where}): {exc}", file=str(path), rule="onnx") from exc
    kept = [prop for prop in proto.metadata_props if prop.key != META_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta, sort_keys=True)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return Path(path)


def open_session(path: str | Path, threads: int = 1) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session, one thread (requests run in parallel, not their layers).

    The same options as :func:`model.variants.open_session`, not imported from there: that
    module reaches the serving code, which the stages loading models must not depend on.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class OnnxPredictor:
    """An ONNX model with :class:`model.predictors.Predictor`'s interface.

    ``meta`` is what the file carries (``n_features``, ``n_classes``, the parent's
    ``train_params``, ``method``...). It scores the encoded view of the rows
    (``preprocessor.transform``), as the network it was made from did.
    """

    meta: dict[str, Any]
    session: onnxruntime.InferenceSession = field(repr=False)
    family: str = FAMILY
    module: None = None  # Predictor's fields: no torch module, no scikit-learn estimator
    estimator: None = None

    @property
    def n_features(self) -> int:
        return int(self.meta["n_features"])

    @property
    def n_classes(self) -> int:
        return int(self.meta["n_classes"])

    @property
    def is_network(self) -> bool:
        return False  # nothing to move to a device: onnxruntime runs it on the CPU

    def to(self, device: Any) -> OnnxPredictor:
        """A no-op: the session runs on the CPU whatever the device asked for."""
        return self

    def features(self, preprocessor: FittedPreprocessor, frame: pd.DataFrame) -> np.ndarray:
        """Raw rows as the graph takes them: the fitted preprocessor's ``transform``."""
        return preprocessor.transform(frame)

    def predict_proba(self, X: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """``(n, n_classes)`` float64 probabilities (the softmax is inside the graph)."""
        if len(X) == 0:
            return np.zeros((0, self.n_classes), dtype=np.float64)
        name = self.session.get_inputs()[0].name
        rows = np.ascontiguousarray(X, dtype=np.float32)
        batches = [
            self.session.run(None, {name: rows[start : start + batch_size]})[0]
            for start in range(0, len(rows), batch_size)
        ]
        return np.concatenate(batches).astype(np.float64)


def read_meta(session: onnxruntime.InferenceSession, path: str | Path) -> dict[str, Any]:
    """The ``meta`` entry of a loaded graph.

    Raises:
        DataError: no ``meta`` entry (an ONNX file not written by :func:`save_onnx_model`),
            unreadable JSON, or a required key missing.
    """
    text = session.get_modelmeta().custom_metadata_map.get(META_KEY)
    if text is None:
        raise DataError(
            f"the ONNX file has no '{META_KEY}' metadata entry: it was not written by "
            "model.onnx_model.save_onnx_model (export's variants/ are served with "
            "model.variants.load_variant instead); re-run the compress stage",
            file=str(path),
            rule="onnx_meta",
        )
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"the '{META_KEY}' metadata entry is not JSON ({exc})", file=str(path), rule="onnx_meta"
        ) from exc
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise DataError(
            f"the '{META_KEY}' metadata entry lacks {missing}; re-run the compress stage",
            file=str(path),
            rule="onnx_meta",
        )
    return meta


def load_onnx_model(path: str | Path, threads: int = 1) -> OnnxPredictor:
    """Load a file :func:`save_onnx_model` wrote.

    Raises:
        DataError: the file is missing or no ONNX graph, or its meta is missing or incomplete.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            "ONNX model not found; run the compress stage", file=str(path), rule="exists"
        )
    try:
        session = open_session(path, threads)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise DataError(f"not a loadable ONNX model: {exc}", file=str(path), rule="onnx") from exc
    return OnnxPredictor(read_meta(session, path), session)
