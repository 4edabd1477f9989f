"""Live performance from labels that may arrive days after their rows were checked.

Ground truth usually comes later than the check that saw its rows, when those rows are behind
the watermark. So the labels are joined with the watched version's logged rows of the last
``days`` days (params ``monitor.labels_days``), read by part-file stamp apart from the drift
window, and the check's performance is that join when it has any labelled row.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pandas as pd

from monitoring.check import Baselines, CheckResult, Thresholds, decide
from monitoring.performance import Performance, live_performance
from monitoring.window import read_recent, watched_rows

# what the join needs of a logged row ("sampled": the log's uniform draw, serving/predlog.py)
COLUMNS = ["logged_at", "request_id", "model_name", "model_version", "prediction", "sampled"]


def late_performance(
    log_dir: str | Path,
    model_name: str,
    version: str | None,
    labels: pd.DataFrame,
    now: dt.datetime,
    days: float,
) -> Performance:
    """Accuracy and macro F1 by day of the watched version's rows logged in the last ``days``
    days that have a label (``source`` "labels"; ``accuracy`` None when none has)."""
    rows = watched_rows(read_recent(log_dir, now, days, COLUMNS), model_name, version)
    # a row logged only because it broke the contract is no part of the uniform sample
    rows = rows[rows["sampled"].fillna(True).astype(bool)]
    return live_performance(rows, labels)


def with_performance(
    result: CheckResult, performance: Performance, baselines: Baselines, thresholds: Thresholds
) -> CheckResult:
    """``result`` with ``performance`` in place of the window's (its baseline and the decision
    made again); ``result`` itself when ``performance`` has no accuracy."""
    if performance.accuracy is None:
        return result
    baseline = baselines.for_source(performance.source)
    reasons = decide(result.drift, result.psi, result.quality, performance, baseline, thresholds)
    return dataclasses.replace(
        result,
        performance=performance,
        accuracy_baseline=baseline,
        decision="retrain" if reasons else "ok",
        reasons=reasons,
    )
