"""The ensemble stage's last check: the written zip, loaded as evaluate and register load it,
must give back the val probabilities the fusion was fitted on.

It catches a zip that does not hold what was fitted (another member file, other weights, a
member view mixed up). Both sides are scored on the same device (``base.device``): a GPU
scoring with TF32 or another cuDNN kernel than the CPU differs by ~1e-4, which is noise, not
a wrong file. So members and the fused probabilities must agree within ``RELOAD_ATOL``
(1e-4; a different member or weight moves probabilities by far more). ``vote`` is the
exception for the fused result: a member's near-tie flip moves a class's vote share by
1/members, so there the fused class (argmax) must match exactly, its members within the
tolerance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from model.files import ENSEMBLE_FILE
from stages.common.errors import PipelineError

RELOAD_ATOL = 1e-4  # float32 on GPU kernels (TF32, cuDNN choice) stays well inside this


def reload_mismatch(
    names: list[str],
    probas: list[np.ndarray],
    fused: np.ndarray,
    reloaded: list[np.ndarray],
    reloaded_fused: np.ndarray,
    method: str,
) -> str | None:
    """What differs between the fitted (``probas``, ``fused``) and the reloaded val
    probabilities, or None when they agree (module doc: atol, vote by argmax)."""
    if len(reloaded) != len(probas):
        return f"the zip holds {len(reloaded)} member(s), the fusion was fitted on {len(probas)}"
    for name, fitted, loaded in zip(names, probas, reloaded, strict=True):
        if fitted.shape != loaded.shape:
            return f"member {name}: shape {loaded.shape}, fitted on {fitted.shape}"
        if not np.allclose(loaded, fitted, rtol=0.0, atol=RELOAD_ATOL):
            return f"member {name}: max difference {np.abs(loaded - fitted).max():.3g}"
    if method == "vote":
        flipped = int((reloaded_fused.argmax(axis=1) != fused.argmax(axis=1)).sum())
        return f"the vote picks another class on {flipped} row(s)" if flipped else None
    if not np.allclose(reloaded_fused, fused, rtol=0.0, atol=RELOAD_ATOL):
        return f"fused: max difference {np.abs(reloaded_fused - fused).max():.3g}"
    return None


def check_reload(
    zip_path: Path,
    inputs: tuple[Any, Any],
    device: Any,
    names: list[str],
    probas: list[np.ndarray],
    fused: np.ndarray,
) -> np.ndarray:
    """Load ``zip_path`` (``load_predictor``, as evaluate does), score the val rows on
    ``device`` (``inputs``: the preprocessor and the val frame) and compare; returns the
    reloaded fused probabilities.

    Raises:
        PipelineError: they differ beyond the tolerance (module doc), naming what and a fix.
    """
    from model.fusion import fuse
    from model.predictors import load_predictor

    preprocessor, val = inputs
    ensemble = load_predictor(zip_path)  # what evaluate and register will load
    ensemble.to(device)  # where the members were scored: one device on both sides
    reloaded = ensemble.member_probas(ensemble.features(preprocessor, val))
    meta = ensemble.meta
    reloaded_fused = fuse(reloaded, meta["method"], meta.get("weights"), meta.get("stacking"))
    why = reload_mismatch(names, probas, fused, reloaded, reloaded_fused, meta["method"])
    if why is not None:
        raise PipelineError(
            f"{ENSEMBLE_FILE} does not reproduce the fused val probabilities it was fitted "
            f"with ({why}; tolerance {RELOAD_ATOL:g}); not written. Fix: re-run the stage; if "
            f"it fails again on a GPU, set base.device: cpu to rule out nondeterministic "
            "kernels; if it fails on the CPU, it is a bug in writing or loading the zip "
            "(model.ensemble_file / model.ensemble): report it with this message"
        )
    return reloaded_fused
