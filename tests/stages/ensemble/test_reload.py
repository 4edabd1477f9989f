"""The ensemble stage's reload check: the zip, loaded back on the scoring device, must give the
fitted val probabilities within 1e-4 (GPU kernel noise passes), the vote the same classes, and
a zip that holds other weights than the ones fitted fails the stage with a fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from model.ensemble import fuse, write_ensemble
from model.nets import build_network
from model.predictors import load_predictor
from model.preprocess import FittedPreprocessor, fit_preprocessor
from stages.common.errors import PipelineError
from stages.ensemble.reload import RELOAD_ATOL, check_reload, reload_mismatch

NAMES = ["train", "seed7"]
P1 = np.array([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]])
P2 = np.array([[0.4, 0.6], [0.45, 0.55], [0.9, 0.1]])


def test_differences_within_gpu_noise_pass_and_a_real_difference_is_named() -> None:
    fused = fuse([P1, P2], "mean")
    noisy = [P1 + 0.5 * RELOAD_ATOL, P2 - 0.5 * RELOAD_ATOL]  # TF32 / another cuDNN kernel
    assert reload_mismatch(NAMES, [P1, P2], fused, noisy, fuse(noisy, "mean"), "mean") is None
    moved = [P1, P2 + np.array([0.01, -0.01])]
    why = reload_mismatch(NAMES, [P1, P2], fused, moved, fuse(moved, "mean"), "mean")
    assert why == "member seed7: max difference 0.01"
    # the same members under other weights: the fused probabilities give it away
    other = fuse([P1, P2], "weighted", [0.9, 0.1])
    why = reload_mismatch(NAMES, [P1, P2], fused, [P1, P2], other, "weighted")
    assert why is not None and why.startswith("fused: max difference 0.")
    assert "holds 1 member(s)" in reload_mismatch(NAMES, [P1, P2], fused, [P1], P1, "mean")


def test_vote_must_pick_the_same_classes() -> None:
    fused = fuse([P1, P2], "vote")
    assert reload_mismatch(NAMES, [P1, P2], fused, [P1, P2], fused.copy(), "vote") is None
    swapped = fused[:, ::-1]  # every row's class flipped, members unchanged
    why = reload_mismatch(NAMES, [P1, P2], fused, [P1, P2], swapped, "vote")
    assert why == "the vote picks another class on 3 row(s)"


def _frame(n: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 2))
    return pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "label": np.where(x[:, 0] > 0, "y", "n")})


def _mlp(preprocessor: FittedPreprocessor, seed: int, path: Path) -> Path:
    """A small untrained MLP in the checkpoint format train writes."""
    torch.manual_seed(seed)
    spec = {"model": "mlp", "hidden_sizes": [4], "dropout": 0.0}
    network = build_network(spec, preprocessor.n_features, 2)
    path.parent.mkdir(parents=True)
    torch.save(
        {
            "state_dict": network.state_dict(),
            "train_params": spec,
            "n_features": preprocessor.n_features,
            "n_classes": 2,
            "epoch": 1,
            "val_loss": 1.0,
        },
        path,
    )
    return path


def test_a_zip_whose_weights_differ_from_the_fitted_members_fails_with_a_fix(
    tmp_path: Path,
) -> None:
    frame = _frame()
    preprocessor = fit_preprocessor(frame, "label")
    fitted = [_mlp(preprocessor, seed, tmp_path / f"fit{seed}" / "model.pt") for seed in (0, 1)]
    members = [{"name": n, "source": n, "file": f} for n, f in zip(NAMES, fitted, strict=True)]
    predictors = [load_predictor(f) for f in fitted]
    probas = [p.predict_proba(p.features(preprocessor, frame)) for p in predictors]
    fused = fuse(probas, "mean")
    device = torch.device("cpu")
    good = write_ensemble(tmp_path / "good" / "model.ensemble.zip", members, "mean")
    loaded = check_reload(good, (preprocessor, frame), device, NAMES, probas, fused)
    np.testing.assert_allclose(loaded, fused, rtol=0, atol=RELOAD_ATOL)
    # the zip holds another network under the name seed7: other weights than were fitted
    swapped = [
        members[0],
        {**members[1], "file": _mlp(preprocessor, 2, tmp_path / "x" / "model.pt")},
    ]
    bad = write_ensemble(tmp_path / "bad" / "model.ensemble.zip", swapped, "mean")
    with pytest.raises(PipelineError, match=r"does not reproduce.*member seed7: max diff.*Fix: "):
        check_reload(bad, (preprocessor, frame), device, NAMES, probas, fused)
