"""The catalogue of bad inputs: each one stops the data stages with a message naming the file,
the column and the rule, and leaves every data output exactly as it was.

The real ingest, validate (streaming gate + Great Expectations) and features stages run in
process on a workspace that already holds a good run's outputs; each case feeds them one kind
of bad source. The README's "Bad input" table lists the same kinds.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.synth import make_chunk
from stages.common.config import Params, parse_params
from stages.common.errors import PipelineError
from stages.features import stage as features
from stages.ingest import stage as ingest
from stages.validate import stage as validate

ROWS = 3000
BAD_SHARE = 0.05  # of the rows: over validate.max_bad_fraction (1%), so the run must stop
OUTPUTS = ("data/raw", "data/validated", "data/quarantine", "data/features")
# the outputs after each stage, which a stage that refuses its input must leave alone
DOWNSTREAM = {"ingest": OUTPUTS, "validate": OUTPUTS[1:]}


def make_params(root: Path, source: str, **sections: dict) -> Params:
    raw = {
        "base": {"batch_rows": 1000},
        "mlflow": {"tracking_uri": f"sqlite:///{root.parent / 'mlflow.db'}"},
        "ingest": {
            "source": str(root / "data/source" / source),
            "target": "target",
            "data_root": str(root / "data/source"),
        },
        "validate": {"suite_path": str(root / "suites/data.json")},
        "features": {"drop_columns": ["id"]},
    }
    for name, section in sections.items():
        raw[name] = {**raw.get(name, {}), **section}
    return parse_params(raw)


def run_data_stages(root: Path, params: Params) -> None:
    """ingest -> validate -> features, as dvc.yaml runs them."""
    ingest.run(params.ingest, root / "data/raw", params.base.batch_rows)
    validate.run(
        root / "data/raw",
        root / "data/validated",
        root / "data/quarantine",
        root / "reports/validation",
        params,
    )
    features.run(root / "data/validated", root / "data/features", params)


def good_frame() -> pd.DataFrame:
    """Synthetic rows (bench/synth.py): ids, timestamps, floats with gaps, text, a 0/1 target."""
    return make_chunk(0, ROWS, seed=7).to_pandas()


@pytest.fixture(scope="module")
def good_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace after a good run, and the suite profiled from that run's data."""
    root = tmp_path_factory.mktemp("bad-inputs") / "good"
    (root / "data/source").mkdir(parents=True)
    good_frame().to_csv(root / "data/source/good.csv", index=False)
    params = make_params(root, "good.csv")
    ingest.run(params.ingest, root / "data/raw", params.base.batch_rows)
    validate.write_suite(root / "data/raw", root / "suites/data.json", "target", 0.1, 1000)
    run_data_stages(root, params)
    return root


def snapshot(root: Path, outputs: tuple[str, ...] = OUTPUTS) -> dict[str, str]:
    """Every file of ``outputs`` and its md5."""
    return {
        str(path.relative_to(root)): hashlib.md5(path.read_bytes()).hexdigest()
        for out in outputs
        for path in sorted((root / out).rglob("*"))
        if path.is_file()
    }


def some_rows(frame: pd.DataFrame, share: float = BAD_SHARE) -> pd.Index:
    return frame.index[:: int(1 / share)]


# ----------------------------------------------------------------------------- the cases
# Each writes its bad source under data/source and returns (source name, params overrides).

Writer = Callable[[Path, pd.DataFrame], tuple[str, dict]]


def _csv(frame: pd.DataFrame, folder: Path, name: str = "bad.csv", **options) -> str:
    frame.to_csv(folder / name, index=False, **options)
    return name


def zero_byte(folder: Path, frame: pd.DataFrame) -> tuple[str, dict]:
    (folder / "bad.csv").write_bytes(b"")
    return "bad.csv", {}


def header_only(folder: Path, frame: pd.DataFrame) -> tuple[str, dict]:
    return _csv(frame.head(0), folder), {}


def not_utf8(folder: Path, frame: pd.DataFrame) -> tuple[str, dict]:
    frame = frame.copy()
    frame.loc[frame.index[5], "region"] = "région"
    return _csv(frame, folder, encoding="latin-1"), {}


