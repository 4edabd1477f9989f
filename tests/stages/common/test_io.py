"""Atomic writes leave the old file in place when the writer fails; reads name the file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from stages.common.errors import DataError
from stages.common.io import atomic_path, read_json, read_parquet, write_json, write_parquet


def test_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    write_json(target, {"version": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert read_json(target) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp files left behind


def test_directory_is_replaced_as_a_whole(tmp_path: Path) -> None:
    target = tmp_path / "features"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "old.txt").write_text("old")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features"]


def test_parquet_roundtrip_and_clear_errors(tmp_path: Path) -> None:
    df = pd.DataFrame({"a": [1.0, 2.0], "target": [0, 1]})
    path = tmp_path / "data.parquet"
    write_parquet(path, df)
    pd.testing.assert_frame_equal(read_parquet(path), df)

    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(path.read_bytes()[:40])
    with pytest.raises(
        DataError, match=r"truncated or corrupt.*file=.*truncated.parquet.*rule=parquet"
    ):
        read_parquet(truncated)
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="rule=not_empty"):
        read_parquet(empty)
    with pytest.raises(DataError, match="rule=exists"):
        read_parquet(tmp_path / "missing.parquet")


def test_read_json_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "run.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=f"file={bad}, rule=json"):
        read_json(bad)
