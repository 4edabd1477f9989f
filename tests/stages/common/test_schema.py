"""Schema model and profiler: parsing names the bad field; a profile loads back as a schema.

No Great Expectations here: running a schema's suite is tested in tests/stages/test_validate.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stages.common.errors import ConfigError, DataError
from stages.common.schema import (
    SCHEMA_HEADER,
    load_schema,
    parse_schema,
    profile_frame,
    render_schema,
)
from tests.builders import SCHEMA

ROOT = Path(__file__).resolve().parents[3]


def snapshot() -> pd.DataFrame:
    return pd.DataFrame({
        "x": [0.5, 1.5, 9.5, 3.0],
        "n": [1.0, np.nan, 3.0, 4.0],
        "color": pd.Series(["red", "blue", "red", "red"]),  # pandas 3: the new `str` dtype
        "label": [0, 1, 0, 1],
        "flag": [True, False, True, True],
    })


# ----------------------------------------------------------------------------- parse / load


def test_parse_schema_names_the_bad_field() -> None:
    bad = {**SCHEMA, "columns": {**SCHEMA["columns"], "x": {"type": "decimal"}}}

    with pytest.raises(ConfigError, match=r"my\.yaml: invalid schema: columns\.x\.type"):
        parse_schema(bad, "my.yaml")


@pytest.mark.parametrize("change, message", [
    ({"target": {"name": "y", "labels": [0]}}, "target.name 'y' is not one of the columns"),
    ({"target": {"name": "label", "labels": []}}, "target.labels"),
    ({"columns": {"label": {"type": "int", "min": 5, "max": 1}}}, "min 5 is greater than max 1"),
    ({"rows": {"min": -1}}, "rows.min"),
])
def test_parse_schema_rejects_inconsistent_rules(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_schema({**SCHEMA, **change})


@pytest.mark.parametrize("text, message", [
    (None, r"schema file not found \(params validate\.schema_path; write one with --profile\)"),
    ("columns: [unclosed", "not valid YAML"),
])
def test_load_schema_names_the_file(text: str | None, message: str, tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    if text is not None:
        path.write_text(text)

    with pytest.raises(ConfigError, match=message) as info:
        load_schema(path)

    assert str(info.value).startswith(f"{path}: ")


def test_schema_module_imports_without_great_expectations_or_pandas() -> None:
    code = ("import sys, stages.common.schema; "
            "print(sorted({'great_expectations', 'pandas'} & set(sys.modules)))")

    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout

    assert out.strip() == "[]"


# ----------------------------------------------------------------------------- profiling


def test_profile_widens_ranges_and_loads_back(tmp_path: Path) -> None:
    raw = profile_frame(snapshot(), "label", margin=0.1)
    path = tmp_path / "schema.yaml"
    path.write_text(render_schema(raw, "test"))
    schema = load_schema(path)

    assert raw["columns"]["x"] == {"type": "float", "min": 0.0, "max": 10.4, "nullable": False}
    assert raw["columns"]["n"]["nullable"] and raw["columns"]["n"]["type"] == "float"
    assert raw["columns"]["color"] == {"type": "category", "values": ["blue", "red"],
                                       "nullable": False}
    assert raw["columns"]["flag"]["type"] == "bool"
    assert raw["target"] == {"name": "label", "labels": [0, 1]}
    assert raw["rows"] == {"min": 2, "max": 40}
    assert path.read_text().startswith(SCHEMA_HEADER.format(origin="test"))
    assert schema.model_dump() == parse_schema(raw).model_dump()


@pytest.mark.parametrize("values, expected", [
    ([-1.5, 9.5], (-2.6, 10.6)),  # negatives: the low bound may go below 0
    ([17.6, 17.6], (15.84, 19.36)),  # no span: widen by the value itself
    ([2, 7], (1, 8)),  # ints stay whole numbers
])
def test_profile_rounds_ranges_outwards(values: list, expected: tuple) -> None:
    df = pd.DataFrame({"v": values, "label": [0, 1]})

    rule = profile_frame(df, "label")["columns"]["v"]

    assert (rule["min"], rule["max"]) == expected


def test_profile_without_the_target_column_fails_naming_it() -> None:
    with pytest.raises(DataError, match="target column 'y' is not in the data") as info:
        profile_frame(snapshot(), "y")

    assert info.value.column == "y" and info.value.rule == "target_present"


@pytest.mark.parametrize("name", ["breast_cancer", "digits"])
def test_committed_schema_loads_and_carries_the_format_header(name: str) -> None:
    path = ROOT / "schemas" / f"{name}.yaml"

    schema = load_schema(path)

    assert schema.target.name == "target"
    lines = path.read_text(encoding="utf-8").splitlines()
    header = SCHEMA_HEADER.format(origin="(written by --profile)").splitlines()
    assert lines[0] == header[0]
    assert all(line in lines for line in header[2:])  # the format documentation, verbatim
