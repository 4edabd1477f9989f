"""Ingest stage: sklearn sources, local CSV/Parquet files and folders, and every bad source."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml

from stages import ingest
from stages.common.config import IngestParams
from stages.common.errors import DataError

PREVIOUS = b"previous data.parquet, must survive a failed run"


def tiny_frame() -> pd.DataFrame:
    return pd.DataFrame({"x": [0.5, 1.5, 2.5], "color": ["red", "blue", "red"], "label": [0, 1, 0]})


def prepopulated_out(tmp_path: Path) -> Path:
    """An output folder already holding a data.parquet from an earlier run."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ingest.OUTPUT_FILE).write_bytes(PREVIOUS)
    return out


# ----------------------------------------------------------------------------- cores


def test_breast_cancer_has_underscored_float_features_and_int_target() -> None:
    df = ingest.load_sklearn_dataset("breast_cancer")

    assert df.shape == (569, 31)
    assert list(df.columns[:2]) == ["mean_radius", "mean_texture"]
    assert "worst_fractal_dimension" in df.columns
    assert (df.drop(columns="target").dtypes == "float64").all()
    assert df["target"].dtype == "int64" and set(df["target"]) == {0, 1}


def test_digits_has_row_col_pixel_columns_and_ten_labels() -> None:
    df = ingest.load_sklearn_dataset("digits", target="label")

    pixels = [f"pixel_{row}_{col}" for row in range(8) for col in range(8)]
    assert list(df.columns) == [*pixels, "label"]
    assert (df[pixels].dtypes == "float64").all()
    assert sorted(df["label"].unique()) == list(range(10))


def test_check_target_accepts_present_column() -> None:
    ingest.check_target(tiny_frame(), "label", "mine.csv")


def test_check_target_names_file_column_and_rule() -> None:
    with pytest.raises(DataError) as info:
        ingest.check_target(tiny_frame(), "diagnosis", "data/source/mine.csv")

    err = info.value
    assert (err.file, err.column, err.rule) == ("data/source/mine.csv", "diagnosis",
                                                "target_present")
    assert "'diagnosis'" in str(err) and "x, color, label" in str(err)


def test_read_source_reads_csv_and_parquet_alike(tmp_path: Path) -> None:
    tiny_frame().to_csv(tmp_path / "a.csv", index=False)
    tiny_frame().to_parquet(tmp_path / "a.parquet")

    from_csv = ingest.read_source(tmp_path / "a.csv")
    from_parquet = ingest.read_source(tmp_path / "a.parquet")

    pd.testing.assert_frame_equal(from_csv, from_parquet, check_dtype=False)
    assert from_csv["x"].tolist() == [0.5, 1.5, 2.5]


def test_read_source_concatenates_a_folder_and_skips_other_files(tmp_path: Path) -> None:
    folder = tmp_path / "source"
    folder.mkdir()
    tiny_frame().to_csv(folder / "part1.csv", index=False)
    tiny_frame()[["label", "color", "x"]].to_parquet(folder / "part2.parquet")  # column order
    (folder / "README.md").write_text("not data")

    df = ingest.read_source(folder)

    assert list(df.columns) == ["x", "color", "label"]
    assert len(df) == 6 and df.index.tolist() == list(range(6))


def test_read_source_refuses_a_folder_with_differing_columns(tmp_path: Path) -> None:
    folder = tmp_path / "source"
    folder.mkdir()
    tiny_frame().to_csv(folder / "part1.csv", index=False)
    tiny_frame().rename(columns={"x": "y"}).to_csv(folder / "part2.csv", index=False)

    with pytest.raises(DataError) as info:
        ingest.read_source(folder)

    assert info.value.rule == "same_columns"
    assert info.value.file == str(folder / "part2.csv") and info.value.column == "x"


# ----------------------------------------------------------------------------- bad sources


def _truncated_parquet(path: Path) -> None:
    tiny_frame().to_parquet(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the footer is gone


BAD_SOURCES: dict[str, tuple[str, Callable[[Path], None], str]] = {
    # case: (file name, how to make it, rule)
    "missing file": ("gone.csv", lambda path: None, "exists"),
    "empty csv": ("empty.csv", lambda path: path.write_bytes(b""), "not_empty"),
    "empty parquet": ("empty.parquet", lambda path: path.write_bytes(b""), "not_empty"),
    "header-only csv": ("header.csv", lambda path: path.write_text("x,color,label\n"),
                        "not_empty"),
    "blank csv": ("blank.csv", lambda path: path.write_text("\n\n"), "not_empty"),
    "truncated parquet": ("cut.parquet", _truncated_parquet, "parquet"),
    "corrupt parquet": ("junk.parquet", lambda path: path.write_bytes(b"PAR1 not really"),
                        "parquet"),
    "unreadable csv": ("ragged.csv", lambda path: path.write_text("x,label\n1,0\n1,2,3,4\n"),
                       "csv"),
    "unsupported extension": ("data.json", lambda path: path.write_text("{}"), "extension"),
}


@pytest.mark.parametrize("case", BAD_SOURCES)
def test_bad_source_names_file_and_rule_and_keeps_output(tmp_path: Path, case: str) -> None:
    name, make, rule = BAD_SOURCES[case]
    source = tmp_path / name
    make(source)
    out = prepopulated_out(tmp_path)

    with pytest.raises(DataError) as info:
        ingest.run(IngestParams(source=str(source), target="label"), out)

    assert info.value.rule == rule
    assert info.value.file == str(source)
    assert f"file={source}" in str(info.value) and f"rule={rule}" in str(info.value)
    assert (out / ingest.OUTPUT_FILE).read_bytes() == PREVIOUS
    assert [path.name for path in out.iterdir()] == [ingest.OUTPUT_FILE]  # no temp left


def test_missing_target_column_names_it_and_keeps_output(tmp_path: Path) -> None:
    source = tmp_path / "mine.csv"
    tiny_frame().to_csv(source, index=False)
    out = prepopulated_out(tmp_path)

    with pytest.raises(DataError) as info:
        ingest.run(IngestParams(source=str(source), target="diagnosis"), out)

    assert "column=diagnosis" in str(info.value) and "rule=target_present" in str(info.value)
    assert info.value.file == str(source)
    assert (out / ingest.OUTPUT_FILE).read_bytes() == PREVIOUS


# ----------------------------------------------------------------------------- run / main


def test_run_writes_the_sklearn_source_over_the_previous_output(tmp_path: Path) -> None:
    out = prepopulated_out(tmp_path)

    written = ingest.run(IngestParams(source="sklearn:breast_cancer"), out)

    pd.testing.assert_frame_equal(pd.read_parquet(written),
                                  ingest.load_sklearn_dataset("breast_cancer"))


def test_main_ingests_a_local_csv_named_in_params(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("data/source").mkdir(parents=True)
    tiny_frame().to_csv("data/source/mine.csv", index=False)
    Path("params.yaml").write_text(yaml.safe_dump(
        {"ingest": {"source": "data/source/mine.csv", "target": "label"}}))

    assert ingest.main(["--out", "data/raw", "--params", "params.yaml"]) == 0

    df = pd.read_parquet("data/raw/data.parquet")
    assert df.to_dict("list") == tiny_frame().to_dict("list")


def test_main_exits_1_on_a_missing_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump({"ingest": {"source": "data/source/x.csv"}}))

    assert ingest.main(["--out", "data/raw"]) == 1

    assert "file=data/source/x.csv, rule=exists" in caplog.text
    assert not Path("data/raw").exists()
