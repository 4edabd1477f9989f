"""Row-level quarantine: each rule sends the right rows to data/quarantine with the rule named;
the threshold decides whether the run goes on; params rules add to the suite's."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.common.errors import GateError
from stages.validate.rules import hash_rows
from tests.stages.validate.test_stage import (
    good_table,
    make_params,
    run_gate,
    snapshot,
    stage_dirs,
    with_column,
    write_raw,
    write_suite_file,
)

PARAMS_RULES = {
    "n": {"min": 1, "max": 90},
    "x": {"positive": True},
    "color": {"values": ["red", "blue"], "not_null": True},
}

# row: (column, value, rule expected in _rule); every other row is clean
BAD_ROWS = {
    1: ("x", None, "not_null"),
    2: ("x", float("nan"), "finite"),
    3: ("x", float("inf"), "finite"),
    4: ("x", 11.0, "between"),
    5: ("color", "green", "in_set"),
    7: ("label", 7, "label"),
    8: ("n", 95, "max"),  # inside the suite's [0, 100], above params max 90
    10: ("n", 0, "min"),  # row 10 is not null in good_table
    12: ("x", 0.0, "positive"),
    13: ("color", None, "not_null"),  # params not_null on top of the suite
    14: ("n", 500, "between"),  # the suite's range is tried before params max
}


def bad_table() -> pa.Table:
    table = good_table()
    for row, (column, value, _) in BAD_ROWS.items():
        values = table.column(column).to_pylist()
        values[row] = value
        table = with_column(table, column, values, table.schema.field(column).type)
    return table


@pytest.fixture(scope="module")
def quarantined(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, list[str]]:
    """One gate run over a table with every kind of bad row (threshold 50%)."""
    tmp_path = tmp_path_factory.mktemp("quarantine")
    dirs = stage_dirs(tmp_path)
    write_raw(dirs["raw"], bad_table(), parts=3)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("stages.validate.stage").addHandler(handler)
    try:
        summary = run_gate(
            dirs,
            make_params(
                write_suite_file(tmp_path / "s.json"), max_bad_fraction=0.5, rules=PARAMS_RULES
            ),
        )
    finally:
        logging.getLogger("stages.validate.stage").removeHandler(handler)
    return summary, dirs, records


def test_each_rule_quarantines_its_rows(quarantined: tuple) -> None:
    summary, dirs, _ = quarantined

    rows = pq.read_table(dirs["quarantine"] / "rows.parquet").to_pylist()

    # raw values plus the first rule each row broke; row order kept
    assert [(r["_column"], r["_rule"]) for r in rows] == [
        (column, rule) for _, (column, _, rule) in sorted(BAD_ROWS.items())
    ]
    assert rows[4]["color"] == "green" and rows[5]["label"] == 7
    assert summary["bad_rows"] == len(BAD_ROWS) and summary["rows"] == 40


def test_clean_rows_are_cast_to_the_suite_types(quarantined: tuple) -> None:
    _, dirs, _ = quarantined

    validated = pq.read_table(dirs["validated"] / "data.parquet")

    assert validated.num_rows == 40 - len(BAD_ROWS)
    assert {f.name: str(f.type) for f in validated.schema} == {
        "x": "double",
        "n": "int64",
        "color": "string",
        "flag": "bool",
        "when": "timestamp[us]",
        "label": "int64",
    }


def test_summary_and_log_record_the_fraction(quarantined: tuple) -> None:
    summary, dirs, records = quarantined

    assert summary["bad_fraction"] == round(len(BAD_ROWS) / 40, 6)
    assert {"column": "x", "rule": "finite", "rows": 2} in summary["rules"]
    assert sum(r["rows"] for r in summary["rules"]) == len(BAD_ROWS)
    assert summary["gx"]["success"] and summary["gx"]["rows"] == 40 - len(BAD_ROWS)
    assert json.loads((dirs["report"] / "summary.json").read_text()) == summary
    assert json.loads((dirs["quarantine"] / "summary.json").read_text())["bad_rows"] == 11
    assert any("quarantined 11 of 40 rows (27.5000%, limit 50.0000%)" in r for r in records)


def test_over_the_threshold_stops_naming_the_worst_rule(tmp_path: Path, mlflow_uri: str) -> None:
    table = with_column(good_table(), "x", [11.0] * 3 + [1.0] * 36 + [None], pa.float64())
    dirs = stage_dirs(tmp_path)
    write_raw(dirs["raw"], table)
    before = {name: snapshot(dirs[name]) for name in ("validated", "quarantine")}

    with pytest.raises(GateError) as info:
        run_gate(dirs, make_params(write_suite_file(tmp_path / "s.json"), max_bad_fraction=0.05))

    assert (info.value.column, info.value.rule) == ("x", "between")
    assert "4 of 40 rows (10.00%)" in str(info.value)
    assert "above validate.max_bad_fraction 5.00%" in str(info.value)
    assert {name: snapshot(dirs[name]) for name in before} == before


def test_too_many_bad_rows_is_named_before_the_statistics_of_the_few_left(
    tmp_path: Path, mlflow_uri: str
) -> None:
    # Every row with a value in n breaks x's range (a unit change upstream): the only clean
    # rows left are those with n missing, so n looks "100% null". The cause is the bad rows.
    n = good_table().column("n").to_pylist()
    table = with_column(good_table(), "x", [1.0 if v is None else 500.0 for v in n], pa.float64())
    dirs = stage_dirs(tmp_path)
    write_raw(dirs["raw"], table)

    with pytest.raises(GateError) as info:
        run_gate(dirs, make_params(write_suite_file(tmp_path / "s.json"), max_bad_fraction=0.05))

    assert (info.value.column, info.value.rule) == ("x", "between")
    assert "36 of 40 rows (90.00%) broke row-level rules" in str(info.value)


def test_int_column_stored_as_floats_quarantines_nan(tmp_path: Path) -> None:
    values = [float(i) for i in range(39)] + [float("nan")]
    dirs = stage_dirs(tmp_path)
    write_raw(dirs["raw"], with_column(good_table(), "n", values, pa.float64()))

    summary = run_gate(
        dirs, make_params(write_suite_file(tmp_path / "s.json"), max_bad_fraction=0.1)
    )

    assert summary["rules"] == [{"column": "n", "rule": "finite", "rows": 1}]
    assert pq.read_table(dirs["validated"] / "data.parquet").schema.field("n").type == pa.int64()


def test_duplicates_under_the_limit_are_reported(tmp_path: Path) -> None:
    table = pa.concat_tables([good_table(), good_table().slice(0, 1)])
    dirs = stage_dirs(tmp_path)
    write_raw(dirs["raw"], table)

    summary = run_gate(
        dirs, make_params(write_suite_file(tmp_path / "s.json"), max_duplicate_fraction=0.05)
    )

    assert summary["duplicate_fraction"] == round(1 / 41, 6) and summary["duplicates_exact"]


def test_gx_runs_on_a_sample_when_rows_exceed_docs_rows(tmp_path: Path) -> None:
    dirs = stage_dirs(tmp_path)
    write_raw(dirs["raw"], good_table())

    summary = run_gate(dirs, make_params(write_suite_file(tmp_path / "s.json"), docs_rows=10))

    gx = summary["gx"]
    assert gx["success"] and gx["sampled"] and gx["rows"] == 10
    assert any(note.startswith("expect_table_row_count_to_be_between") for note in gx["left_out"])
    assert any("not_be_null on n" in note for note in gx["left_out"])  # `mostly`: every row


def test_row_hashes_match_across_batches_and_types() -> None:
    a = pa.record_batch({"s": ["a", "b", "c"], "x": [1.0, -2.0, None], "i": [1, 2, 3]})
    b = pa.record_batch({"s": ["c", "zz", "a"], "x": [None, 2.0, 1.0], "i": [3, 2, 1]})

    ha, hb = hash_rows(a), hash_rows(b)

    assert ha[0] == hb[2] and ha[2] == hb[0]  # same rows, other batch and dictionary
    assert len(set(ha.tolist()) | set(hb.tolist())) == 4
    flipped = pa.record_batch({"p": [1.0, -1.0], "q": [2.0, -2.0]})  # sign bits in 2 columns
    assert len(np.unique(hash_rows(flipped))) == 2