def wrong_delimiter(folder: Path, frame: pd.DataFrame) -> tuple[str, dict]:
    return _csv(frame, folder, sep=";"), {}


def duplicated_header(folder: Path, frame: pd.DataFrame) -> tuple[str, dict]:
    half = len(frame) // 2  # two exports pasted together, header and all
    text = frame.iloc[:half].to_csv(index=False) + frame.iloc[half:].to_csv(index=False)
    (folder / "bad.csv").write_text(text)
    return "bad.csv", {}


def partition_schema_mismatch(folder: Path, frame: pd.DataFrame) -> tuple[str, dict]:
    parts = folder / "parts"
    parts.mkdir()
    half = len(frame) // 2
    frame.iloc[:half].to_parquet(parts / "part-0.parquet", index=False)
    other = frame.iloc[half:].copy()
    other["x0"] = other["x0"].astype(str)
    other.to_parquet(parts / "part-1.parquet", index=False)
    return "parts", {}


def escapes_data_root(folder: Path, frame: pd.DataFrame) -> tuple[str, dict]:
    frame.to_csv(folder.parent / "outside.csv", index=False)
    return "../outside.csv", {}


def missing_source(folder: Path, frame: pd.DataFrame) -> tuple[str, dict]:
    return "nowhere.csv", {}


