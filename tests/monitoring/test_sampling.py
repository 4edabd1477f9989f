"""The monitor's shares count the prediction log's sampled rows only (review #2): rows logged
because they broke the contract feed the violation listing, not the bad-row share, drift, PSI
or performance. A log without the ``sampled`` column counts every row."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from monitoring import check, quality

CONTRACT = {
    "version": 1,
    "columns": [
        {"name": "x", "kind": "float", "nullable": False, "min": 0, "max": 10, "used": True},
    ],
}


def logged_rows(n_sampled: int, bad_sampled: int, forced: int, seed: int = 0) -> pd.DataFrame:
    """A window as the log holds it at a sample rate below 1: ``n_sampled`` drawn rows of
    which ``bad_sampled`` break the contract, then ``forced`` bad rows logged for their mark
    alone. Good rows follow the reference (x ~ U(2, 8)); bad ones are far out (x = 50)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(2, 8, n_sampled)
    x[:bad_sampled] = 50.0
    x = np.concatenate([x, np.full(forced, 50.0)])
    proba = np.where(x > 5, 0.8, 0.3)
    return pd.DataFrame(
        {
            "logged_at": pd.Timestamp("2025-01-01", tz="UTC"),
            "request_id": [f"r{i}" for i in range(len(x))],
            "x": x,
            "prediction": np.where(proba > 0.5, "a", "b"),
            "proba_a": proba,
            "proba_b": 1 - proba,
            "row_violations": np.where(x > 10, "x:between", None),
            "sampled": [True] * n_sampled + [False] * forced,
        }
    )


def test_bad_row_share_counts_the_sampled_rows_and_lists_every_violation() -> None:
    # 1 % bad traffic at sample_rate 0.1: 400 sampled rows (4 bad) + 36 forced bad rows
    rows = logged_rows(400, 4, 36)
    result = quality.check_quality(rows, rows, CONTRACT, ["x"])
    assert (result.rows, result.bad_rows, result.forced_rows) == (400, 4, 36)
    assert result.bad_row_share == pytest.approx(0.01)  # not 40/436 = 9 %
    assert result.violations == {"x": {"between": 40}}  # the listing sees all of them
    assert result.null_share == {"x": 0.0}

    old_log = rows.drop(columns="sampled")  # written before the column: every row counts
    old = quality.check_quality(old_log, old_log, CONTRACT, ["x"])
    assert (old.rows, old.bad_rows, old.forced_rows) == (436, 40, 0)
    assert len(check.sampled_rows(old_log)) == 436 and len(check.sampled_rows(rows)) == 400


def test_run_checks_decides_on_the_sampled_rows_so_forced_bad_rows_raise_no_alarm() -> None:
    reference = logged_rows(400, 0, 0, seed=1)
    thresholds = check.Thresholds(0.5, 0.2, 10, 0.05, 0.05)
    baselines = check.Baselines(None, None)
    kinds = {"x": "num"}
    proba = reference[["proba_a", "proba_b"]]
    current = logged_rows(400, 4, 36, seed=2)

    result = check.run_checks(
        current, reference[["x"]], proba, kinds, CONTRACT, None, thresholds, baselines
    )
    assert result.decision == "ok", result.reasons
    assert result.quality.bad_row_share == pytest.approx(0.01)
    assert result.performance.rows == 400  # CBPE on the sampled rows
    assert result.psi.value < 0.2 and not result.drift.drifted

    # the same window read as an old log (no column): the forced rows count and cross
    old = check.run_checks(
        current.drop(columns="sampled"),
        reference[["x"]],
        proba,
        kinds,
        CONTRACT,
        None,
        thresholds,
        baselines,
    )
    assert old.decision == "retrain" and old.quality.bad_rows == 40
