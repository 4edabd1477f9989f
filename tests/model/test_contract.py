"""The model's input contract: built from the reviewed suite, compared, and checked row by row."""

from __future__ import annotations

import copy
from datetime import datetime
from importlib.resources import files
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from model.contract import (
    ALL_COLUMNS,
    check_rows,
    contract_differences,
    contract_from_signature,
    load_contract,
    rule_differences,
    save_contract,
)
from model.datetimes import to_datetimes
from stages.common.config import ColumnRuleParams
from stages.common.csvfiles import iter_csv_batches
from stages.common.errors import ConfigError, DataError
from stages.common.suite import load_suite, parse_suite
from stages.register.contract import build_contract
from stages.validate.rules import cast_column
from stages.validate.stage import write_suite
from tests.builders import SUITE

# real public tables shipped inside packages: (package, path, target)
TABLES = {
    "penguins": ("palmerpenguins", "data/penguins.csv", "species"),
    "penguins-raw": ("palmerpenguins", "data/penguins-raw.csv", "Species"),
    "seattle-weather": ("vega_datasets", "_data/seattle-weather.csv", "weather"),
}


def tiny_contract(rules: dict | None = None, used: tuple = ("x", "n", "color")) -> dict:
    return build_contract(parse_suite(copy.deepcopy(SUITE)), rules or {}, list(used))


def columns(contract: dict) -> dict[str, dict]:
    return {col["name"]: col for col in contract["columns"]}


def table_contract(name: str, tmp_path: Path) -> tuple[dict, pd.DataFrame]:
    """The contract a model on every column of a real table gets, and the table as ingest
    reads it (the target dropped)."""
    package, path, target = TABLES[name]
    source = Path(str(files(package) / path))
    write_suite(source, tmp_path / "suite.json", target, margin=0.1, batch_rows=10_000)
    suite = load_suite(tmp_path / "suite.json")
    table = pa.Table.from_batches(list(iter_csv_batches(lambda: str(source), str(source), ",")))
    frame = table.to_pandas().drop(columns=[target])
    return build_contract(suite, {}, list(frame.columns)), frame


# --- building ---------------------------------------------------------------------------------


def test_every_source_column_but_the_target_is_in_the_contract_with_the_suites_rules() -> None:
    contract = tiny_contract()

    assert contract["target"] == "label" and contract["labels"] == [0, 1]
    cols = columns(contract)
    assert list(cols) == ["x", "n", "color", "flag", "when"]
    assert {name: col["used"] for name, col in cols.items()} == {
        "x": True,
        "n": True,
        "color": True,
        "flag": False,
        "when": False,
    }
    assert cols["x"]["nullable"] is False  # not_null without mostly
    assert cols["n"]["nullable"] is True  # mostly 0.8: validate lets nulls through
    assert (cols["n"]["kind"], cols["n"]["min"], cols["n"]["max"]) == ("int", 0, 100)
    assert cols["color"]["values"] == ["blue", "red"]
    assert cols["when"]["kind"] == "datetime" and cols["when"]["format"] is None


def test_params_rules_tighten_the_suites() -> None:
    rules = {
        "x": ColumnRuleParams(min=1, max=20, positive=True),
        "n": ColumnRuleParams(not_null=True),
        "color": ColumnRuleParams(values=["red"]),
    }

    cols = columns(tiny_contract(rules))

    assert (cols["x"]["min"], cols["x"]["max"], cols["x"]["positive"]) == (1, 10, True)
    assert cols["n"]["nullable"] is False
    assert cols["color"]["values"] == ["red"]


def test_a_text_dates_format_is_copied_from_the_suite() -> None:
    suite = parse_suite(copy.deepcopy(SUITE))
    suite.columns["when"].format = "%Y/%m/%d"  # what the suite profiles for 2012/01/01

    contract = build_contract(suite, {}, ["x", "when"])

    assert columns(contract)["when"]["format"] == "%Y/%m/%d"


