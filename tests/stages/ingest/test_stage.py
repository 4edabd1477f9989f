"""Ingest stage: sklearn sources, SQL on a real PostgreSQL, incremental ingestion, the CLI.

File and URL sources and their bad inputs are in test_sources.py.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa
import yaml

from stages.common.config import IngestParams
from stages.common.errors import ConfigError, DataError
from stages.ingest import stage as ingest
from tests.postgres import free_port

_tables = itertools.count()


def read_raw(out: Path) -> pd.DataFrame:
    parts = sorted(out.glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(part) for part in parts], ignore_index=True)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------- sklearn


def test_breast_cancer_has_underscored_float_features_and_int_target() -> None:
    df = ingest.load_sklearn_dataset("breast_cancer")

    assert df.shape == (569, 31)
    assert list(df.columns[:2]) == ["mean_radius", "mean_texture"]
    assert (df.drop(columns="target").dtypes == "float64").all()
    assert df["target"].dtype == "int64" and set(df["target"]) == {0, 1}


def test_digits_has_row_col_pixel_columns_and_ten_labels() -> None:
    df = ingest.load_sklearn_dataset("digits", target="label")

    pixels = [f"pixel_{row}_{col}" for row in range(8) for col in range(8)]
    assert list(df.columns) == [*pixels, "label"]
    assert sorted(df["label"].unique()) == list(range(10))


def test_sklearn_source_is_written_in_parts_of_batch_rows(tmp_path: Path) -> None:
    result = ingest.run(
        IngestParams(source="sklearn:breast_cancer"), tmp_path / "raw", batch_rows=100
    )

    pd.testing.assert_frame_equal(
        read_raw(tmp_path / "raw"), ingest.load_sklearn_dataset("breast_cancer")
    )
    assert (result.rows_added, result.total_rows, result.watermark) == (569, 569, None)
    assert ingest.read_manifest(tmp_path / "raw")["source"] == "sklearn:breast_cancer"


def test_sklearn_source_without_the_watermark_column_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        ingest.run(IngestParams(source="sklearn:digits", watermark="ts"), tmp_path / "raw")

    assert (info.value.column, info.value.rule) == ("ts", "watermark_present")
    assert not (tmp_path / "raw").exists()


# ----------------------------------------------------------------------------- incremental (files)


def events(start: int, stop: int) -> pd.DataFrame:
    ids = list(range(start, stop))
    return pd.DataFrame(
        {
            "id": ids,
            "ts": pd.to_datetime([f"2024-01-01 00:{i:02d}:00" for i in ids]),
            "x": [i / 2 for i in ids],
            "label": [i % 2 for i in ids],
        }
    )


def file_params(root: Path, watermark: str = "ts") -> IngestParams:
    return IngestParams(
        source=str(root / "drops"), target="label", data_root=str(root), watermark=watermark
    )


def test_folder_with_a_new_file_appends_only_the_newer_rows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "drops").mkdir()
    events(0, 5).to_csv(tmp_path / "drops" / "day1.csv", index=False)
    out = tmp_path / "raw"
    first = ingest.run(file_params(tmp_path), out)
    part0 = (out / "part-00000.parquet").read_bytes()
    events(5, 8).to_parquet(tmp_path / "drops" / "day2.parquet")  # a new drop, as Parquet

    second = ingest.run(file_params(tmp_path), out)

    assert (first.rows_added, second.rows_added, second.total_rows) == (5, 3, 8)
    assert (out / "part-00000.parquet").read_bytes() == part0  # earlier part untouched
    assert read_raw(out)["id"].tolist() == list(range(8))
    manifest = ingest.read_manifest(out)
    top = manifest["watermark"]["max"]  # ISO text, at the column's unit
    assert manifest["watermark"]["column"] == "ts" and top.startswith("2024-01-01 00:07:00")
    assert [(p["file"], p["rows"], p["watermark_max"][:19]) for p in manifest["parts"]] == [
        ("part-00000.parquet", 5, "2024-01-01 00:04:00"),
        ("part-00001.parquet", 3, "2024-01-01 00:07:00"),
    ]

    before = snapshot(out)
    caplog.set_level(logging.INFO, logger="stages.ingest.stage")
    third = ingest.run(file_params(tmp_path), out)

    assert (third.rows_added, third.total_rows, third.has_new_rows) == (0, 8, False)
    assert snapshot(out) == before
    assert f"no rows newer than ts = {top}: data/raw unchanged, nothing to retrain" in caplog.text


def test_rows_arriving_late_are_refused_not_dropped(tmp_path: Path) -> None:
    (tmp_path / "drops").mkdir()
    events(0, 5).to_csv(tmp_path / "drops" / "day1.csv", index=False)
    out = tmp_path / "raw"
    ingest.run(file_params(tmp_path, watermark="id"), out)
    events(2, 3).to_csv(tmp_path / "drops" / "late.csv", index=False)  # id 2 again
    before = snapshot(out)

    with pytest.raises(DataError, match="1 rows arrived late") as info:
        ingest.run(file_params(tmp_path, watermark="id"), out)

    assert (info.value.column, info.value.rule) == ("id", "watermark_order")
    assert snapshot(out) == before


def test_missing_watermark_values_are_refused(tmp_path: Path) -> None:
    (tmp_path / "drops").mkdir()
    (tmp_path / "drops" / "a.csv").write_text("id,label\n1,0\n,1\n")

    with pytest.raises(DataError) as info:
        ingest.run(file_params(tmp_path, watermark="id"), tmp_path / "raw")

    assert (info.value.column, info.value.rule) == ("id", "watermark_not_null")


def test_new_rows_with_another_schema_are_refused(tmp_path: Path) -> None:
    (tmp_path / "drops").mkdir()
    events(0, 3).to_parquet(tmp_path / "drops" / "a.parquet")
    out = tmp_path / "raw"
    ingest.run(file_params(tmp_path, watermark="id"), out)
    events(3, 5).rename(columns={"x": "y"}).to_parquet(tmp_path / "drops" / "b.parquet")
    before = snapshot(out)

    with pytest.raises(DataError) as info:
        ingest.run(file_params(tmp_path, watermark="id"), out)

    assert (info.value.column, info.value.rule) == ("x", "same_schema")
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- SQL (PostgreSQL)


def make_table(url: str, rows: pd.DataFrame) -> str:
    """A new table holding ``rows`` (plus a timestamptz column); returns its name."""
    name = f"events_{next(_tables)}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"CREATE TABLE {name} (id bigint, ts timestamptz, x double precision, "
                "color text, amount numeric(10, 2), label integer)"
            )
        )
    insert_rows(url, name, rows)
    engine.dispose()
    return name


def insert_rows(url: str, table: str, rows: pd.DataFrame) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(f"INSERT INTO {table} VALUES (:id, :ts, :x, :color, :amount, :label)"),
            [
                {
                    "id": int(r.id),
                    "ts": f"2024-01-01 00:{int(r.id):02d}:00+00",
                    "x": float(r.x),
                    "color": "red" if r.id % 3 else None,
                    "amount": f"{r.id}.25",
                    "label": int(r.label),
                }
                for r in rows.itertuples()
            ],
        )
    engine.dispose()


def test_sql_table_streams_in_batches_with_database_types(
    tmp_path: Path, postgres_url: str
) -> None:
    table = make_table(postgres_url, events(0, 10))

    result = ingest.run(
        IngestParams(source=postgres_url, table=table, target="label"),
        tmp_path / "raw",
        batch_rows=4,
    )

    df = read_raw(tmp_path / "raw")
    assert result.rows_added == 10 and sorted(df["id"]) == list(range(10))
    assert str(df["ts"].dtype) == "datetime64[us, UTC]" and df["amount"].dtype == "float64"
    assert df["label"].dtype == "int32" and df["color"].isna().sum() == 4
    assert ingest.read_manifest(tmp_path / "raw")["source"] == f"{postgres_url} table={table}"


def test_sql_query_selects_rows_and_columns(tmp_path: Path, postgres_url: str) -> None:
    table = make_table(postgres_url, events(0, 10))
    query = f"SELECT id, x, label FROM {table} WHERE id >= 6"

    ingest.run(IngestParams(source=postgres_url, query=query, target="label"), tmp_path / "raw")

    df = read_raw(tmp_path / "raw")
    assert list(df.columns) == ["id", "x", "label"] and sorted(df["id"]) == [6, 7, 8, 9]


@pytest.mark.parametrize("watermark", ["ts", "id"])
def test_sql_watermark_appends_exactly_the_new_rows(
    tmp_path: Path, postgres_url: str, caplog: pytest.LogCaptureFixture, watermark: str
) -> None:
    table = make_table(postgres_url, events(0, 6))
    params = IngestParams(source=postgres_url, table=table, target="label", watermark=watermark)
    out = tmp_path / "raw"

    first = ingest.run(params, out)
    insert_rows(postgres_url, table, events(6, 10))
    second = ingest.run(params, out)

    assert (first.rows_added, second.rows_added, second.total_rows) == (6, 4, 10)
    assert read_raw(out)["id"].tolist() == list(range(10))  # ordered by the watermark
    manifest = ingest.read_manifest(out)
    assert [part["rows"] for part in manifest["parts"]] == [6, 4]
    assert manifest["watermark"]["max"] == (
        9 if watermark == "id" else "2024-01-01 00:09:00.000000Z"
    )

    before = snapshot(out)
    caplog.set_level(logging.INFO, logger="stages.ingest.stage")
    third = ingest.run(params, out)

    assert (third.rows_added, third.total_rows) == (0, 10) and snapshot(out) == before
    assert f"no rows newer than {watermark} = " in caplog.text


def test_sql_rows_inserted_late_are_refused(tmp_path: Path, postgres_url: str) -> None:
    table = make_table(postgres_url, events(0, 6))
    params = IngestParams(source=postgres_url, table=table, target="label", watermark="id")
    ingest.run(params, tmp_path / "raw")
    insert_rows(postgres_url, table, events(3, 4))
    before = snapshot(tmp_path / "raw")

    with pytest.raises(DataError) as info:
        ingest.run(params, tmp_path / "raw")

    assert (info.value.column, info.value.rule) == ("id", "watermark_order")
    assert snapshot(tmp_path / "raw") == before


def test_sql_errors_name_the_url_and_the_rule(tmp_path: Path, postgres_url: str) -> None:
    table = make_table(postgres_url, events(0, 3))
    closed = postgres_url.replace(
        postgres_url.split("@")[1].split("/")[0], f"127.0.0.1:{free_port()}"
    )
    cases = [
        (dict(source=postgres_url, table="no_such_table"), postgres_url, None, "sql"),
        (dict(source=closed, table=table), closed, None, "connect"),
        (
            dict(source=postgres_url, table=table, watermark="updated_at"),
            None,
            "updated_at",
            "watermark_present",
        ),
        (
            dict(source=postgres_url, table=table, target="diagnosis"),
            None,
            "diagnosis",
            "target_present",
        ),
    ]
    for kwargs, file, column, rule in cases:
        with pytest.raises(DataError) as info:
            ingest.run(IngestParams(**{"target": "label", **kwargs}), tmp_path / "raw")
        assert info.value.rule == rule and info.value.column == column
        assert info.value.file.startswith(file or postgres_url)
    assert not (tmp_path / "raw").exists()


def test_password_in_the_database_url_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PGPASSWORD"):
        ingest.run(
            IngestParams(source="postgresql://me:secret@127.0.0.1/db", table="t"), tmp_path / "raw"
        )


# ----------------------------------------------------------------------------- main


def test_main_ingests_a_local_csv_named_in_params(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("data/source").mkdir(parents=True)
    Path("data/source/mine.csv").write_text("x,label\n0.5,0\n1.5,1\n")
    Path("params.yaml").write_text(
        yaml.safe_dump(
            {
                "ingest": {"source": "data/source/mine.csv", "target": "label"},
                "base": {"batch_rows": 1},
            }
        )
    )

    assert ingest.main(["--out", "data/raw", "--params", "params.yaml"]) == 0

    assert read_raw(Path("data/raw")).to_dict("list") == {"x": [0.5, 1.5], "label": [0, 1]}


def test_main_exits_1_on_a_missing_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("data/source").mkdir(parents=True)
    Path("params.yaml").write_text(yaml.safe_dump({"ingest": {"source": "data/source/x.csv"}}))

    assert ingest.main(["--out", "data/raw"]) == 1

    assert "file=data/source/x.csv, rule=exists" in caplog.text
    assert not Path("data/raw").exists()
