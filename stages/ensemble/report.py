"""The ensemble stage's ``report.json``: what a disabled stage says, and what a built one
holds (method, weights, per member its source, family, sha256 and val scores; the ensemble's
val scores). No timings in it: rebuilt from the same member files, it is the same bytes.
"""

from __future__ import annotations

import logging
from typing import Any

from model.files import ENSEMBLE_FILE
from stages.common.judged import BUILT

logger = logging.getLogger(__name__)

DISABLED = "disabled"
VAL_NOTE = (
    "val scores are optimistic: every member was early-stopped on these val rows, and weighted "
    "(by loss), caruana and stacking were fitted on the members' predictions for the same rows "
    "(not out-of-fold); evaluate's test scores are the honest ones"
)


def disabled_report() -> dict[str, Any]:
    """What a disabled stage writes: train's model is the judged one."""
    return {
        "status": DISABLED,
        "reason": "ensemble.enabled is false in params.yaml: train's model is the one "
        "evaluate, compress and register judge",
    }


def prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}{name}": value for name, value in metrics.items()}


def build_report(
    members: list[dict[str, Any]],
    member_metrics: list[dict[str, float]],
    fusion: Any,
    ensemble_metrics: dict[str, float],
    zip_sha256: str,
    val_rows: int,
) -> dict[str, Any]:
    """report.json of a built ensemble: no timings, so a rebuild of the same is byte-equal."""
    entries = []
    for index, (member, scores) in enumerate(zip(members, member_metrics, strict=True)):
        entry = {
            key: member.get(key)
            for key in ("name", "source", "family", "sha256", "seed", "overrides", "best_epoch")
        }
        if fusion.weights is not None:
            entry["weight"] = fusion.weights[index]
            entry["in_file"] = fusion.weights[index] > 0  # a weight-0 member is left out
        entries.append({**entry, **prefixed(scores, "val_")})
    return {
        "status": BUILT,
        "method": fusion.method,
        "weights": fusion.weights,
        "fusion": fusion.detail,
        "members": entries,
        **prefixed(ensemble_metrics, "val_"),
        "val_rows": val_rows,
        "note": VAL_NOTE,
        "file": ENSEMBLE_FILE,
        "sha256": zip_sha256,
    }


def log_summary(report: dict[str, Any]) -> None:
    for member in report["members"]:
        logger.info(
            "member %s (%s, %s): val f1_macro %.4f, log_loss %.4f%s",
            member["name"],
            member["source"],
            member["family"],
            member["val_f1_macro"],
            member["val_log_loss"],
            f", weight {member['weight']:.3f}" if "weight" in member else "",
        )
    logger.info(
        "ensemble (%s, %d members): val f1_macro %.4f, log_loss %.4f (fitted on val)",
        report["method"],
        len(report["members"]),
        report["val_f1_macro"],
        report["val_log_loss"],
    )
