"""Smoke run of the data-at-scale benchmark and the synthetic table generator at tiny sizes.

Nothing here is timed: the real numbers come from ``make bench-data``.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.csv as csv
import pyarrow.parquet as pq
import pytest

from bench import data_scale, synth
from stages.common.io import read_json


def test_synth_tables_are_repeatable_whatever_the_file_format(tmp_path: Path) -> None:
    first = synth.write_table(3000, tmp_path / "a.csv", seed=3)
    again = synth.write_table(3000, tmp_path / "b.csv", seed=3)
    parquet = synth.write_table(3000, tmp_path / "c.parquet", seed=3)

    assert first.read_bytes() == again.read_bytes()
    table = csv.read_csv(first)
    assert table.num_rows == 3000 and table.column_names == pq.read_schema(parquet).names
    assert {"id", "event_time", "region", "device", "target"} <= set(table.column_names)
    target = table.column("target").to_pylist()
    assert 0.3 < sum(target) / len(target) < 0.7  # both classes, roughly balanced
    assert table.column("x3").null_count > 0  # missing values


@pytest.mark.stack  # out of make test's 20 minutes (issue 14); .ci/run runs it
@pytest.mark.slow
def test_data_scale_reports_rates_ratios_and_peak_rss(tmp_path: Path) -> None:
    assert (
        data_scale.main(
            [
                "--rows",
                "2000",
                "--rows",
                "4000",
                "--snapshot-rows",
                "2000",
                "--batch-rows",
                "1000",
                "--work",
                str(tmp_path / "work"),
                "--results-dir",
                str(tmp_path),
            ]
        )
        == 0
    )

    result = read_json(tmp_path / "data_scale.json")
    assert [r["rows"] for r in result["results"]] == [2000, 4000]
    for size in result["results"]:
        assert set(size["stages"]) == {"ingest", "validate", "features"}
        assert size["ratio_to_plain_read"] > 0 and size["peak_rss_mb"] > 0
        assert all(step["rows_per_s"] > 0 for step in size["stages"].values())
    assert {"time_ratio_2000", "time_ratio_4000", "rss_4000_over_2000"} <= set(result["targets"])
