"""The one place that loads a trained model file, whatever the family: a network checkpoint
(``model.pt``: mlp, cnn, transformer, rnn) or a gradient-boosted tree model (``model.skops``:
gbdt). Evaluate, export, register and the served pyfunc all load through :func:`load_predictor`
and score through :meth:`Predictor.features` (the rows as the model was trained on them) and
:meth:`Predictor.predict_proba`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from model.errors import DataError
from model.files import ENSEMBLE_FILE, GBDT_FILE, MODEL_FILES
from model.files import model_file as model_file  # importable here, as before

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from model.preprocess import FittedPreprocessor


@dataclass
class Predictor:
    """A loaded model: class probabilities from preprocessed rows, and what train saved with it.

    ``meta`` holds ``train_params``, ``n_features``, ``n_classes``, ``epoch`` and ``val_loss``
    for every family. ``module`` is the network (None for gbdt), ``estimator`` the fitted
    scikit-learn model (None for a network).
    """

    family: str
    meta: dict[str, Any]
    module: torch.nn.Module | None = None
    estimator: Any = None
    device: torch.device | None = field(default=None, repr=False)

    @property
    def n_features(self) -> int:
        return int(self.meta["n_features"])

    @property
    def n_classes(self) -> int:
        return int(self.meta["n_classes"])

    @property
    def is_network(self) -> bool:
        return self.module is not None

    def to(self, device: torch.device | str) -> Predictor:
        """Score on ``device`` (networks; a gbdt always runs on the CPU)."""
        if self.module is not None:
            import torch

            self.device = torch.device(device)
            self.module = self.module.to(self.device)
        return self

    def features(self, preprocessor: FittedPreprocessor, frame: pd.DataFrame) -> np.ndarray:
        """Raw rows as this model was trained on them, by the same fitted preprocessor: its
        tree view (NaN kept, category codes) for a gbdt fitted on it, else ``transform``."""
        from model.gbdt import uses_native_inputs

        if uses_native_inputs(self.meta):
            return preprocessor.transform_native(frame)
        return preprocessor.transform(frame)

    def predict_proba(self, X: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """``(n, n_classes)`` float64 probabilities of rows ``X`` from :meth:`features`."""
        if self.module is None:
            from model.gbdt import gbdt_proba

            return gbdt_proba(self.estimator, X, self.n_classes)
        import torch

        from model.nets import predict_proba

        return predict_proba(self.module, X, self.device or torch.device("cpu"), batch_size)


def load_predictor(path: str | Path) -> Predictor:
    """Load a model file (by its name: ``model.pt``, ``model.skops``, ``model.ensemble.zip``,
    ``*.onnx``). Ensembles and ONNX models come back as objects with Predictor's interface
    (``family``, ``meta``, ``n_features``, ``n_classes``, ``is_network``, ``to``, ``features``,
    ``predict_proba``): :class:`model.ensemble.EnsemblePredictor` and
    :class:`model.onnx_model.OnnxPredictor`.

    Check the file's hash before calling this when it has a recorded one (the pyfunc does).

    Raises:
        DataError: an unknown file name, a missing or unreadable file.
    """
    path = Path(path)
    if path.name == ENSEMBLE_FILE:  # members loaded once, each through this function
        from model.ensemble import load_ensemble

        return load_ensemble(path)
    if path.suffix == ".onnx":  # a compact (int8) model: onnxruntime, no torch
        from model.onnx_model import load_onnx_model

        return load_onnx_model(path)
    if path.name == GBDT_FILE:
        from model.gbdt import load_gbdt

        estimator, meta = load_gbdt(path)
        return Predictor("gbdt", meta, estimator=estimator)
    if path.suffix == ".pt":  # model.pt, or a renamed copy of one (benchmarks, tests)
        from model.nets import load_network

        module, checkpoint = load_network(path)
        meta = {key: value for key, value in checkpoint.items() if key != "state_dict"}
        return Predictor(str(meta["train_params"].get("model", "mlp")), meta, module=module)
    raise DataError(
        f"unknown model file (expected {' or '.join(MODEL_FILES)})", file=str(path), rule="model"
    )
