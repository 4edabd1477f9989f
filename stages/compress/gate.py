"""The compression gate: a candidate passes when it keeps the parent's quality AND pays for
itself in speed or size; then the best passing candidate is chosen.

Quality: the relative drop on ``compress.metric`` against the parent on the same test split,
``(parent - candidate) / parent`` (reversed for a lower-is-better metric such as log_loss), at
most ``max_relative_drop``. A candidate better than its parent has a negative drop: reported as
it is, passing the quality half. Gain: ``speedup`` (parent's median single-row latency / the
candidate's) at least ``min_speedup``, OR ``size_ratio`` (parent file bytes / the candidate's) at
least ``min_size_ratio``. Either gain is worth having: a smaller file that is no faster still
ships and loads cheaper, a faster one that is no smaller still serves more requests.
"""

from __future__ import annotations

from typing import Any

from model.metrics import LOWER_IS_BETTER

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
TINY = 1e-12  # a zero metric or latency: no division by zero
# A drop of exactly max_relative_drop passes ("at most 1%"): (1.0 - 0.99) / 1.0 is
# 0.010000000000000009 in floating point, so the comparison allows this much rounding.
DROP_TOLERANCE = 1e-9


def relative_drop(parent: float, candidate: float, metric: str) -> float:
    """How much worse the candidate is, as a share of the parent's value (negative: better)."""
    lost = candidate - parent if metric in LOWER_IS_BETTER else parent - candidate
    return lost / max(abs(parent), TINY)


def judge(parent: Any, candidate: Any, cp: Any) -> dict[str, Any]:
    """The gate's numbers and verdict for one candidate.

    Args:
        parent, candidate: :class:`stages.compress.measure.Measurement`.
        cp: params ``compress`` (metric and the gate's thresholds).

    Returns:
        ``relative_drop``, ``speedup``, ``speedup_batch64``, ``size_ratio``, ``status``
        (passed | failed) and ``reason``: one sentence saying why, either way.
    """
    metric = cp.metric
    drop = relative_drop(parent.metrics[metric], candidate.metrics[metric], metric)
    speedup = parent.latency_ms_row / max(candidate.latency_ms_row, TINY)
    speedup_batch = parent.latency_ms_batch64 / max(candidate.latency_ms_batch64, TINY)
    size_ratio = parent.size_bytes / max(candidate.size_bytes, 1)
    kept = max(drop, 0.0) <= cp.max_relative_drop + DROP_TOLERANCE
    faster, smaller = speedup >= cp.min_speedup, size_ratio >= cp.min_size_ratio
    quality = (
        f"{metric} {candidate.metrics[metric]:.4f} vs the parent's {parent.metrics[metric]:.4f} "
        f"(relative drop {drop:+.2%}, at most {cp.max_relative_drop:.2%} allowed)"
    )
    gains = (
        f"{speedup:.2f}x faster per row ({'>=' if faster else '<'} {cp.min_speedup:g}x), "
        f"{size_ratio:.2f}x smaller ({'>=' if smaller else '<'} {cp.min_size_ratio:g}x)"
    )
    if not kept:
        status, reason = FAILED, f"loses too much: {quality}; {gains}"
    elif not (faster or smaller):
        status, reason = FAILED, f"gains too little: {gains}; {quality}"
    else:
        status, reason = PASSED, f"{quality}; {gains}"
    return {
        "relative_drop": drop,
        "speedup": speedup,
        "speedup_batch64": speedup_batch,
        "size_ratio": size_ratio,
        "status": status,
        "reason": reason,
    }


def choose(candidates: dict[str, dict[str, Any]], metric: str) -> str | None:
    """The best passing candidate: best ``metric`` on the test split, then the smallest file,
    then the method's name (a stable order); None when none passed."""
    passing = [(name, c) for name, c in candidates.items() if c["status"] == PASSED]
    if not passing:
        return None
    sign = 1 if metric in LOWER_IS_BETTER else -1

    def rank(item: tuple[str, dict[str, Any]]) -> tuple[float, int, str]:
        name, c = item
        return sign * c["metrics"][metric], c["size_bytes"], name

    return min(passing, key=rank)[0]