def test_a_feature_column_the_suite_does_not_know_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"\['ghost'\] are not columns of suite 'tiny'"):
        tiny_contract(used=("x", "ghost"))


@pytest.mark.parametrize("name", list(TABLES))
def test_every_row_of_a_real_table_keeps_its_own_contract(name: str, tmp_path: Path) -> None:
    """What validate lets through, serving accepts: no source row breaks a rule."""
    contract, frame = table_contract(name, tmp_path)

    assert check_rows(frame, contract) == []


def test_an_int_column_with_missing_values_is_nullable_in_the_contract(tmp_path: Path) -> None:
    contract, frame = table_contract("penguins", tmp_path)

    flipper = columns(contract)["flipper_length_mm"]
    assert frame["flipper_length_mm"].isna().any()
    assert (flipper["kind"], flipper["nullable"]) == ("int", True)


# --- comparing --------------------------------------------------------------------------------


def test_the_same_contract_has_no_differences_and_row_rules_are_not_schema() -> None:
    old = tiny_contract()
    new = copy.deepcopy(old)
    columns(new)["x"].update(min=-5, max=50, nullable=True)  # a reviewed range change
    columns(new)["color"]["values"] = ["blue", "green", "red"]

    assert contract_differences(old, old) == []
    assert contract_differences(old, new) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda c: c.update(labels=[0, 1, 2]), "labels ['0', '1'] -> ['0', '1', '2']"),
        (lambda c: c.update(target="other"), "target 'label' -> 'other'"),
        (lambda c: c["columns"].pop(0), "columns no longer taken: ['x']"),
        (lambda c: c["columns"].append(dict(c["columns"][0], name="y")), "new columns: ['y']"),
        (lambda c: c["columns"][1].update(kind="float"), "column 'n': kind 'int' -> 'float'"),
        (
            lambda c: c["columns"][4].update(format="%Y/%m/%d"),
            "column 'when': format None -> '%Y/%m/%d'",
        ),
    ],
)
def test_another_schema_or_label_set_is_named(change, expected: str) -> None:
    old = tiny_contract()
    new = copy.deepcopy(old)
    change(new)

    assert contract_differences(old, new) == [expected]


def test_which_columns_the_model_uses_is_not_a_schema_change() -> None:
    # features.datetime drop <-> calendar, drop_columns, max_category_fraction: the same source
    # columns, test split and labels go in, so the two models' metrics are comparable
    old = tiny_contract(used=("x", "n", "color"))
    new = tiny_contract(used=("x", "flag", "when"))

    assert contract_differences(old, new) == []
    assert contract_differences(new, old) == []


def test_a_signature_contract_lacks_ids_and_dates_and_types_an_int_as_double() -> None:
    # an own-data champion logged before contracts: its signature has the columns it took, an
    # int column read as double; the new contract has every source column, n as int
    legacy = contract_from_signature(
        [("x", "double", True), ("n", "double", False), ("color", "string", False)],
        ["proba_0", "proba_1"],
    )
    new = tiny_contract()
    columns(new)["when"]["format"] = "%Y/%m/%d"

    assert contract_differences(legacy, new) == []
    # still a difference: a column the old model took that is gone, a kind beyond int/float
    columns(new)["color"]["kind"] = "float"
    new["columns"] = [col for col in new["columns"] if col["name"] != "x"]
    assert contract_differences(legacy, new) == [
        "columns no longer taken: ['x']",
        "column 'color': kind 'category' -> 'float'",
    ]


def test_rule_differences_name_each_changed_row_rule() -> None:
    old = tiny_contract()
    new = copy.deepcopy(old)
    columns(new)["x"].update(max=12)
    columns(new)["color"]["values"] = ["blue", "green", "red"]

    assert rule_differences(old, old) == []
    assert rule_differences(old, new) == [
        "column 'x': max 10 -> 12",
        "column 'color': values ['blue', 'red'] -> ['blue', 'green', 'red']",
    ]


