"""Validate stage: the streaming gate's dataset-level failures, GX, the report, MLflow, the CLI.

Real Great Expectations (an ephemeral context) and a real sqlite MLflow store; no mocks.
Row-level quarantine is tested in tests/stages/validate/test_quarantine.py, the suite file (writing,
loading) in tests/stages/common/test_suite.py. Test inputs are ``data/raw`` as ingest writes it:
Parquet part files plus manifest.json.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from stages.common.config import Params, parse_params
from stages.common.errors import ConfigError, DataError, GateError
from stages.ingest.stage import load_sklearn_dataset
from stages.validate import stage as validate
from tests.builders import SUITE

ROOT = Path(__file__).resolve().parents[3]
PREVIOUS = b"previous output, must survive a failed run"


# ----------------------------------------------------------------------------- inputs


def good_table(rows: int = 40) -> pa.Table:
    """Rows that pass SUITE: every column type, a few nulls where the suite allows them."""
    return pa.table(
        {
            "x": pa.array([(i % 19) * 0.5 + 0.5 for i in range(rows)], pa.float64()),
            "n": pa.array([None if i % 10 == 9 else i + 1 for i in range(rows)], pa.int64()),
            "color": pa.array(["red" if i % 3 else "blue" for i in range(rows)]),
            "flag": pa.array([i % 2 == 0 for i in range(rows)]),
            "when": pa.array(
                [datetime(2024, 1, 1 + i % 28) for i in range(rows)], pa.timestamp("us")
            ),
            "label": pa.array([i % 2 for i in range(rows)], pa.int64()),
        }
    )


def with_column(
    table: pa.Table, name: str, values: list, kind: pa.DataType | None = None
) -> pa.Table:
    array = pa.array(values, kind)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, array)
    return table.append_column(name, array)


def write_raw(folder: Path, table: pa.Table, parts: int = 2) -> Path:
    """``folder`` as ingest writes data/raw: part files (one schema) plus manifest.json."""
    folder.mkdir(parents=True, exist_ok=True)
    size = -(-table.num_rows // parts) if table.num_rows else 0
    entries = []
    for index in range(parts):
        part = table.slice(index * size, size) if size else table
        name = f"part-{index:05d}.parquet"
        pq.write_table(part, folder / name)
        entries.append({"file": name, "rows": part.num_rows, "watermark_max": None})
    (folder / "manifest.json").write_text(
        json.dumps({"source": "test", "rows": table.num_rows, "parts": entries, "watermark": None})
    )
    return folder


def write_suite_file(path: Path, raw: dict = SUITE) -> Path:
    path.write_text(json.dumps(raw))
    return path


def make_params(suite_path: Path, **validate_params: object) -> Params:
    return parse_params(
        {
            "ingest": {"target": "label"},
            "base": {"batch_rows": 16},
            "validate": {"suite_path": str(suite_path), **validate_params},
        }
    )


def stage_dirs(tmp_path: Path) -> dict[str, Path]:
    """raw/ (empty), and validated/, quarantine/ and report/ holding an earlier run."""
    dirs = {name: tmp_path / name for name in ("raw", "validated", "quarantine", "report")}
    for name in ("validated", "quarantine", "report"):
        dirs[name].mkdir()
    (dirs["validated"] / validate.DATA_FILE).write_bytes(PREVIOUS)
    (dirs["quarantine"] / validate.QUARANTINE_FILE).write_bytes(PREVIOUS)
    (dirs["report"] / "summary.json").write_text('{"previous": true}')
    return dirs


def run_gate(dirs: dict[str, Path], params: Params) -> dict:
    return validate.run(dirs["raw"], dirs["validated"], dirs["quarantine"], dirs["report"], params)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One MLflow store for the gate-failure tests (each failure logs a run)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


# ----------------------------------------------------------------------------- dataset level


def _header_repeated(table: pa.Table) -> pa.Table:
    text = pa.table({name: table.column(name).cast(pa.string()) for name in table.column_names})
    header = pa.table({name: [name] for name in table.column_names})
    return pa.concat_tables([text.slice(0, 5), header, text.slice(5)])


def _duplicated(table: pa.Table) -> pa.Table:
    return pa.concat_tables([table, table.slice(0, 4)])  # 4 of 44 rows repeat earlier ones


DATASET_FAILURES: dict[str, tuple[Callable[[pa.Table], pa.Table], str | None, str, str]] = {
    # case: (change, column, rule, words in the message)
    "missing column": (lambda t: t.drop_columns(["x", "n"]), "x", "columns", "missing ['x'"),
    "extra column": (
        lambda t: with_column(t, "extra", [1] * t.num_rows),
        "extra",
        "columns",
        "unexpected ['extra']",
    ),
    "renamed column": (
        lambda t: t.rename_columns(["radius" if c == "x" else c for c in t.column_names]),
        "x",
        "columns",
        "was it renamed",
    ),
    "text in a float column": (
        lambda t: with_column(t, "x", ["1.5"] * 39 + ["twelve"]),
        "x",
        "type",
        "values that are not numbers, e.g. ['twelve']",
    ),
    "fraction in an int column": (
        lambda t: with_column(t, "n", [1.0] * 39 + [2.5]),
        "n",
        "type",
        "fractions",
    ),
    "bool column holding numbers": (
        lambda t: with_column(t, "flag", [1] * t.num_rows),
        "flag",
        "type",
        "does not fit",
    ),
    "mixed date formats": (
        lambda t: with_column(t, "when", ["2024-01-31"] * 20 + ["31/01/2024"] * 20),
        "when",
        "date_format",
        "mixes date formats, e.g. '2024-01-31' and '31/01/2024'",
    ),
    "dates that are not dates": (
        lambda t: with_column(t, "when", ["soon"] * t.num_rows),
        "when",
        "date_format",
        "not an ISO 8601 date, e.g. 'soon'",
    ),
    "no rows": (lambda t: t.slice(0, 0), None, "not_empty", "no data rows"),
    "duplicated header": (_header_repeated, None, "duplicated_header", "row 5 repeats"),
    "too few rows": (lambda t: t.slice(0, 1), None, "row_count", "outside the suite's bounds"),
    "all-null target": (
        lambda t: with_column(t, "label", [None] * t.num_rows, pa.int64()),
        "label",
        "all_null",
        "null in every row",
    ),
    "one class only": (
        lambda t: with_column(t, "label", [1] * t.num_rows),
        "label",
        "one_class",
        "one class only [1]",
    ),
    "too many nulls (mostly)": (
        lambda t: with_column(t, "n", [None if i % 2 else i for i in range(40)], pa.int64()),
        "n",
        "null_fraction",
        "50.00% null, above the 20.00%",
    ),
    "duplicated rows": (_duplicated, None, "duplicates", "9.09% of rows are duplicates"),
}


@pytest.mark.parametrize("case", DATASET_FAILURES)
def test_dataset_level_failure_stops_and_changes_nothing(
    case: str, tmp_path: Path, shared_store: str
) -> None:
    change, column, rule, words = DATASET_FAILURES[case]
    dirs = stage_dirs(tmp_path)
    write_raw(dirs["raw"], change(good_table()))
    before = {name: snapshot(dirs[name]) for name in ("validated", "quarantine")}

    with pytest.raises(GateError) as info:
        run_gate(dirs, make_params(write_suite_file(tmp_path / "s.json")))

    error = info.value
    assert (error.rule, error.column) == (rule, column)
    assert words in str(error) and f"rule={rule}" in str(error)
    assert str(dirs["raw"]) in error.file  # the folder, or the part file that holds the row
    assert {name: snapshot(dirs[name]) for name in before} == before
    summary = json.loads((dirs["report"] / "summary.json").read_text())  # the report is new
    assert summary["success"] is False and summary["failed"][0]["rule"] == rule


def _with_date_format(fmt: str) -> dict:
    """SUITE with ``when`` held as text in format ``fmt``."""
    return {
        **SUITE,
        "expectations": [
            {**e, "meta": {"format": fmt}}
            if e["type"].endswith("type_list") and e["kwargs"]["column"] == "when"
            else e
            for e in SUITE["expectations"]
        ],
    }


def test_gate_parses_text_dates_with_the_suite_format(tmp_path: Path) -> None:
    from importlib.resources import files

    import pyarrow.csv as pacsv

    csv = Path(str(files("vega_datasets") / "_data" / "seattle-weather.csv"))  # 2012/01/01
    suite_path = tmp_path / "seattle.json"
    validate.write_suite(csv, suite_path, "weather", 0.1, 1000)
    dirs = stage_dirs(tmp_path)
    table = pacsv.read_csv(csv)
    assert table.schema.field("date").type == pa.string()  # Arrow's CSV reader keeps it text
    write_raw(dirs["raw"], table)
    params = parse_params(
        {
            "ingest": {"target": "weather"},
            "base": {"batch_rows": 256},
            "validate": {"suite_path": str(suite_path)},
        }
    )

    summary = run_gate(dirs, params)

    out = pq.read_table(dirs["validated"] / validate.DATA_FILE)
    assert out.schema.field("date").type == pa.timestamp("us")
    assert out.schema.field("date").metadata == {b"format": b"%Y/%m/%d"}  # for features
    dates = out.column("date")
    assert (dates[0].as_py(), dates[-1].as_py()) == (datetime(2012, 1, 1), datetime(2015, 12, 31))
    assert summary["bad_rows"] == 0 and summary["gx"]["success"]


def test_text_dates_off_the_suite_format_stop_naming_format_and_example(
    tmp_path: Path, shared_store: str
) -> None:
    dirs = stage_dirs(tmp_path)
    dates = [f"2024/01/{1 + i % 28:02d}" for i in range(39)] + ["2024-01-31"]
    write_raw(dirs["raw"], with_column(good_table(), "when", dates))
    before = {name: snapshot(dirs[name]) for name in ("validated", "quarantine")}

    with pytest.raises(GateError) as info:
        run_gate(
            dirs, make_params(write_suite_file(tmp_path / "s.json", _with_date_format("%Y/%m/%d")))
        )

    error = info.value
    assert (error.rule, error.column) == ("date_format", "when")
    assert "does not match the suite's date format '%Y/%m/%d', e.g. '2024-01-31'" in str(error)
    assert error.file == str(dirs["raw"] / "part-00001.parquet")  # the part holding it
    assert {name: snapshot(dirs[name]) for name in before} == before


@pytest.mark.parametrize(
    "make, rule",
    [
        (lambda raw: None, "exists"),
        (lambda raw: (raw / "part-00000.parquet").write_bytes(b""), "not_empty"),
        (lambda raw: (raw / "part-00000.parquet").write_bytes(b"PAR1" + b"\0" * 40), "parquet"),
        (
            lambda raw: (
                write_raw(raw, good_table())
                and pq.write_table(good_table().drop_columns(["flag"]), raw / "part-00009.parquet")
            ),
            "same_schema",
        ),
    ],
)
def test_unreadable_raw_data_changes_nothing(
    make: Callable[[Path], None], rule: str, tmp_path: Path
) -> None:
    dirs = stage_dirs(tmp_path)
    if rule != "exists":
        dirs["raw"].mkdir()
    make(dirs["raw"])
    before = {name: snapshot(dirs[name]) for name in ("validated", "quarantine", "report")}

    with pytest.raises(DataError) as info:
        run_gate(dirs, make_params(write_suite_file(tmp_path / "s.json")))

    assert info.value.rule == rule and str(dirs["raw"]) in info.value.file
    assert {name: snapshot(dirs[name]) for name in before} == before


def test_suite_target_must_match_params_target(tmp_path: Path) -> None:
    dirs = stage_dirs(tmp_path)
    write_raw(dirs["raw"], good_table())
    params = parse_params(
        {
            "ingest": {"target": "diagnosis"},
            "validate": {"suite_path": str(write_suite_file(tmp_path / "s.json"))},
        }
    )

    with pytest.raises(ConfigError, match=r"differs from params ingest\.target 'diagnosis'"):
        run_gate(dirs, params)

    assert (dirs["validated"] / validate.DATA_FILE).read_bytes() == PREVIOUS


@pytest.mark.parametrize(
    "rules, message",
    [
        ({"radius": {"positive": True}}, r"names \['radius'\], not columns of"),
        ({"color": {"min": 1}}, "min/max/positive need a numeric column"),
    ],
)
def test_params_rules_must_fit_the_suite(rules: dict, message: str, tmp_path: Path) -> None:
    dirs = stage_dirs(tmp_path)
    write_raw(dirs["raw"], good_table())

    with pytest.raises(ConfigError, match=message):
        run_gate(dirs, make_params(write_suite_file(tmp_path / "s.json"), rules=rules))


# ----------------------------------------------------------------------------- GX


def test_gx_verdict_is_a_gate_too(tmp_path: Path, shared_store: str) -> None:
    """An expectation only GX evaluates (here, on the mean) fails the run on its own."""
    raw = {
        **SUITE,
        "expectations": [
            *SUITE["expectations"],
            {
                "type": "expect_column_mean_to_be_between",
                "kwargs": {"column": "x", "min_value": 50, "max_value": 60},
            },
        ],
    }
    dirs = stage_dirs(tmp_path)
    write_raw(dirs["raw"], good_table())
    before = snapshot(dirs["validated"])

    with pytest.raises(GateError, match="Great Expectations failed on the validated rows") as info:
        run_gate(dirs, make_params(write_suite_file(tmp_path / "s.json", raw)))

    assert (info.value.column, info.value.rule) == ("x", "expect_column_mean_to_be_between")
    assert snapshot(dirs["validated"]) == before
    assert (dirs["report"] / "result.json").exists()
    assert (dirs["report"] / "docs" / "index.html").exists()


@pytest.mark.parametrize("name", ["breast_cancer", "digits"])
def test_committed_suite_accepts_its_sklearn_dataset(name: str, tmp_path: Path) -> None:
    dirs = stage_dirs(tmp_path)
    write_raw(dirs["raw"], pa.Table.from_pandas(load_sklearn_dataset(name), preserve_index=False))
    params = parse_params({"validate": {"suite_path": str(ROOT / "suites" / f"{name}.json")}})

    summary = run_gate(dirs, params)

    assert summary["success"] and summary["bad_rows"] == 0 and summary["gx"]["success"]


# ----------------------------------------------------------------------------- main


def write_params(path: Path, suite_path: str, **validate_params: object) -> None:
    path.write_text(
        yaml.safe_dump(
            {
                "ingest": {"target": "label"},
                "validate": {"suite_path": suite_path, **validate_params},
            }
        )
    )


GATE_ARGS = [
    "gate",
    "--raw",
    "data/raw",
    "--out",
    "data/validated",
    "--quarantine",
    "data/quarantine",
    "--report",
    "reports/validation",
]


def test_main_gate_writes_data_quarantine_and_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_raw(Path("data/raw"), good_table())
    write_suite_file(Path("suite.json"))
    write_params(Path("params.yaml"), "suite.json")

    assert validate.main(GATE_ARGS) == 0

    validated = pq.read_table("data/validated/data.parquet")
    assert validated.num_rows == 40 and validated.schema.field("color").type == pa.string()
    assert pq.read_table("data/quarantine/rows.parquet").num_rows == 0
    summary = json.loads(Path("reports/validation/summary.json").read_text())
    assert summary["success"] and summary["rows"] == 40 and summary["bad_fraction"] == 0
    assert json.loads(Path("reports/validation/result.json").read_text())["success"] is True
    [page] = Path("reports/validation/docs/validations/tiny").rglob("*.html")  # GX Data Docs
    assert "Succeeded" in page.read_text()
    # GX kept everything in memory: no gx/ project folder, nothing else in the cwd
    assert sorted(p.name for p in Path().iterdir()) == [
        "data",
        "params.yaml",
        "reports",
        "suite.json",
    ]


def test_main_failure_logs_a_failed_run_to_mlflow(
    tmp_path: Path,
    mlflow_uri: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import mlflow

    monkeypatch.chdir(tmp_path)
    write_raw(Path("data/raw"), good_table().drop_columns(["flag"]))
    write_suite_file(Path("suite.json"))
    write_params(Path("params.yaml"), "suite.json")

    assert validate.main(GATE_ARGS) == 1

    assert "columns differ from the suite: missing ['flag']" in caplog.text
    assert "[file=data/raw, column=flag, rule=columns]" in caplog.text
    assert not Path("data/validated").exists() and not Path("data/quarantine").exists()
    mlflow.set_tracking_uri(mlflow_uri)
    [run] = mlflow.search_runs(experiment_names=["pipeline"], output_format="list")
    assert run.info.run_name == "validation-failed" and run.info.status == "FAILED"
    assert "git.commit" in run.data.tags and run.data.tags["stage"] == "validate"
    artifacts = {
        a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "validation")
    }
    assert artifacts == {"validation/summary.json"}


@pytest.mark.parametrize("snapshot_kind", ["parquet folder", "csv"])
def test_main_suite_writes_a_suite_the_gate_accepts(
    snapshot_kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_raw(Path("data/raw"), good_table())
    write_params(Path("params.yaml"), "suites/mine.json")
    source = "data/raw"
    if snapshot_kind == "csv":
        from pyarrow import csv

        csv.write_csv(good_table(), "snap.csv")
        source = "snap.csv"

    assert validate.main(["suite", "--snapshot", source, "--out", "suites/mine.json"]) == 0

    raw = json.loads(Path("suites/mine.json").read_text())
    assert raw["meta"]["target"] == "label" and raw["meta"]["profiled_from"]["rows"] == 40
    assert validate.main(GATE_ARGS) == 0


def test_suite_from_a_header_only_csv_names_the_file_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    write_params(Path("params.yaml"), "suites/mine.json")
    Path("snap.csv").write_text("x,n,color,flag,when,label\n")  # ingest's CSV reader refuses it

    assert validate.main(["suite", "--snapshot", "snap.csv", "--out", "suites/mine.json"]) == 1

    assert "file=snap.csv" in caplog.text and "rule=not_empty" in caplog.text
    assert not Path("suites/mine.json").exists()


def test_help_shows_both_commands_with_examples(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        validate.main(["--help"])

    text = capsys.readouterr().out
    assert "gate" in text and "suite" in text
    assert "python -m stages.validate suite --snapshot data/raw --out suites/mine.json" in text
