"""The gbdt model file: a fitted HistGradientBoostingClassifier and its metadata, in skops format.

skops stores the estimator as data, not as a pickle: loading it runs no code from the file, and
refuses every type not trusted. We trust exactly the types a HistGradientBoostingClassifier is
made of (:data:`TRUSTED_TYPES`, beside the ones skops trusts by default); a file that asks for
any other type is refused before it is loaded. The metadata (the train params, feature and
class counts, best epoch, val loss: what the network's ``model.pt`` checkpoint holds besides
the weights) is stored as one JSON string next to the estimator.

Which view of the rows the trees were fitted on is a property of the model, in its metadata:
``inputs: native`` (:data:`NATIVE_INPUTS`) for the preprocessor's tree view
(``FittedPreprocessor.transform_native``: NaN kept, categories as codes, the ``categorical``
mask beside it); a file without the key was fitted on the network's view (``transform``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from model.errors import DataError
from model.files import GBDT_FILE as GBDT_FILE  # defined with the other file names
from model.files import atomic_path

FORMAT = 1  # bump when what the file holds changes
# Types a fitted HistGradientBoostingClassifier holds that skops does not trust by default: its
# trees, and (with categorical features) the numeric pass-through of its own category
# re-encoding, a functools.partial of check_array (skops checks the wrapped function's type too).
TRUSTED_TYPES = (
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "functools.partial",
    "sklearn.utils.validation.check_array",
)
NATIVE_INPUTS = "native"  # meta["inputs"] of a gbdt fitted on FittedPreprocessor.transform_native


def uses_native_inputs(meta: dict[str, Any]) -> bool:
    """Whether a model with this metadata scores the preprocessor's tree view of the rows."""
    return meta.get("inputs") == NATIVE_INPUTS


def save_gbdt(estimator: Any, meta: dict[str, Any], path: str | Path) -> Path:
    """Write ``estimator`` and ``meta`` (JSON-able) to ``path`` atomically; returns ``path``."""
    import skops.io

    path = Path(path)
    payload = {"format": FORMAT, "estimator": estimator, "meta": json.dumps(meta)}
    with atomic_path(path) as tmp:
        skops.io.dump(payload, tmp)
    return path


def load_gbdt(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(estimator, metadata) from a file :func:`save_gbdt` wrote.

    Raises:
        DataError: no such file, an unreadable one, or one holding types not trusted here.
    """
    import skops.io

    path = Path(path)
    if not path.is_file():
        raise DataError(
            "gbdt model not found; run the train stage first", file=str(path), rule="exists"
        )
    try:
        untrusted = skops.io.get_untrusted_types(file=path)
    except Exception as exc:  # skops raises several types for a damaged archive
        raise DataError(f"not a readable skops file: {exc}", file=str(path), rule="model") from exc
    refused = sorted(set(untrusted) - set(TRUSTED_TYPES))
    if refused:
        raise DataError(
            f"the file asks for types not trusted for a gbdt model: {refused}; not loaded",
            file=str(path),
            rule="trusted_types",
        )
    try:
        payload = skops.io.load(path, trusted=list(untrusted))
        return payload["estimator"], json.loads(payload["meta"])
    except Exception as exc:
        raise DataError(f"not a readable gbdt model: {exc}", file=str(path), rule="model") from exc


def estimator_bytes(estimator: Any) -> bytes:
    """The fitted estimator as bytes that are equal for equal models (for a content hash;
    never loaded: pickle protocol 4, the same on every Python this project runs)."""
    import pickle

    return pickle.dumps(estimator, protocol=4)


def gbdt_proba(estimator: Any, X: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n, n_classes)`` float64 class probabilities; a class absent from train gets 0."""
    proba = np.zeros((len(X), n_classes), dtype=np.float64)
    if len(X):
        proba[:, estimator.classes_] = estimator.predict_proba(X)
    return proba