def test_a_contract_derived_from_an_old_models_signature_compares_by_label_text() -> None:
    new = build_contract(parse_suite(copy.deepcopy(SUITE)), {}, ["x", "n", "color"])
    new["columns"] = [col for col in new["columns"] if col["used"]]
    legacy = contract_from_signature(
        [("x", "double", True), ("n", "long", False), ("color", "string", False)],
        ["prediction", "proba_0", "proba_1"],
    )

    assert contract_differences(legacy, new) == []
    assert contract_differences(None, new) == [
        "the old model has no contract (and no signature to derive one from)"
    ]


# --- checking rows ----------------------------------------------------------------------------


def test_unseen_category_absurd_value_and_all_null_rows_are_named() -> None:
    contract = tiny_contract({"x": ColumnRuleParams(positive=True)})
    frame = pd.DataFrame(
        {
            "x": [1.0, 5.0, 1e30, None, -0.0, 2.0],
            "n": pd.array([1, None, 3, None, 4, 5], dtype="Int64"),
            "color": ["red", "purple", "blue", None, "blue", "red"],
            "flag": [True, None, None, None, None, None],  # unused: never checked
            "when": ["not a date"] * 6,  # unused: never checked
        }
    )

    found = [(v.row, v.column, v.rule, v.value) for v in check_rows(frame, contract)]

    assert found == [
        (1, "color", "in_set", "purple"),
        (2, "x", "between", 1e30),
        (3, "x", "not_null", None),
        (3, ALL_COLUMNS, "all_null", None),
        (4, "x", "positive", -0.0),
    ]


def test_an_absent_column_is_missing_and_a_bad_text_date_breaks_date_format() -> None:
    contract = tiny_contract(used=("x", "when"))
    columns(contract)["when"]["format"] = "%Y/%m/%d"
    frame = pd.DataFrame({"when": ["2012/01/31", "2012-02-01", "31.01.2012"]})

    found = [(v.row, v.column, v.rule) for v in check_rows(frame, contract)]

    assert found == [
        (0, "x", "not_null"),
        (1, "x", "not_null"),
        (2, "x", "not_null"),
        (2, "when", "date_format"),
    ]


def test_a_text_date_is_judged_by_the_parser_validate_and_the_preprocessor_use() -> None:
    """``%b`` takes a full month name in Arrow's strptime (validate's and the preprocessor's
    parser), not in Python's: serving must agree with them, not with Python."""
    contract = tiny_contract(used=("x", "when"))
    columns(contract)["when"]["format"] = "%b %d %Y"
    texts = ["January 05 2012", "Jan 5 2000", "September 30 2001", "2012-02-01", "Foo 05 2012"]
    frame = pd.DataFrame({"x": [1.0] * len(texts), "when": texts})

    found = [(v.row, v.column, v.rule) for v in check_rows(frame, contract)]

    assert found == [(4, "when", "date_format")]
    validated, _ = cast_column(
        pa.array(texts[:3]),
        "datetime",
        pa.timestamp("us"),
        "data.csv",
        "when",
        date_format="%b %d %Y",
    )  # raises if not
    assert validated.to_pylist()[0] == datetime(2012, 1, 5)
    assert to_datetimes(pd.Series(texts[:4]), "%b %d %Y", "when").notna().all()
    with pytest.raises(DataError, match="Foo 05 2012"):
        to_datetimes(pd.Series(texts), "%b %d %Y", "when")


# --- files ------------------------------------------------------------------------------------


def test_a_saved_contract_loads_back_the_same(tmp_path: Path) -> None:
    contract = tiny_contract()

    assert load_contract(save_contract(contract, tmp_path / "contract.json")) == contract


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "contract file not found"),
        ("{", "not valid JSON"),
        ('{"columns": 3}', "not a model input contract"),
    ],
)
def test_a_bad_contract_file_is_a_config_error_naming_it(
    tmp_path: Path, text: str | None, message: str
) -> None:
    path = tmp_path / "contract.json"
    if text is not None:
        path.write_text(text)

    with pytest.raises(ConfigError, match=message):
        load_contract(path)
