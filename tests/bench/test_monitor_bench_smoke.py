"""Smoke run of the monitor benchmark at a tiny size: the log written by the service's writer
is what the monitor reads, every step runs, the result file holds each step and its ratio.

Nothing here is timed: the real numbers come from ``make bench-monitor``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench import monitor
from stages.common.io import read_json


def test_the_synthetic_log_is_the_services_and_has_broken_rows(tmp_path: Path) -> None:
    table = monitor.load_table()
    contract = monitor.build_contract(table)
    model = monitor.served_model(contract, monitor.fit_predictor(table, contract))
    live = monitor.resample(table, 400, seed=1, bad_share=0.05)

    labels = monitor.write_log(tmp_path, model, live, 150, 10, pd.Timestamp("2026-01-01", tz="UTC"))

    log = pd.read_parquet(tmp_path)
    assert len(list(tmp_path.glob("part-*.parquet"))) == 3  # flushed every 150 rows (15 requests)
    assert len(log) == len(labels) == 400 and log["request_id"].nunique() == 40
    assert {"prediction", "proba_Adelie", "row_violations", *model.spec.names} <= set(log.columns)
    marked = log["row_violations"].dropna()
    assert len(marked) >= 20  # the broken rows, as the service marks them
    assert set(marked) <= {"body_mass_g:between", "island:in_set"}
    assert log["logged_at"].dt.strftime("%Y-%m-%d").nunique() == 2  # two UTC days


def test_every_step_is_reported_against_the_pyarrow_read(tmp_path: Path) -> None:
    args = ["--rows", "600", "--reference-rows", "200", "--repeats", "1", "--warmup", "0"]
    assert monitor.main([*args, "--results-dir", str(tmp_path)]) == 0

    result = read_json(tmp_path / "monitor.json")
    assert set(result["steps"]) == set(monitor.STEPS)
    assert result["steps"][monitor.BASELINE]["over_pyarrow_read"]["median"] == 1.0
    for step in result["steps"].values():
        assert step["seconds"]["median"] > 0 and step["seconds_per_100k"] > 0
    assert result["rows"] == 600 and result["part_files"] == 1
    assert set(result["drift_tests"]) == {
        c["name"] for c in monitor.build_contract(monitor.load_table())["columns"]
    }
    assert result["machine"]["load_before"] and result["machine"]["load_after"]
