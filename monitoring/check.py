"""One monitoring check on a window of logged rows: drift, PSI, data quality, performance, and
the decision (``retrain`` when any threshold is crossed, ``ok`` otherwise), with the reasons as
sentences that name the columns and the numbers. Too few rows is decided by the caller
(``waiting``) before any of this runs: it counts :func:`sampled_rows`.

Drift, PSI, performance and the bad-row share are computed on the log's sampled rows only (its
``sampled`` column, :mod:`serving.predlog`): a uniform sample of the traffic. Rows logged only
because they broke the contract feed the violation listing, not the shares. A log without the
column (written before it existed) has every row counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from monitoring.drift import DriftResult, detect_drift
from monitoring.performance import Performance, estimate_performance, live_performance
from monitoring.psi import PsiResult, proba_psi
from monitoring.quality import QualityResult, check_quality, sampled_mask
from monitoring.reference import as_kinds, read_reference

SHOWN_COLUMNS = 5  # drifted columns named in a reason


@dataclass(frozen=True)
class Thresholds:
    """params ``monitor``: crossing any one asks for retraining."""

    drift_share: float
    psi: float
    psi_bins: int
    max_bad_row_share: float
    max_accuracy_drop: float


@dataclass(frozen=True)
class Baselines:
    """What live performance is compared with: the version's test accuracy (for labels) and
    the same confidence estimate on its test split (for an estimate: calibration error
    cancels); None when not known."""

    test_accuracy: float | None
    estimated_accuracy: float | None

    def for_source(self, source: str) -> float | None:
        """The baseline for ``labels`` or ``estimated``."""
        return self.test_accuracy if source == "labels" else self.estimated_accuracy


@dataclass(frozen=True)
class Reference:
    """The training reference as the check uses it."""

    rows: pd.DataFrame  # sampled training rows (all the model's input columns there)
    proba: pd.DataFrame  # the watched model's outputs on them
    estimated_test_accuracy: float | None  # CBPE on the test split (None: no test split)


def prepare_reference(
    train: str | Path,
    test: str | Path | None,
    inputs: list[str],
    kinds: dict[str, str],
    rows: int,
    seed: int,
    predict: Callable[[pd.DataFrame], pd.DataFrame],
) -> Reference:
    """Sample the train split, score it with ``predict`` (the watched model: raw input rows ->
    ``prediction`` + ``proba_<label>``), and estimate its accuracy on the test split.

    Args:
        inputs: the model's input columns (those the split lacks are left out).
        kinds: the columns checked for drift; the split must have them all.
    """
    reference = read_reference(train, list(kinds), rows, seed)
    proba = predict(reference[[c for c in inputs if c in reference.columns]])
    estimated = None
    if test is not None:
        sample = read_reference(test, list(kinds), rows, seed)
        scored = predict(sample[[c for c in inputs if c in sample.columns]])
        estimated = estimate_performance(scored).accuracy
    return Reference(reference, proba.reset_index(drop=True), estimated)


@dataclass(frozen=True)
class CheckResult:
    """Everything one check found and decided."""

    drift: DriftResult
    psi: PsiResult
    quality: QualityResult
    performance: Performance
    accuracy_baseline: float | None
    decision: str  # retrain | ok
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the drift report's HTML apart)."""
        return {
            "decision": self.decision,
            "reasons": self.reasons,
            "drift": self.drift.to_dict(),
            "psi": self.psi.to_dict(),
            "quality": self.quality.to_dict(),
            "performance": self.performance.to_dict(),
            "accuracy_baseline": self.accuracy_baseline,
        }


def sampled_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows the log's sample draw took (all rows of a log without a ``sampled`` column)."""
    return rows[sampled_mask(rows).to_numpy()]


def run_checks(
    current: pd.DataFrame,
    reference: pd.DataFrame,
    reference_proba: pd.DataFrame,
    kinds: dict[str, str],
    contract: dict[str, Any] | None,
    labels: pd.DataFrame | None,
    thresholds: Thresholds,
    baselines: Baselines,
) -> CheckResult:
    """The watched version's logged rows (``current``) against its training reference.

    Args:
        current: the log's rows of the watched version (inputs, outputs, marks), all of
            them: the shares use the sampled ones, the violation listing all.
        reference: training rows (the model's input columns).
        reference_proba: the watched model's ``proba_<label>`` columns on ``reference``.
        kinds: ``{column: "num" | "cat"}`` to test for drift.
        contract: the model's input contract (None: none shipped).
        labels: ground truth (``request_id``, ``label``), None when there is none.
        thresholds: params ``monitor``.
        baselines: the performance to compare with.
    """
    sampled = sampled_rows(current)
    scored = sampled[sampled["prediction"].notna()] if "prediction" in sampled else sampled
    drift = detect_drift(
        as_kinds(reference, kinds), as_kinds(sampled, kinds), kinds, thresholds.drift_share
    )
    psi = proba_psi(reference_proba, scored, thresholds.psi_bins)
    quality = check_quality(current, reference, contract, list(kinds))
    performance = live_performance(scored, labels) if labels is not None else None
    if performance is None or performance.accuracy is None:
        performance = estimate_performance(scored)
    baseline = baselines.for_source(performance.source)
    reasons = decide(drift, psi, quality, performance, baseline, thresholds)
    return CheckResult(
        drift, psi, quality, performance, baseline, "retrain" if reasons else "ok", reasons
    )


def decide(
    drift: DriftResult,
    psi: PsiResult,
    quality: QualityResult,
    performance: Performance,
    baseline: float | None,
    thresholds: Thresholds,
) -> list[str]:
    """The reasons to retrain, one sentence per threshold crossed (empty: no retraining)."""
    reasons = []
    if drift.columns and drift.share >= thresholds.drift_share:
        named = [c.describe() for c in drift.columns if c.drifted][:SHOWN_COLUMNS]
        more = len(drift.drifted) - len(named)
        reasons.append(
            f"feature drift: {len(drift.drifted)} of {len(drift.columns)} columns drifted "
            f"({drift.share:.0%}, threshold {thresholds.drift_share:.0%}): "
            + ", ".join(named)
            + (f" and {more} more" if more > 0 else "")
        )
    if psi.value >= thresholds.psi:
        reasons.append(
            f"prediction shift: PSI of {psi.worst} is {psi.value:.3f} "
            f"(threshold {thresholds.psi:g})"
        )
    if quality.bad_row_share > thresholds.max_bad_row_share:
        reasons.append(
            f"data quality: {quality.bad_rows} of {quality.rows} live rows "
            f"({quality.bad_row_share:.1%}) break the model's input contract (threshold "
            f"{thresholds.max_bad_row_share:.1%}): {quality.describe()}"
            + (
                f" (counts include {quality.forced_rows} row(s) logged only for a violation)"
                if quality.forced_rows
                else ""
            )
        )
    if performance.accuracy is not None and baseline is not None:
        drop = baseline - performance.accuracy
        if drop > thresholds.max_accuracy_drop:
            what = "live accuracy" if performance.source == "labels" else "estimated accuracy"
            against = "test accuracy" if performance.source == "labels" else "its test split"
            reasons.append(
                f"performance: {what} {performance.accuracy:.3f} on {performance.rows} rows is "
                f"{drop:.3f} below {baseline:.3f} ({against}; threshold "
                f"{thresholds.max_accuracy_drop:g})"
            )
    return reasons