def corrupt_parquet(folder: Path, frame: pd.DataFrame) -> tuple[str, dict]:
    frame.to_parquet(folder / "bad.parquet", index=False)
    data = (folder / "bad.parquet").read_bytes()
    (folder / "bad.parquet").write_bytes(data[: len(data) // 2])  # a copy cut short
    return "bad.parquet", {}


def missing_target(folder: Path, frame: pd.DataFrame) -> tuple[str, dict]:
    return _csv(frame.drop(columns=["target"]), folder), {}


def renamed_column(folder: Path, frame: pd.DataFrame) -> tuple[str, dict]:
    return _csv(frame.rename(columns={"x0": "x_0"}), folder), {}


def extra_column(folder: Path, frame: pd.DataFrame) -> tuple[str, dict]:
    return _csv(frame.assign(notes="n/a"), folder), {}


def text_in_numeric(folder: Path, frame: pd.DataFrame) -> tuple[str, dict]:
    frame = frame.astype({"x1": object})
    frame.loc[frame.index[3], "x1"] = "twelve"
    return _csv(frame, folder), {}


def mixed_date_formats(folder: Path, frame: pd.DataFrame) -> tuple[str, dict]:
    stamps = frame["event_time"].dt.strftime("%Y-%m-%d %H:%M:%S").astype(object)
    late = frame.index[len(frame) // 2 :]
    stamps[late] = frame.loc[late, "event_time"].dt.strftime("%d/%m/%Y %H:%M:%S")
    return _csv(frame.assign(event_time=stamps), folder), {}


def nan_and_inf(folder: Path, frame: pd.DataFrame) -> tuple[str, dict]:
    frame = frame.copy()
    frame.loc[some_rows(frame), "x0"] = np.inf
    frame.loc[some_rows(frame, 0.03), "x0"] = np.nan  # x0 has no gaps in the trusted data
    return _csv(frame, folder), {}


def duplicated_rows(folder: Path, frame: pd.DataFrame) -> tuple[str, dict]:
    return _csv(pd.concat([frame, frame.iloc[:300]], ignore_index=True), folder), {}


def one_class(folder: Path, frame: pd.DataFrame) -> tuple[str, dict]:
    return _csv(frame.assign(target=1), folder), {}


def all_null_target(folder: Path, frame: pd.DataFrame) -> tuple[str, dict]:
    frame.assign(target=pd.array([None] * len(frame), "Int64")).to_parquet(
        folder / "bad.parquet", index=False
    )
    return "bad.parquet", {}


def unknown_label(folder: Path, frame: pd.DataFrame) -> tuple[str, dict]:
    frame = frame.copy()
    frame.loc[some_rows(frame), "target"] = 7
    return _csv(frame, folder), {}


def out_of_range(folder: Path, frame: pd.DataFrame) -> tuple[str, dict]:
    frame = frame.copy()
    frame.loc[some_rows(frame), "x1"] = 1000.0  # the trusted data is within 0..100
    return _csv(frame, folder), {}


def too_many_nulls(folder: Path, frame: pd.DataFrame) -> tuple[str, dict]:
    frame = frame.copy()
    frame.loc[frame.index[::2], "x3"] = np.nan  # the trusted data had about 2% missing
    return _csv(frame, folder), {}


def too_few_rows(folder: Path, frame: pd.DataFrame) -> tuple[str, dict]:
    return _csv(frame.head(20), folder), {}


def breaks_a_params_rule(folder: Path, frame: pd.DataFrame) -> tuple[str, dict]:
    frame = frame.copy()
    frame.loc[some_rows(frame), "count"] = 0  # fine for the suite, not for the params rule
    return _csv(frame, folder), {"validate": {"rules": {"count": {"positive": True}}}}


@dataclass(frozen=True)
class Case:
    write: Writer
    file: str  # a fragment of the file named in the message
    column: str | None
    rule: str

    @property
    def stage(self) -> str:
        """The stage that must refuse it: validate names the ingested data, ingest the source."""
        return "validate" if self.file == "data/raw" else "ingest"


CASES = [
    Case(zero_byte, "bad.csv", None, "not_empty"),
    Case(header_only, "bad.csv", None, "not_empty"),
    Case(not_utf8, "bad.csv", "region", "utf8"),
    Case(wrong_delimiter, "bad.csv", None, "delimiter"),
    Case(duplicated_header, "bad.csv", None, "duplicate_header"),
    Case(partition_schema_mismatch, "part-1.parquet", "x0", "same_schema"),
    Case(escapes_data_root, "outside.csv", None, "inside_data_root"),
    Case(missing_source, "nowhere.csv", None, "exists"),
    Case(corrupt_parquet, "bad.parquet", None, "parquet"),
    Case(missing_target, "bad.csv", "target", "target_present"),
    Case(renamed_column, "data/raw", "x0", "columns"),
    Case(extra_column, "data/raw", "notes", "columns"),
    Case(text_in_numeric, "data/raw", "x1", "type"),
    Case(mixed_date_formats, "data/raw", "event_time", "date_format"),
    Case(nan_and_inf, "data/raw", "x0", "finite"),
    Case(duplicated_rows, "data/raw", None, "duplicates"),
    Case(one_class, "data/raw", "target", "one_class"),
    Case(all_null_target, "data/raw", "target", "all_null"),
    Case(unknown_label, "data/raw", "target", "label"),
    Case(out_of_range, "data/raw", "x1", "between"),
    Case(too_many_nulls, "data/raw", "x3", "null_fraction"),
    Case(too_few_rows, "data/raw", None, "row_count"),
    Case(breaks_a_params_rule, "data/raw", "count", "positive"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.write.__name__ for case in CASES])
def test_bad_input_stops_with_file_column_rule_and_changes_nothing(
    good_workspace: Path, tmp_path: Path, case: Case
) -> None:
    root = tmp_path / "ws"
    shutil.copytree(good_workspace, root)
    before = snapshot(root, DOWNSTREAM[case.stage])
    source, overrides = case.write(root / "data/source", good_frame())
    params = make_params(root, source, **overrides)

    with pytest.raises(PipelineError) as caught:
        run_data_stages(root, params)

    message = str(caught.value)
    assert case.file in message, message
    assert f"rule={case.rule}" in message, message
    if case.column is not None:
        assert f"column={case.column}" in message, message
    assert snapshot(root, DOWNSTREAM[case.stage]) == before


def test_the_catalogue_has_at_least_15_kinds() -> None:
    assert len({case.write for case in CASES}) >= 15


def test_the_good_workspace_ran_every_stage(good_workspace: Path) -> None:
    meta = pq.read_metadata(good_workspace / "data/validated/data.parquet")
    assert meta.num_rows == ROWS
    assert (good_workspace / "data/features/meta.json").is_file()
    assert pa.types.is_timestamp(
        pq.read_schema(good_workspace / "data/validated/data.parquet").field("event_time").type
    )
