"""The model gate's decision, pure: absolute thresholds, the baselines, the champion.

:func:`decide_promotion` takes the candidate's test metrics, the champion's on the same test
rows (or None) and the baselines evaluate scored there, and says whether the candidate is
promoted, and why; ``gate_failed`` marks a candidate below the gate (losing to the champion is
not a failure). Nothing here reads files or talks to MLflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from model.metrics import LOWER_IS_BETTER
from stages.common.config import RegisterParams

TIE_TOLERANCE = 1e-9  # float noise below this counts as "equal", i.e. not worse
MAX_REASON = 600  # characters: a reason is one bounded line, never a dumped object


@dataclass(frozen=True)
class Decision:
    """The model gate's verdict. ``gate_failed``: the candidate failed the gate (GateError)."""

    promote: bool
    reason: str
    gate_failed: bool


def check_thresholds(metrics: dict[str, float], params: RegisterParams) -> list[str]:
    """The absolute thresholds that ``metrics`` miss, one description each (empty: all met)."""
    failures = []
    for name, floor in sorted(params.min_metrics.items()):
        value = metrics.get(name, math.nan)
        if not value >= floor:  # also catches NaN
            failures.append(f"{name} {value:.4f} < min {floor}")
    for name, ceiling in sorted(params.max_metrics.items()):
        value = metrics.get(name, math.nan)
        if not value <= ceiling:
            failures.append(f"{name} {value:.4f} > max {ceiling}")
    return failures


def _describe_cleared(metrics: dict[str, float], params: RegisterParams) -> str:
    met = [f"{k} {metrics[k]:.4f} >= {v}" for k, v in sorted(params.min_metrics.items())] + [
        f"{k} {metrics[k]:.4f} <= {v}" for k, v in sorted(params.max_metrics.items())
    ]
    return f"clears the absolute thresholds ({', '.join(met)})" if met else ""


def _gain(ours: float, theirs: float, metric: str) -> float:
    # How much better ``ours`` is (negative: worse); NaN when either is NaN.
    return (theirs - ours) if metric in LOWER_IS_BETTER else (ours - theirs)


def check_baselines(
    metrics: dict[str, float], baselines: dict[str, dict[str, float]], params: RegisterParams
) -> tuple[list[str], str]:
    """The relative gate: beat the majority class, trail the best baseline by at most
    ``params.max_gap_to_baseline`` (both on ``params.compare_metric``).

    Returns:
        (failures, one description each; what was cleared, for the reason).
    """
    metric, max_gap = params.compare_metric, params.max_gap_to_baseline
    if max_gap is None:
        return [], ""
    ours = metrics.get(metric, math.nan)
    majority = baselines["majority"].get(metric, math.nan)
    scored = {name: scores.get(metric, math.nan) for name, scores in baselines.items()}
    best = max(scored, key=lambda name: _gain(scored[name], ours, metric))
    failures = []
    if not _gain(ours, majority, metric) > TIE_TOLERANCE:  # also catches NaN
        failures.append(
            f"{metric} {ours:.4f} does not beat the majority-class baseline's {majority:.4f}"
        )
    gap = -_gain(ours, scored[best], metric)
    if not gap <= max_gap + TIE_TOLERANCE:
        failures.append(
            f"{metric} {ours:.4f} trails the {best} baseline's "
            f"{scored[best]:.4f} by {gap:.4f} > register.max_gap_to_baseline "
            f"{max_gap}"
        )
    cleared = (
        f"beats the majority-class baseline ({metric} {majority:.4f}) and is within "
        f"{max_gap} of the best baseline ({best} {scored[best]:.4f})"
    )
    return failures, cleared


def decide_promotion(
    candidate_metrics: dict[str, float],
    champion_metrics: dict[str, float] | None,
    params: RegisterParams,
    baselines: dict[str, dict[str, float]] | None = None,
) -> Decision:
    """Promote when the gate is cleared and the candidate beats the champion (a tie: no).

    Args:
        candidate_metrics: the new model's test metrics.
        champion_metrics: the champion's metrics on the same test data; None when there is no
            champion to compare with: then the gate alone decides.
        params: the gate (baseline gap, absolute thresholds), the metric to compare on.
        baselines: ``{baseline: metrics}`` on the same test data (evaluate's); None: the
            baseline gate is not applied.
    """
    metric = params.compare_metric
    failures = []
    if below := check_thresholds(candidate_metrics, params):
        failures.append("below the absolute thresholds: " + "; ".join(below))
    cleared = [_describe_cleared(candidate_metrics, params)]
    if baselines is not None:
        below, relative = check_baselines(candidate_metrics, baselines, params)
        if below:
            failures.append("below the baselines: " + "; ".join(below))
        cleared.append(relative)
    if failures:
        return Decision(False, "; ".join(failures), True)
    cleared_text = "; ".join(c for c in cleared if c) or "no gate set"
    if champion_metrics is None:
        return Decision(True, f"no champion to compare with; {cleared_text}", False)
    ours, theirs = candidate_metrics[metric], champion_metrics.get(metric, math.nan)
    direction = "lower" if metric in LOWER_IS_BETTER else "higher"
    gain = _gain(ours, theirs, metric)
    versus = f"the champion's {theirs:.4f} on the same test data ({direction} is better)"
    if abs(gain) <= TIE_TOLERANCE:  # bit-identical or equally good: the champion stays
        return Decision(
            False,
            f"tie: {metric} {ours:.4f} is equal to {versus}; a tie never "
            f"moves the alias; {cleared_text}",
            False,
        )
    if not gain > 0:  # also catches a NaN champion value
        return Decision(False, f"{metric} {ours:.4f} is worse than {versus}; {cleared_text}", False)
    return Decision(True, f"{metric} {ours:.4f} is better than {versus}; {cleared_text}", False)


def one_line(text: str, limit: int = MAX_REASON) -> str:
    """``text`` on one line of at most ``limit`` characters (for reasons, tags, errors)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
