"""Validate stage: the GX suite built from a schema, the gate, the report, MLflow on failure.

Real Great Expectations (an ephemeral context) and a real sqlite MLflow store; no mocks.
Parsing schemas and profiling data (no GX) are tested in tests/stages/common/test_schema.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from stages import validate
from stages.common.config import MlflowParams
from stages.common.errors import ConfigError, DataError, GateError
from stages.common.schema import Schema, load_schema, parse_schema, profile_frame, render_schema
from stages.ingest import load_sklearn_dataset
from tests.builders import SCHEMA

ROOT = Path(__file__).resolve().parents[2]
PREVIOUS = b"previous validated data, must survive a failed run"


def tiny_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "x": [0.5, 1.5, 9.5, 3.0],
        "n": [1, 2, 3, 4],
        "color": pd.Series(["red", "blue", "red", "red"]),  # pandas 3: the new `str` dtype
        "label": [0, 1, 0, 1],
    })


@pytest.fixture(scope="module")
def schema() -> Schema:
    return parse_schema(SCHEMA)


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One MLflow store for the gate-failure tests (each failure logs a run)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


def failures(df: pd.DataFrame, schema: Schema) -> list[dict]:
    return validate.summarize_result(validate.validate_frame(df, schema), len(df))["failed"]


# ----------------------------------------------------------------------------- the suite


def test_build_expectations_follows_the_schema(schema: Schema) -> None:
    built = [(e.expectation_type, getattr(e, "column", None))
             for e in validate.build_expectations(schema)]

    assert built[:2] == [("expect_table_columns_to_match_set", None),
                         ("expect_table_row_count_to_be_between", None)]
    assert ("expect_column_values_to_not_be_null", "x") in built
    assert ("expect_column_values_to_not_be_null", "n") not in built  # nullable
    assert ("expect_column_values_to_be_between", "n") in built
    assert ("expect_column_values_to_be_in_set", "color") in built
    assert built[-1] == ("expect_column_values_to_be_in_set", "label")
    assert sum(kind == "expect_column_values_to_be_in_type_list" for kind, _ in built) == 4


# ----------------------------------------------------------------------------- running it


def test_valid_frame_passes(schema: Schema) -> None:
    result = validate.validate_frame(tiny_frame(), schema)

    assert result.success
    assert result.statistics["evaluated_expectations"] == 13


def test_type_checks_accept_every_pandas_spelling_of_a_type(schema: Schema) -> None:
    df = pd.DataFrame({
        "x": pd.Series([0.5, 1.0, 2.0, 3.0], dtype="float32"),
        "n": pd.Series([1, None, 3, 4], dtype="Int64"),  # nullable ints
        "color": pd.Series(["red", "blue", "red", "red"], dtype="category"),
        "label": pd.Series([0, 1, 0, 1], dtype="uint8"),
    })
    text_numbers = tiny_frame().assign(n=[1.0, np.nan, 3.0, 4.0],  # ints with a gap: floats
                                       color=pd.Series(["red", "blue", "red", "red"],
                                                       dtype="string[pyarrow]"))

    assert failures(df, schema) == []
    assert failures(text_numbers, schema) == []


def _set(column: str, row: int, value: object) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def change(df: pd.DataFrame) -> pd.DataFrame:
        df[column] = df[column].astype(object)
        df.loc[row, column] = value
        return df
    return change


BAD_FRAMES: dict[str, tuple[Callable[[pd.DataFrame], pd.DataFrame], str | None, str, dict]] = {
    # case: (change, failing column, expectation, expected summary fields)
    "non-numeric value (text column)": (
        lambda df: df.assign(x=["0.5", "abc", "2", "3"]), "x",
        "expect_column_values_to_be_in_type_list", {"unexpected_examples": ["abc"]}),
    "non-numeric value (mixed column)": (
        _set("x", 2, "oops"), "x", "expect_column_values_to_be_in_type_list",
        {"unexpected_examples": ["oops"]}),
    "fraction in an int column": (
        lambda df: df.assign(n=[1.0, 2.5, 3.0, 4.0]), "n",
        "expect_column_values_to_be_in_type_list", {"unexpected_examples": [2.5]}),
    "label outside the set": (
        lambda df: df.assign(label=[0, 1, 7, 1]), "label", "expect_column_values_to_be_in_set",
        {"unexpected_examples": [7]}),
    "out-of-range value": (
        _set("x", 1, 1000.0), "x", "expect_column_values_to_be_between",
        {"unexpected_count": 1, "unexpected_examples": [1000.0]}),
    "null where not nullable": (
        _set("x", 0, None), "x", "expect_column_values_to_not_be_null", {"unexpected_count": 1}),
    "unknown category": (
        lambda df: df.assign(color=["red", "green", "red", "red"]), "color",
        "expect_column_values_to_be_in_set", {"unexpected_examples": ["green"]}),
    "extra column": (
        lambda df: df.assign(extra=1), None, "expect_table_columns_to_match_set",
        {"unexpected": ["extra"]}),
    "missing column": (
        lambda df: df.drop(columns="x"), None, "expect_table_columns_to_match_set",
        {"missing": ["x"]}),
    "too few rows": (
        lambda df: df.head(1), None, "expect_table_row_count_to_be_between", {"observed": 1}),
}


@pytest.mark.parametrize("case", BAD_FRAMES)
def test_bad_frame_fails_naming_column_and_expectation(case: str,
                                                       schema: Schema) -> None:
    change, column, expectation, fields = BAD_FRAMES[case]

    failed = failures(change(tiny_frame()), schema)

    entry = next(e for e in failed if e["expectation"] == expectation and e["column"] == column)
    assert fields.items() <= entry.items()


@pytest.mark.parametrize("case, reported", [
    ("missing column", (None, "expect_table_columns_to_match_set")),
    ("non-numeric value (text column)", ("x", "expect_column_values_to_be_in_type_list")),
])
def test_follow_on_errors_are_left_out_of_the_summary(case: str, reported: tuple,
                                                      schema: Schema) -> None:
    change = BAD_FRAMES[case][0]

    failed = failures(change(tiny_frame()), schema)

    assert [(e["column"], e["expectation"]) for e in failed] == [reported]


def test_describe_failures_names_file_column_and_expectation() -> None:
    summary = {"failed": [
        {"column": None, "expectation": "expect_table_columns_to_match_set", "missing": ["x"]},
        {"column": "x", "expectation": "expect_column_values_to_be_between",
         "unexpected_count": 1, "unexpected_examples": [1000.0]},
    ]}

    text = validate.describe_failures(summary, "data/raw/data.parquet")

    assert text.splitlines() == [
        "data/raw/data.parquet: table failed expect_table_columns_to_match_set (missing=['x'])",
        "data/raw/data.parquet: column x failed expect_column_values_to_be_between "
        "(unexpected_count=1, unexpected_examples=[1000.0])",
    ]


def test_cast_to_schema_gives_schema_dtypes(schema: Schema) -> None:
    df = tiny_frame().assign(x=[1, 2, 3, 4], n=[1.0, np.nan, 3.0, 4.0])

    cast = validate.cast_to_schema(df, schema)

    assert cast.dtypes.astype(str).to_dict() == {"x": "float64", "n": "Int64",
                                                 "color": "str", "label": "int64"}
    assert cast["n"].tolist()[2:] == [3, 4]


# ----------------------------------------------------------------------------- profiling


def test_profiled_schema_accepts_its_snapshot(tmp_path: Path) -> None:
    df = tiny_frame().assign(n=[1.0, np.nan, 3.0, 4.0], flag=[True, False, True, True])
    path = tmp_path / "schema.yaml"
    path.write_text(render_schema(profile_frame(df, "label", margin=0.1), "test"))

    assert validate.validate_frame(df, load_schema(path)).success


@pytest.mark.parametrize("name", ["breast_cancer", "digits"])
def test_committed_schema_accepts_its_sklearn_dataset(name: str) -> None:
    schema = load_schema(ROOT / "schemas" / f"{name}.yaml")

    result = validate.validate_frame(load_sklearn_dataset(name), schema)

    assert result.success, validate.summarize_result(result, 0)["failed"]


# ----------------------------------------------------------------------------- run: the gate


def write_schema(path: Path, raw: dict = SCHEMA) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def stage_dirs(tmp_path: Path, df: pd.DataFrame | None) -> tuple[Path, Path, Path]:
    """raw/ holding ``df``, and validated/ and report/ already holding an earlier run."""
    raw, out, report = tmp_path / "raw", tmp_path / "validated", tmp_path / "report"
    for folder in (raw, out, report):
        folder.mkdir()
    if df is not None:
        df.to_parquet(raw / validate.DATA_FILE)
    (out / validate.DATA_FILE).write_bytes(PREVIOUS)
    (report / "summary.json").write_text('{"previous": true}')
    return raw, out, report


@pytest.mark.parametrize("case", ["non-numeric value (text column)", "label outside the set",
                                  "extra column", "missing column", "out-of-range value"])
def test_gate_failure_names_file_column_and_keeps_validated_data(
        case: str, tmp_path: Path, shared_store: str) -> None:
    change, column, expectation, _ = BAD_FRAMES[case]
    raw, out, report = stage_dirs(tmp_path, change(tiny_frame()))

    with pytest.raises(GateError) as info:
        validate.run(raw, out, report, write_schema(tmp_path / "s.yaml"), "label",
                     MlflowParams())

    where = f"column {column}" if column else "table"
    assert f"{raw / validate.DATA_FILE}: {where} failed {expectation}" in str(info.value)
    assert (out / validate.DATA_FILE).read_bytes() == PREVIOUS
    summary = json.loads((report / "summary.json").read_text())  # the report is kept
    assert summary["success"] is False and summary["rows"] == len(change(tiny_frame()))
    assert (report / "docs" / "index.html").exists() and (report / "result.json").exists()


@pytest.mark.parametrize("make, rule", [
    (lambda path: None, "exists"),
    (lambda path: path.write_bytes(b""), "not_empty"),
    (lambda path: path.write_bytes(b"PAR1" + b"\0" * 40), "parquet"),
])
def test_unreadable_raw_data_changes_nothing(make: Callable[[Path], None], rule: str,
                                             tmp_path: Path) -> None:
    raw, out, report = stage_dirs(tmp_path, None)
    make(raw / validate.DATA_FILE)

    with pytest.raises(DataError) as info:
        validate.run(raw, out, report, write_schema(tmp_path / "s.yaml"), "label",
                     MlflowParams())

    assert info.value.rule == rule and info.value.file == str(raw / validate.DATA_FILE)
    assert (out / validate.DATA_FILE).read_bytes() == PREVIOUS
    assert (report / "summary.json").read_text() == '{"previous": true}'


def test_schema_target_must_match_params_target(tmp_path: Path) -> None:
    raw, out, report = stage_dirs(tmp_path, tiny_frame())

    with pytest.raises(ConfigError, match=r"differs from params ingest\.target 'diagnosis'"):
        validate.run(raw, out, report, write_schema(tmp_path / "s.yaml"), "diagnosis",
                     MlflowParams())

    assert (out / validate.DATA_FILE).read_bytes() == PREVIOUS


# ----------------------------------------------------------------------------- main


def write_params(path: Path, schema_path: str) -> None:
    path.write_text(yaml.safe_dump({"ingest": {"target": "label"},
                                    "validate": {"schema_path": schema_path}}))


def test_main_validates_and_writes_data_and_report(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("data/raw").mkdir(parents=True)
    tiny_frame().to_parquet("data/raw/data.parquet")
    write_schema(Path("schema.yaml"))
    write_params(Path("params.yaml"), "schema.yaml")

    code = validate.main(["--raw", "data/raw", "--out", "data/validated",
                          "--report", "reports/validation"])

    assert code == 0
    validated = pd.read_parquet("data/validated/data.parquet")
    assert validated["color"].dtype == "str" and validated["x"].tolist()[0] == 0.5
    assert json.loads(Path("reports/validation/summary.json").read_text()) == {
        "success": True, "rows": 4, "failed": []}
    assert json.loads(Path("reports/validation/result.json").read_text())["success"] is True
    assert Path("reports/validation/docs/index.html").exists()  # GX Data Docs
    [page] = Path("reports/validation/docs/validations/schema").rglob("*.html")
    assert "Succeeded" in page.read_text()
    # GX kept everything in memory: no gx/ project folder, nothing else in the cwd
    assert sorted(p.name for p in Path().iterdir()) == ["data", "params.yaml", "reports",
                                                        "schema.yaml"]


def test_main_failure_logs_a_failed_run_to_mlflow(tmp_path: Path, mlflow_uri: str,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    import mlflow

    monkeypatch.chdir(tmp_path)
    Path("data/raw").mkdir(parents=True)
    tiny_frame().assign(label=[0, 1, 2, 1]).to_parquet("data/raw/data.parquet")
    write_schema(Path("schema.yaml"))
    write_params(Path("params.yaml"), "schema.yaml")

    code = validate.main(["--raw", "data/raw", "--out", "data/validated",
                          "--report", "reports/validation"])

    assert code == 1
    assert ("data/raw/data.parquet: column label failed expect_column_values_to_be_in_set"
            in caplog.text)
    assert not Path("data/validated").exists()
    mlflow.set_tracking_uri(mlflow_uri)
    [run] = mlflow.search_runs(experiment_names=["pipeline"], output_format="list")
    assert run.info.run_name == "validation-failed" and run.info.status == "FAILED"
    assert "git.commit" in run.data.tags and run.data.tags["stage"] == "validate"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id,
                                                                      "validation")}
    assert artifacts == {"validation/result.json", "validation/summary.json", "validation/docs"}


def test_main_profile_writes_a_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tiny_frame().to_parquet("snapshot.parquet")
    write_params(Path("params.yaml"), "schema.yaml")

    code = validate.main(["--profile", "snapshot.parquet", "--write-schema", "mine.yaml"])

    assert code == 0
    schema = load_schema("mine.yaml")
    assert schema.target.name == "label" and set(schema.columns) == {"x", "n", "color", "label"}
