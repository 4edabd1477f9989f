"""The suite file: profiling a snapshot in batches, reviewable JSON, loading it back.

GX itself only checks here that a written suite loads; running it is in test_validate.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from stages.common.errors import ConfigError, DataError
from stages.common.suite import load_suite, parse_suite, profile_snapshot, render_suite
from tests.builders import SUITE

ROOT = Path(__file__).resolve().parents[3]


def snapshot() -> pa.Table:
    return pa.table(
        {
            "x": [0.5, 1.5, 9.5, 3.0],
            "n": pa.array([1, None, 3, 4], pa.int64()),
            "color": ["red", "blue", "red", "red"],
            "flag": [True, False, True, True],
            "label": [0, 1, 0, 1],
        }
    )


def profile(table: pa.Table, target: str = "label", **kwargs: object) -> dict:
    return profile_snapshot(
        table.to_batches(max_chunksize=2), table.schema, target, source="data/raw", **kwargs
    )  # two batches: aggregates merge


def by_column(raw: dict) -> dict:
    return {(e["type"], e["kwargs"].get("column")): e for e in raw["expectations"]}


def test_profile_builds_every_kind_of_expectation() -> None:
    found = by_column(profile(snapshot()))

    assert found[("expect_column_values_to_be_between", "x")]["kwargs"] == {
        "column": "x",
        "min_value": 0.0,
        "max_value": 10.4,
    }
    assert (
        found[("expect_column_values_to_be_in_type_list", "n")]["kwargs"]["type_list"][0] == "int64"
    )
    assert found[("expect_column_values_to_not_be_null", "n")]["kwargs"]["mostly"] == 0.5
    assert "mostly" not in found[("expect_column_values_to_not_be_null", "x")]["kwargs"]
    assert found[("expect_column_values_to_be_in_set", "color")]["kwargs"]["value_set"] == [
        "blue",
        "red",
    ]
    assert found[("expect_column_values_to_be_in_set", "label")]["kwargs"]["value_set"] == [0, 1]
    assert (
        found[("expect_column_unique_value_count_to_be_between", "label")]["kwargs"]["min_value"]
        == 2
    )
    assert found[("expect_table_row_count_to_be_between", None)]["kwargs"] == {
        "min_value": 2,
        "max_value": 40,
    }
    assert ("expect_column_values_to_be_between", "label") not in found  # labels only


def test_the_watermark_column_and_the_row_count_get_no_upper_bound() -> None:
    found = by_column(profile(snapshot(), growing="n"))  # incremental ingestion: they only grow

    assert found[("expect_column_values_to_be_between", "n")]["kwargs"] == {
        "column": "n",
        "min_value": 0,
        "max_value": None,
    }
    assert found[("expect_table_row_count_to_be_between", None)]["kwargs"]["max_value"] is None
    assert found[("expect_column_values_to_be_between", "x")]["kwargs"]["max_value"] == 10.4


def test_rendered_suite_is_reviewable_and_loads_back(tmp_path: Path) -> None:
    import great_expectations as gx

    raw = profile(snapshot())
    text = render_suite(raw)
    path = tmp_path / "s.json"
    path.write_text(text)

    assert render_suite(json.loads(text)) == text  # deterministic
    assert text.index('"name"') < text.index('"meta"') < text.index('"expectations"')
    assert text.count('"type": "expect_') == len(raw["expectations"])  # one entry each
    assert json.loads(text)["meta"]["target"] == "label"
    suite = load_suite(path)
    assert suite.target == "label" and suite.columns["n"].max_null_fraction == 0.5
    assert suite.columns["x"].kind == "float" and suite.columns["flag"].kind == "bool"
    assert len(gx.ExpectationSuite(**json.loads(text)).expectations) == len(raw["expectations"])


@pytest.mark.parametrize(
    "values, expected",
    [
        ([-1.5, 9.5], (-2.6, 10.6)),  # negatives: the low bound may go below 0
        ([17.6, 17.6], (15.84, 19.36)),  # no span: widen by the value itself
        ([2, 7], (1, 8)),  # ints stay whole numbers
    ],
)
def test_profile_rounds_ranges_outwards(values: list, expected: tuple) -> None:
    found = by_column(profile(pa.table({"v": values, "label": [0, 1]})))

    kwargs = found[("expect_column_values_to_be_between", "v")]["kwargs"]
    assert (kwargs["min_value"], kwargs["max_value"]) == expected


def test_many_distinct_texts_get_no_value_set() -> None:
    table = pa.table({"id": [f"row{i}" for i in range(60)], "label": [i % 2 for i in range(60)]})

    assert ("expect_column_values_to_be_in_set", "id") not in by_column(profile(table))


def test_profile_without_the_target_column_fails_naming_it() -> None:
    with pytest.raises(DataError, match="target column 'y' is not in the data") as info:
        profile(snapshot(), target="y")

    assert info.value.column == "y" and info.value.rule == "target_present"


# ----------------------------------------------------------------------------- text dates


def vega_csv(name: str) -> Path:
    from importlib.resources import files

    return Path(str(files("vega_datasets") / "_data" / name))


@pytest.mark.parametrize(
    "name, target, fmt",
    [
        ("seattle-weather.csv", "weather", "%Y/%m/%d"),  # 2012/01/01
        ("stocks.csv", "symbol", "%b %d %Y"),  # Jan 1 2000
    ],
)
def test_text_dates_in_a_common_format_become_datetime_with_that_format(
    name: str, target: str, fmt: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from stages.validate.stage import write_suite

    with caplog.at_level("INFO", logger="stages.common.suite"):
        raw = write_suite(vega_csv(name), tmp_path / "s.json", target, 0.1, 1000)

    spec = load_suite(tmp_path / "s.json").columns["date"]
    assert (spec.kind, spec.format) == ("datetime", fmt)
    meta = by_column(raw)[("expect_column_values_to_be_in_type_list", "date")]["meta"]
    assert meta["format"] == fmt and f"text dates parsed with format {fmt}" in meta["notes"]
    assert f"column date: dates in format {fmt}" in caplog.text
    assert ("expect_column_values_to_be_in_set", "date") not in by_column(raw)


def test_ambiguous_day_and_month_order_is_chosen_first_listed_and_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    table = pa.table({"d": ["01/02/2003", "05/06/2007", "11/12/2013", None], "label": [0, 1, 0, 1]})

    with caplog.at_level("WARNING", logger="stages.common.suite"):
        found = by_column(profile(table))

    meta = found[("expect_column_values_to_be_in_type_list", "d")]["meta"]
    assert meta["format"] == "%m/%d/%Y" and "also fits %d/%m/%Y" in meta["notes"]
    assert "ambiguous" in caplog.text and "%d/%m/%Y" in caplog.text
    day_first = table.set_column(0, "d", pa.array(["13/02/2003", "05/06/2007", None, None]))
    meta = by_column(profile(day_first))[("expect_column_values_to_be_in_type_list", "d")]["meta"]
    assert meta["format"] == "%d/%m/%Y" and "also fits" not in meta["notes"]


def test_a_later_batch_in_another_format_keeps_the_column_text(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dates = ["2012/01/01", "2012/01/02", "2012/01/03", "2012/01/04", "01/05/2012", "01/06/2012"]
    table = pa.table({"d": dates, "short": ["01/02/03"] * 6, "label": [0, 1] * 3})

    with caplog.at_level("WARNING", logger="stages.common.suite"):
        found = by_column(profile(table))  # batches of 2: the third one breaks the format

    assert found[("expect_column_values_to_be_in_type_list", "d")]["kwargs"]["type_list"] == ["str"]
    assert "column d: text like a date (e.g. '2012/01/01')" in caplog.text
    short = found[("expect_column_values_to_be_in_type_list", "short")]["meta"]["format"]
    assert short == "%m/%d/%y"  # not %m/%d/%Y: Arrow's %Y would read the year 3


def test_a_suite_date_format_is_read_and_checked() -> None:
    def with_meta(column: str, meta: dict) -> dict:
        return {
            **SUITE,
            "expectations": [
                {**e, "meta": meta}
                if e["type"].endswith("type_list") and e["kwargs"]["column"] == column
                else e
                for e in SUITE["expectations"]
            ],
        }

    assert (
        parse_suite(with_meta("when", {"format": "%d.%m.%Y"})).columns["when"].format == "%d.%m.%Y"
    )
    assert parse_suite(SUITE).columns["when"].format is None
    with pytest.raises(ConfigError, match=r"column 'color': meta.format .* strftime"):
        parse_suite(with_meta("color", {"format": "%Y"}))


def _without(kind: str, column: str | None = None) -> dict:
    return {
        **SUITE,
        "expectations": [
            e
            for e in SUITE["expectations"]
            if not (e["type"] == kind and e["kwargs"].get("column") == column)
        ],
    }


@pytest.mark.parametrize(
    "raw, message",
    [
        (None, "suite file not found"),
        ("{not json", "not valid JSON"),
        ({"name": "x"}, "not a GX expectation suite"),
        ({**SUITE, "meta": {}}, "meta.target"),
        (_without("expect_table_columns_to_match_set"), "needs exactly one"),
        (_without("expect_column_values_to_be_in_type_list", "x"), "column 'x' needs a"),
        (_without("expect_column_values_to_be_in_set", "label"), "needs an expect_column_values"),
        (
            {
                **SUITE,
                "expectations": [
                    *SUITE["expectations"],
                    {"type": "expect_column_values_to_be_between", "kwargs": {"column": "nope"}},
                ],
            },
            "names column 'nope'",
        ),
    ],
)
def test_load_errors_name_the_file(raw: object, message: str, tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    if raw is not None:
        path.write_text(raw if isinstance(raw, str) else json.dumps(raw))

    with pytest.raises(ConfigError, match=message) as info:
        load_suite(path)

    assert str(info.value).startswith(f"{path}: ")


def test_other_gx_expectations_are_left_to_gx() -> None:
    raw = {
        **SUITE,
        "expectations": [
            *SUITE["expectations"],
            {"type": "expect_column_mean_to_be_between", "kwargs": {"column": "x"}},
        ],
    }

    assert parse_suite(raw).other == ["expect_column_mean_to_be_between"]


@pytest.mark.parametrize("name", ["breast_cancer", "digits"])
def test_committed_suite_loads_and_says_where_it_came_from(name: str) -> None:
    path = ROOT / "suites" / f"{name}.json"

    suite = load_suite(path)

    assert suite.target == "target" and suite.labels[:2] == [0, 1]
    assert json.loads(path.read_text())["meta"]["profiled_from"]["snapshot"] == "data/raw"
    assert render_suite(json.loads(path.read_text())) == path.read_text()


def test_suite_module_imports_without_great_expectations_or_pandas() -> None:
    code = (
        "import sys, stages.common.suite, stages.validate.rules, stages.validate.stream; "
        "print(sorted({'great_expectations', 'pandas', 'pyarrow'} & set(sys.modules)))"
    )

    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout

    assert out.strip() == "[]"
