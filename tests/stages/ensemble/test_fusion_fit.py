"""Fitting the fusion on validation probabilities (pure numpy): caruana's greedy selection,
weights by inverse val loss or as given, stacking, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest

from model.ensemble import fuse
from stages.common.errors import ConfigError, DataError
from stages.ensemble.fusion_fit import caruana_weights, fit_fusion, inverse_loss_weights, log_loss


def _members(seed: int = 0, n: int = 300) -> tuple[np.ndarray, list[np.ndarray]]:
    """Labels and three members: a good one, a noisy one, one that is always wrong-ish."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    one_hot = np.eye(3)[y]

    def member(signal: float, noise: float) -> np.ndarray:
        logits = signal * one_hot + noise * rng.normal(size=(n, 3))
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    return y, [member(2.0, 1.0), member(1.0, 1.5), member(-1.0, 1.0)]


def test_caruana_starts_from_the_best_member_and_never_does_worse_on_val() -> None:
    y, probas = _members()
    weights, picks = caruana_weights(probas, y, rounds=20)
    losses = [log_loss(y, p) for p in probas]
    assert picks[0] == int(np.argmin(losses)) == 0
    assert len(picks) == 20 and sum(weights) == pytest.approx(1.0)
    assert weights == [picks.count(i) / 20 for i in range(3)]
    assert weights[2] == 0.0  # the bad member is never picked
    fused = fuse(probas, "caruana", weights)
    assert log_loss(y, fused) <= min(losses) + 1e-12


def test_caruana_with_one_round_is_the_best_member_alone() -> None:
    y, probas = _members(1)
    weights, picks = caruana_weights(probas, y, rounds=1)
    assert picks == [0] and weights == [1.0, 0.0, 0.0]


def test_caruana_picks_with_replacement_a_copy_counts_like_the_original() -> None:
    y, probas = _members(2)
    twice = fit_fusion("caruana", [probas[0], probas[0], probas[1]], y, rounds=10)
    assert twice.weights[1] == 0.0  # the copy adds nothing the first one does not
    assert twice.detail["picks"][0] == "0"


def test_weighted_by_inverse_val_loss_or_as_given() -> None:
    y, probas = _members(3)
    by_loss = fit_fusion("weighted", probas, y)
    assert by_loss.weights == pytest.approx(inverse_loss_weights(probas, y))
    assert by_loss.weights[0] > by_loss.weights[1] > by_loss.weights[2]
    given = fit_fusion("weighted", probas, y, weights=[2.0, 1.0, 1.0])
    assert given.weights == [0.5, 0.25, 0.25]
    with pytest.raises(ConfigError, match=r"ensemble.weights has 2 value\(s\) for 3 members"):
        fit_fusion("weighted", probas, y, weights=[1.0, 1.0], names=["train", "a", "b"])


def test_mean_and_vote_fit_nothing() -> None:
    y, probas = _members(4)
    for method in ("mean", "vote"):
        fusion = fit_fusion(method, probas, y)
        assert fusion.weights is None and fusion.stacking is None
        fuse(probas, method)  # applies as fitted


def test_stacking_learns_to_trust_the_good_member() -> None:
    y, probas = _members(5)
    fusion = fit_fusion("stacking", probas, y, stacking_c=1.0)
    assert fusion.weights is None and fusion.detail == {"c": 1.0}
    fused = fuse(probas, "stacking", stacking=fusion.stacking)
    assert np.allclose(fused.sum(axis=1), 1.0)
    assert (fused.argmax(axis=1) == y).mean() >= (probas[0].argmax(axis=1) == y).mean() - 0.02


def test_stacking_binary_and_a_single_class_val_split_refused() -> None:
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, 200)
    p = np.clip(np.eye(2)[y] * 0.6 + 0.2 + 0.1 * rng.normal(size=(200, 2)), 0.01, None)
    p /= p.sum(axis=1, keepdims=True)
    fusion = fit_fusion("stacking", [p, p[::-1]], y)
    assert len(fusion.stacking["coef"]) == 1  # sklearn's one binary row, applied as a sigmoid
    assert fuse([p, p[::-1]], "stacking", stacking=fusion.stacking).shape == (200, 2)
    with pytest.raises(
        DataError,
        match=r"ensemble.method is stacking.*val rows.*\[0\].*Fix: .*file=f/val.parquet, rule=stac",
    ):
        fit_fusion("stacking", [p, p], np.zeros(200, dtype=int), val_file="f/val.parquet")
