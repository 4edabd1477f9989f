"""Fitting the fusion on the validation split: the members' class probabilities in, the
weights (or the stacking meta-model) out. Pure numpy, no files; the ensemble stage calls it and
``model.ensemble.fuse`` applies the result, at fit time and at predict time alike.

- ``mean`` and ``vote``: nothing to fit.
- ``weighted``: ``ensemble.weights`` normalised, or, when null, each member's inverse val log
  loss normalised (a member twice as confident on the right class counts more).
- ``caruana``: ensemble selection (Caruana, Niculescu-Mizil, Crew, Ksikes, ICML 2004): start
  from the best single member by val log loss, then ``caruana_rounds - 1`` times add, with
  replacement, the member whose addition gives the lowest val log loss of the averaged
  probabilities; a member's weight is how often it was picked / rounds. Picking with
  replacement lets a good member count several times and a weak one not at all, and the
  first pick means it never does worse on val than the best member alone.
- ``stacking``: multinomial logistic regression (C = ``stacking_c``) from the members'
  probabilities (``model.ensemble.stacking_features``) to the label.

Everything here sees the validation rows only: the test split stays untouched for evaluate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stages.common.errors import ConfigError, DataError

_EPS = 1e-15  # probabilities are clipped here before the log


@dataclass(frozen=True)
class Fusion:
    """What ``model.ensemble.write_ensemble`` stores: weights or stacking, and how they came."""

    method: str
    weights: list[float] | None = None
    stacking: dict[str, Any] | None = None
    detail: dict[str, Any] = field(default_factory=dict)  # for the report (caruana's picks)


def log_loss(y: np.ndarray, proba: np.ndarray) -> float:
    """Mean ``-log p(true class)``, probabilities clipped away from 0 and renormalised."""
    proba = np.clip(np.asarray(proba, dtype=np.float64), _EPS, 1.0)
    proba = proba / proba.sum(axis=1, keepdims=True)
    return float(-np.log(proba[np.arange(len(y)), y]).mean())


def normalised(weights: list[float]) -> list[float]:
    """``weights`` scaled to sum to 1 (they are >= 0 with a positive sum: checked at load)."""
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def inverse_loss_weights(probas: list[np.ndarray], y: np.ndarray) -> list[float]:
    """Each member's ``1 / val log loss``, normalised."""
    return normalised([1.0 / max(log_loss(y, p), _EPS) for p in probas])


def caruana_weights(
    probas: list[np.ndarray], y: np.ndarray, rounds: int
) -> tuple[list[float], list[int]]:
    """Greedy ensemble selection with replacement; returns (weights, picks in order).

    Round 1 takes the best single member; each later round the member whose addition lowers
    the averaged probabilities' log loss most (ties: the lower index, train's model first).
    """
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in probas])
    losses = [log_loss(y, p) for p in stacked]
    picks = [int(np.argmin(losses))]
    total = stacked[picks[0]].copy()
    for count in range(2, rounds + 1):
        candidates = [log_loss(y, (total + p) / count) for p in stacked]
        best = int(np.argmin(candidates))
        picks.append(best)
        total += stacked[best]
    counts = np.bincount(picks, minlength=len(probas))
    return [float(c) / rounds for c in counts], picks


def fit_stacking(
    probas: list[np.ndarray], y: np.ndarray, c: float, *, val_file: str | None = None
) -> dict[str, Any]:
    """Logistic regression on the members' probabilities, as plain lists (coef, intercept).

    Raises:
        DataError: the val split (``val_file``) holds a single class (nothing to learn a
            boundary from).
    """
    from sklearn.linear_model import LogisticRegression

    from model.ensemble import stacking_features, stacking_from_sklearn

    classes = np.unique(y)
    if len(classes) < 2:
        raise DataError(
            f"ensemble.method is stacking, which needs at least two classes among the val rows; "
            f"they hold only class id(s) {classes.tolist()}. Fix: set ensemble.method to caruana "
            "or mean, or split the data so that val holds every class",
            file=val_file,
            rule="stacking_classes",
        )
    meta = LogisticRegression(C=c, max_iter=1000)
    meta.fit(stacking_features(probas), y)
    return stacking_from_sklearn(meta)


def fit_fusion(
    method: str,
    probas: list[np.ndarray],
    y: np.ndarray,
    *,
    weights: list[float] | None = None,
    rounds: int = 20,
    stacking_c: float = 1.0,
    names: list[str] | None = None,
    val_file: str | None = None,
) -> Fusion:
    """Fit ``method`` on the members' val probabilities ``probas`` and labels ``y`` (read
    from ``val_file``, named in errors).

    Raises:
        ConfigError: ``weights`` given with another count than members.
        DataError: stacking on val rows of a single class.
    """
    names = names or [str(i) for i in range(len(probas))]
    if method in ("mean", "vote"):
        return Fusion(method)
    if method == "weighted":
        if weights is None:
            return Fusion(method, inverse_loss_weights(probas, y), detail={"by": "val log loss"})
        if len(weights) != len(probas):
            raise ConfigError(
                f"ensemble.weights has {len(weights)} value(s) for {len(probas)} members "
                f"({', '.join(names)}): give one per member, train's model first"
            )
        return Fusion(method, normalised(weights), detail={"by": "ensemble.weights"})
    if method == "caruana":
        found, picks = caruana_weights(probas, y, rounds)
        return Fusion(method, found, detail={"rounds": rounds, "picks": [names[i] for i in picks]})
    if method == "stacking":
        return Fusion(
            method,
            stacking=fit_stacking(probas, y, stacking_c, val_file=val_file),
            detail={"c": stacking_c},
        )
    raise ConfigError(f"ensemble.method {method!r} is not a fusion method")
