"""What register judges: the candidate model read from the pipeline's outputs, what it is
(its content hash), and how a registered model is scored on the raw test rows."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from model.files import PREPROCESSOR_FILE
from model.metrics import BASELINES, METRIC_NAMES, compute_metrics, read_baselines
from stages.common.config import Params
from stages.common.errors import DataError
from stages.common.io import read_json, read_parquet

if TYPE_CHECKING:
    import pandas as pd

    from model.preprocess import FittedPreprocessor


@dataclass(frozen=True)
class Candidate:
    """What register judges: the files, what they are (hash, contract) and the test data."""

    features_dir: Path
    model_dir: Path
    test: pd.DataFrame
    preprocessor: FittedPreprocessor
    evaluated: dict[str, float]
    baselines: dict[str, dict[str, float]]
    contract: dict[str, Any]
    content_hash: str
    network_hash: str  # content_hash without the contract


def content_hash(
    checkpoint: dict[str, Any],
    preprocessor_bytes: bytes,
    contract: dict[str, Any] | None,
    code: dict[str, bytes],
) -> str:
    """What the model is, as a sha256: two models with the same hash answer alike.

    Hashed: the network's architecture and weights (not the checkpoint file: ``torch.save``
    embeds the file name, and the epoch/val-loss records do not change the model) or, for a
    gbdt (``checkpoint["estimator"]``: the metadata with the loaded estimator), the fitted
    estimator's pickle bytes (the skops file is not byte-stable: it names its arrays by
    object id), the
    fitted preprocessor's bytes (joblib output, stable for the same fit), the input contract
    (None: left out, the network hash) and the model code that ships with it (``code``:
    relative path -> bytes).
    """
    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        digest.update(f"{label}:{len(data)}:".encode())
        digest.update(data)

    train = checkpoint["train_params"]
    architecture = {
        key: train.get(key)
        for key in ("model", "hidden_sizes", "channels", "image_shape", "dropout")
    }
    add(
        "architecture",
        json.dumps(
            {
                **architecture,
                "n_features": checkpoint["n_features"],
                "n_classes": checkpoint["n_classes"],
            },
            sort_keys=True,
        ).encode(),
    )
    if "estimator" in checkpoint:
        from model.gbdt import estimator_bytes

        add("estimator", estimator_bytes(checkpoint["estimator"]))
    for name, tensor in sorted(checkpoint.get("state_dict", {}).items()):
        values = tensor.detach().cpu().contiguous()
        add(
            f"tensor {name} {values.dtype} {tuple(values.shape)}",
            values.view(-1).view(_byte_dtype()).numpy().tobytes(),
        )
    add("preprocessor", preprocessor_bytes)
    if contract is not None:
        add("contract", json.dumps(contract, sort_keys=True, default=str).encode())
    for path, data in sorted(code.items()):
        add(f"code {path}", data)
    return digest.hexdigest()


def _byte_dtype() -> Any:
    import torch

    return torch.uint8


def encode_with_classes(labels: pd.Series, classes: list[Any]) -> np.ndarray:
    """Label values -> class ids in ``classes``; a label outside them raises ValueError."""
    index = {label: i for i, label in enumerate(classes)}
    unknown = sorted({str(v) for v in labels if v not in index})
    if unknown:
        raise ValueError(f"label(s) {unknown[:5]} not among the model's classes {classes}")
    return labels.map(index).to_numpy(dtype=np.int64)


def score_model(
    model_uri: str, test: pd.DataFrame, target: str, classes: list[Any], key_env: str | None = None
) -> dict[str, float]:
    """Score a registered pyfunc on raw test rows: its output columns -> the test metrics.

    The version's files are downloaded and checked against the hashes recorded at
    registration (and their signature, when the key in ``key_env``, default
    ``MODEL_SIGNING_KEY``, is set) before it loads.

    Raises:
        ArtifactIntegrityError: the files differ, or the signature is missing or wrong.
        DataError, ValueError, MlflowException: the model cannot score this data
        (other columns, other classes) or cannot be loaded.
    """
    import tempfile

    from model.artifacts import ensure_verified
    from model.loading import load_pyfunc
    from model.servable import proba_matrix

    with tempfile.TemporaryDirectory(prefix="register-score-") as tmp:
        # With the code the version shipped: a champion registered by older code has its own.
        model = load_pyfunc(ensure_verified(model_uri, tmp, key_env))
    predictions = model.predict(test.drop(columns=[target]))
    proba = proba_matrix(predictions, classes)
    return compute_metrics(encode_with_classes(test[target], classes), proba)


def read_metrics(metrics_path: Path, params: Params) -> tuple[dict, dict[str, dict[str, float]]]:
    """Evaluate's test metrics and its baselines; every metric the gate needs must be there.

    Raises:
        DataError: naming the missing metric and the fix (re-run evaluate).
    """
    evaluated = read_json(metrics_path)
    for name in METRIC_NAMES:
        if not isinstance(evaluated.get(name), (int, float)):
            raise DataError(
                "metric missing or not a number; re-run evaluate",
                file=str(metrics_path),
                column=name,
                rule="metric_present",
            )
    baselines = read_baselines(evaluated)
    if params.register.max_gap_to_baseline is not None:
        for name in BASELINES:
            if params.register.compare_metric not in baselines[name]:
                raise DataError(
                    f"baseline {name!r} missing; re-run evaluate (or set "
                    "register.max_gap_to_baseline: null)",
                    file=str(metrics_path),
                    column=f"baseline_{name}_{params.register.compare_metric}",
                    rule="metric_present",
                )
    return evaluated, baselines


def read_inputs(
    features_dir: Path, model_dir: Path, metrics_path: Path, params: Params
) -> Candidate:
    """The candidate: features (preprocessor, test split), model, metrics, input contract.

    Raises:
        DataError: a metric or the test split's target column is missing.
    """
    from model.predictors import load_predictor, model_file
    from model.preprocess import load_preprocessor
    from stages.common.suite import load_suite
    from stages.register.contract import build_contract

    evaluated, baselines = read_metrics(metrics_path, params)
    preprocessor_path = features_dir / PREPROCESSOR_FILE
    preprocessor = load_preprocessor(preprocessor_path)
    test_path = features_dir / "test.parquet"
    test = read_parquet(test_path)
    if preprocessor.target not in test.columns:
        raise DataError(
            "target column not found",
            file=str(test_path),
            column=preprocessor.target,
            rule="column_present",
        )
    contract = build_contract(
        load_suite(params.validate.suite_path), params.validate.rules, preprocessor.feature_columns
    )
    checkpoint = _checkpoint(load_predictor(model_file(model_dir)))
    fitted, code = preprocessor_path.read_bytes(), model_code()
    return Candidate(
        features_dir,
        model_dir,
        test,
        preprocessor,
        evaluated,
        baselines,
        contract,
        content_hash(checkpoint, fitted, contract, code),
        content_hash(checkpoint, fitted, None, code),
    )


def _checkpoint(predictor: Any) -> dict[str, Any]:
    """What :func:`content_hash` reads of a loaded model: its metadata and weights/trees."""
    if predictor.is_network:
        return {**predictor.meta, "state_dict": predictor.module.state_dict()}
    return {**predictor.meta, "estimator": predictor.estimator}


def model_code() -> dict[str, bytes]:
    """The code that ships with the model (servable.copy_model_code): the model/ package,
    sources only (bytecode differs between Python builds, not the model)."""
    import model

    package = Path(model.__file__).parent
    return {
        str(f.relative_to(package.parent)): f.read_bytes() for f in sorted(package.rglob("*.py"))
    }
