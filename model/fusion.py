"""How an ensemble's members' class probabilities become one: :func:`fuse`, the one fusion code.

The ensemble stage fits weights (greedy selection) or the stacking model on validation
probabilities through it, and :class:`model.ensemble.EnsemblePredictor` predicts through it.
Pure numpy: the stacking model is stored as plain coefficient lists and applied here, so no
scikit-learn object is unpickled at prediction time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

METHODS = ("mean", "vote", "weighted", "caruana", "stacking")
# vote: (1 - share) x vote share + share x mean probability. The mean term breaks ties and
# keeps every probability inside (0, 1) (log loss stays finite); it is capped below
# 1 / (members + 1) so it can never outweigh one vote: the argmax is always the majority class.
VOTE_MEAN_SHARE = 0.1
_WEIGHT_TOLERANCE = 1e-6


def stacking_features(probas: list[np.ndarray]) -> np.ndarray:
    """The stacking model's input: members' probabilities side by side, member-major
    (``[m0 class 0..k-1, m1 class 0..k-1, ...]``, shape ``(n, members * k)``). Fit the
    LogisticRegression on exactly this (class ids 0..k-1 as targets)."""
    _check_probas(probas)
    return np.concatenate([np.asarray(p, dtype=np.float64) for p in probas], axis=1)


def stacking_from_sklearn(lr: Any) -> dict[str, Any]:
    """A fitted sklearn LogisticRegression -> the stored ``{coef, intercept, classes}`` (lists;
    a binary model keeps its one coefficient row). No sklearn object is kept.

    Raises:
        ValueError: it was fitted on labels rather than class ids (0..k-1).
    """
    classes = np.asarray(lr.classes_)
    if not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(f"fit the stacking model on class ids 0..k-1, not labels {classes[:5]}")
    return {
        "coef": np.asarray(lr.coef_, dtype=np.float64).tolist(),
        "intercept": np.asarray(lr.intercept_, dtype=np.float64).tolist(),
        "classes": [int(c) for c in classes],
    }


def fuse(
    probas: list[np.ndarray],
    method: str,
    weights: list[float] | None = None,
    stacking: dict[str, Any] | None = None,
) -> np.ndarray:
    """Fuse the members' ``(n, k)`` probabilities (one array per member, member order) into one
    ``(n, k)`` float64 array.

    mean: the average. weighted, caruana: ``sum w_i p_i`` (weights >= 0, one per member, sum 1).
    vote: each member's argmax is one vote; :data:`VOTE_MEAN_SHARE` of the mean mixed in.
    stacking: softmax (sigmoid for a binary model) of ``stacking_features(probas) @ coef.T +
    intercept``; a class the stacking model never saw gets 0.

    Raises:
        ValueError: no members, unequal or non-2-D shapes, an unknown method, weights or
            stacking coefficients that do not fit the method, the members or the classes.
    """
    _check_probas(probas)
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in probas])  # (m, n, k)
    m, n, k = stack.shape
    check_fusion(method, m, k, weights, stacking)
    if method == "mean":
        return stack.mean(axis=0)
    if method in ("weighted", "caruana"):
        w = np.asarray(weights, dtype=np.float64)
        return np.tensordot(w / w.sum(), stack, axes=1)
    if method == "vote":
        share = min(VOTE_MEAN_SHARE, 0.5 / (m + 1))
        votes = np.zeros((n, k))
        for member in stack:
            votes[np.arange(n), member.argmax(axis=1)] += 1.0
        return (1.0 - share) * votes / m + share * stack.mean(axis=0)
    assert stacking is not None  # check_fusion
    coef, intercept = np.asarray(stacking["coef"]), np.asarray(stacking["intercept"])
    classes = stacking.get("classes") or list(range(k))
    z = stacking_features(probas) @ coef.T + intercept
    if coef.shape[0] == 1:  # binary: sklearn's sigmoid of one logit, for classes[1]
        one = 1.0 / (1.0 + np.exp(-z[:, 0]))
        fitted = np.stack([1.0 - one, one], axis=1)
    else:
        z -= z.max(axis=1, keepdims=True)
        fitted = np.exp(z)
        fitted /= fitted.sum(axis=1, keepdims=True)
    out = np.zeros((n, k))
    out[:, classes] = fitted
    return out


def check_fusion(
    method: str,
    n_members: int,
    n_classes: int,
    weights: list[float] | None = None,
    stacking: dict[str, Any] | None = None,
) -> None:
    """Check that ``weights``/``stacking`` fit ``method``, the members and the classes.

    Raises:
        ValueError: what is wrong, and what was expected.
    """
    if method not in METHODS:
        raise ValueError(f"unknown fusion method {method!r} (expected one of {', '.join(METHODS)})")
    if (weights is not None) != (method in ("weighted", "caruana")):
        raise ValueError(f"method {method!r}: weights are for weighted/caruana (got {weights})")
    if (stacking is not None) != (method == "stacking"):
        raise ValueError(f"method {method!r}: stacking coefficients are for stacking only")
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (n_members,) or not np.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"weights {list(weights)}: need {n_members} finite values >= 0")
        if abs(w.sum() - 1.0) > _WEIGHT_TOLERANCE:
            raise ValueError(f"weights {list(weights)} sum to {w.sum():.6g}; normalise them to 1")
    if stacking is not None:
        _check_stacking(stacking, n_members, n_classes)


def _check_stacking(stacking: dict[str, Any], n_members: int, n_classes: int) -> None:
    try:
        coef = np.asarray(stacking["coef"], dtype=np.float64)
        intercept = np.asarray(stacking["intercept"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"stacking needs numeric 'coef' and 'intercept' lists ({exc})") from exc
    classes = stacking.get("classes") or list(range(n_classes))
    if sorted(set(classes)) != list(classes) or not all(0 <= c < n_classes for c in classes):
        raise ValueError(f"stacking classes {classes}: sorted distinct class ids < {n_classes}")
    if len(classes) < 2:
        raise ValueError(f"stacking classes {classes}: a model of at least 2 classes")
    # one row per class (softmax); a binary model may keep sklearn's one row (sigmoid)
    rows = 1 if len(classes) == 2 and len(coef) == 1 else len(classes)
    width = n_members * n_classes
    if coef.shape != (rows, width) or intercept.shape != (rows,):
        raise ValueError(
            f"stacking coef {coef.shape} / intercept {intercept.shape}: expected ({rows}, "
            f"{width}) / ({rows},) for {len(classes)} classes and {n_members} members x "
            f"{n_classes} probabilities (stacking_features' layout)"
        )
    if not (np.isfinite(coef).all() and np.isfinite(intercept).all()):
        raise ValueError("stacking coefficients must be finite")


def _check_probas(probas: list[np.ndarray]) -> None:
    if not len(probas):
        raise ValueError("fusion needs at least one member's probabilities")
    shapes = {np.shape(p) for p in probas}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"members' probabilities must all be (n, k) of one shape; got {shapes}")
