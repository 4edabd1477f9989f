"""What register judges: the candidate model read from the pipeline's outputs, what it is
(its content hash), and how a registered model is scored on the raw test rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from model.files import PREPROCESSOR_FILE
from model.metrics import BASELINES, METRIC_NAMES, compute_metrics, read_baselines
from stages.common.config import Params
from stages.common.errors import DataError
from stages.common.io import read_json, read_parquet
from stages.common.judged import judged_model_file
from stages.register.content import content_hash as content_hash  # (tests)
from stages.register.content import ensemble_tags, model_checkpoint, model_code

if TYPE_CHECKING:
    import pandas as pd

    from model.preprocess import FittedPreprocessor


@dataclass(frozen=True)
class Candidate:
    """What register judges: the files, what they are (hash, contract) and the test data.

    ``model_file``: the judged model (``stages.common.judged``: the ensemble's when the
    ensemble stage built one, else train's); ``tags``: the version tags it adds (an ensemble:
    ``ensemble.members``, ``ensemble.method``)."""

    features_dir: Path
    model_dir: Path
    model_file: Path
    test: pd.DataFrame
    preprocessor: FittedPreprocessor
    evaluated: dict[str, float]
    baselines: dict[str, dict[str, float]]
    contract: dict[str, Any]
    content_hash: str
    network_hash: str  # content_hash without the contract
    tags: dict[str, str]

    @property
    def is_ensemble(self) -> bool:
        return "ensemble.method" in self.tags


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
    features_dir: Path,
    model_dir: Path,
    metrics_path: Path,
    params: Params,
    ensemble_dir: Path | None = None,
) -> Candidate:
    """The candidate: features (preprocessor, test split), the judged model (train's, or
    the ensemble in ``ensemble_dir`` when the ensemble stage built one), metrics, input contract.

    Raises:
        DataError: a metric or the test split's target column is missing; the ensemble
            report is missing, or says built without its file.
    """
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
    judged = judged_model_file(model_dir, ensemble_dir)
    checkpoint = model_checkpoint(judged)
    fitted, code = preprocessor_path.read_bytes(), model_code()
    return Candidate(
        features_dir,
        model_dir,
        judged,
        test,
        preprocessor,
        evaluated,
        baselines,
        contract,
        content_hash(checkpoint, fitted, contract, code),
        content_hash(checkpoint, fitted, None, code),
        ensemble_tags(judged),
    )
