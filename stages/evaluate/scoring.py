"""What evaluate scores: the judged model (``stages.common.judged``: the ensemble stage's
``model.ensemble.zip`` when it built one, else train's model file) on the test rows, in the
view it was trained on, and, for an ensemble, each member on the same rows.

The members are scored so that the ensemble's metrics can be read against what each of its
parts does alone (``member_<name>_<metric>`` in metrics.json): an ensemble that does no better
than its best member costs latency and size for nothing. They are reported, never gated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.metrics import MEMBER_PREFIX, compute_metrics  # key: member_<name>_<metric>
from stages.common.config import Params
from stages.common.errors import DataError
from stages.common.judged import judged_model_file
from stages.evaluate.baselines import Rows, load_rows

logger = logging.getLogger(__name__)


@dataclass
class Scored:
    """The judged model's test probabilities, the classes, the rows, and (an ensemble) each
    member's probabilities on the same rows, by member name."""

    proba: np.ndarray
    classes: list[Any]
    test: Rows
    path: Path  # the judged model file
    members: dict[str, np.ndarray] = field(default_factory=dict)


def score(
    features_dir: Path, model_dir: Path, params: Params, ensemble_dir: Path | None = None
) -> Scored:
    """Score the test rows with the judged model (and an ensemble's members).

    Raises:
        DataError: the model does not fit the preprocessor's features or classes (naming the
            model file), or the ensemble report says built and its file is missing.
    """
    from model.nets import select_device
    from model.predictors import load_predictor

    test = load_rows(features_dir, "test")
    path = judged_model_file(model_dir, ensemble_dir)
    predictor = load_predictor(path)
    # An ensemble's inputs hold each view its members need, computed once; .shape is member 0's.
    X = test.view(lambda frame: predictor.features(test.preprocessor, frame))
    classes = list(test.preprocessor.classes)
    if (predictor.n_features, predictor.n_classes) != (X.shape[1], len(classes)):
        raise DataError(
            f"the model expects {predictor.n_features} features and "
            f"{predictor.n_classes} classes, the preprocessor gives {X.shape[1]} and "
            f"{len(classes)}: retrain after the features change",
            file=str(path),
            rule="model_matches_features",
        )
    ensemble = predictor.family == "ensemble"
    if predictor.is_network or ensemble:  # an ensemble moves its network members
        predictor.to(select_device(params.base.device))
    batch = params.evaluate.batch_size
    if not ensemble:
        return Scored(predictor.predict_proba(X, batch), classes, test, path)
    # Each member runs once: its probabilities are reported and fused with the ensemble's own
    # code (model.fusion.fuse, as EnsemblePredictor.predict_proba does), not scored again.
    from model.fusion import fuse

    probas = predictor.member_probas(X, batch)
    meta = predictor.meta
    fused = fuse(probas, meta["method"], meta.get("weights"), meta.get("stacking"))
    names = [name for name, _ in predictor.members]
    return Scored(fused, classes, test, path, dict(zip(names, probas, strict=True)))


def member_scores(y_true: np.ndarray, members: dict[str, np.ndarray]) -> dict[str, dict]:
    """``{member name: its test metrics}``."""
    return {name: compute_metrics(y_true, proba) for name, proba in members.items()}


def flatten_members(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{name: {metric: v}}`` -> metrics.json keys ``member_<name>_<metric>``."""
    return {
        f"{MEMBER_PREFIX}{name}_{metric}": value
        for name, metrics in scores.items()
        for metric, value in metrics.items()
    }


def members_table(judged: dict[str, float], scores: dict[str, dict[str, float]]) -> str:
    """The members beside the ensemble on the same test split, one row each (for the log)."""
    metrics = list(judged)
    width = max([len("ensemble"), *(len(name) for name in scores)])
    rows = [("model", [f"{m:>13}" for m in metrics])]
    rows.append(("ensemble", [f"{judged[m]:>13.4f}" for m in metrics]))
    rows += [(name, [f"{s[m]:>13.4f}" for m in metrics]) for name, s in scores.items()]
    return "\n".join(f"{name:<{width}}  " + "  ".join(cells) for name, cells in rows)


def log_scores(
    path: Path,
    judged: dict[str, float],
    members: dict[str, dict[str, float]],
    baselines: dict[str, dict[str, float]],
    strong: dict[str, float],
) -> None:
    """Log the judged model's test metrics, its members' (a table), the baselines' and the
    strong baseline's beside them."""
    logger.info(
        "test metrics of %s: %s", path.name, ", ".join(f"{k}={v:.4f}" for k, v in judged.items())
    )
    if members:
        logger.info(
            "members beside the ensemble on the same test split:\n%s",
            members_table(judged, members),
        )
    for name, scores in baselines.items():
        logger.info(
            "baseline %s on the same test split: %s",
            name,
            ", ".join(f"{k}={v:.4f}" for k, v in scores.items()),
        )
    logger.info(
        "model vs gbdt (strong baseline, not gated) on the same test split: %s",
        ", ".join(f"{k} {judged[k]:.4f} vs {v:.4f}" for k, v in strong.items()),
    )
