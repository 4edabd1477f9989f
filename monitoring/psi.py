"""Population Stability Index of the predicted class probabilities: the live ``proba_<label>``
columns against the reference's, binned at the reference's quantiles.

``PSI = sum((live% - ref%) * ln(live% / ref%))`` over the bins; an empty bin counts as
``EPSILON`` so the log stays finite. Rule of thumb: < 0.1 stable, 0.1-0.2 moderate, > 0.2 shift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

EPSILON = 1e-4  # the share an empty bin counts as
PROBA_PREFIX = "proba_"


@dataclass(frozen=True)
class PsiResult:
    """PSI per class probability column; ``value`` is the largest."""

    per_class: dict[str, float]

    @property
    def value(self) -> float:
        """The largest per-class PSI (0 when there is none)."""
        return max(self.per_class.values(), default=0.0)

    @property
    def worst(self) -> str | None:
        """The column with the largest PSI."""
        return max(self.per_class, key=self.per_class.__getitem__) if self.per_class else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"value": self.value, "worst": self.worst, "per_class": self.per_class}


def psi(reference: np.ndarray, current: np.ndarray, bins: int) -> float:
    """PSI of one variable; bins are the reference's quantiles (ties merged, so a variable
    concentrated on a few values gets fewer bins)."""
    reference = np.asarray(reference, dtype=float)
    current = np.asarray(current, dtype=float)
    reference, current = reference[~np.isnan(reference)], current[~np.isnan(current)]
    if len(reference) == 0 or len(current) == 0:
        return 0.0
    inner = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    ref_share = np.bincount(
        np.searchsorted(inner, reference, side="right"), minlength=len(inner) + 1
    )
    cur_share = np.bincount(np.searchsorted(inner, current, side="right"), minlength=len(inner) + 1)
    ref_share = np.maximum(ref_share / len(reference), EPSILON)
    cur_share = np.maximum(cur_share / len(current), EPSILON)
    return float(np.sum((cur_share - ref_share) * np.log(cur_share / ref_share)))


def proba_psi(reference: pd.DataFrame, current: pd.DataFrame, bins: int) -> PsiResult:
    """PSI of each ``proba_<label>`` column both frames have."""
    columns = [c for c in reference.columns if c.startswith(PROBA_PREFIX) and c in current.columns]
    return PsiResult(
        {c: psi(reference[c].to_numpy(float), current[c].to_numpy(float), bins) for c in columns}
    )
