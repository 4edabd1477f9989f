"""File and URL sources of ingest: CSV, Parquet, folders, hive partitions, HTTP, bad inputs.

Every bad input must raise a DataError naming the file, the column (when there is one) and the
rule, and leave the previous ``data/raw`` byte-for-byte as it was.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.common.config import IngestParams
from stages.common.errors import DataError
from stages.ingest import stage as ingest
from tests.postgres import free_port


def tiny_frame() -> pd.DataFrame:
    return pd.DataFrame({"x": [0.5, 1.5, 2.5], "color": ["red", "blue", "red"], "label": [0, 1, 0]})


def params_for(source: Path | str, root: Path, **overrides: object) -> IngestParams:
    return IngestParams(source=str(source), target="label", data_root=str(root), **overrides)


def read_raw(out: Path) -> pd.DataFrame:
    parts = sorted(out.glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(part) for part in parts], ignore_index=True)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (names relative) with its bytes."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The data root (ingest.data_root) the sources live in."""
    folder = tmp_path / "source"
    folder.mkdir()
    return folder


@pytest.fixture
def raw(tmp_path: Path, root: Path) -> Path:
    """A data/raw written by an earlier, good run (a bad run must leave it as it is)."""
    tiny_frame().to_csv(root / "good.csv", index=False)
    out = tmp_path / "raw"
    ingest.run(params_for(root / "good.csv", root), out)
    return out


# ----------------------------------------------------------------------------- good sources


def test_csv_file_becomes_one_part_and_a_manifest(tmp_path: Path, root: Path) -> None:
    tiny_frame().to_csv(root / "mine.csv", index=False)
    out = tmp_path / "raw"

    result = ingest.run(params_for(root / "mine.csv", root), out)

    assert sorted(path.name for path in out.iterdir()) == ["manifest.json", "part-00000.parquet"]
    assert read_raw(out).to_dict("list") == tiny_frame().to_dict("list")
    assert ingest.read_manifest(out) == {
        "source": str(root / "mine.csv"),
        "rows": 3,
        "watermark": None,
        "parts": [{"file": "part-00000.parquet", "rows": 3, "watermark_max": None}],
    }
    assert (result.rows_added, result.total_rows, result.watermark) == (3, 3, None)


def test_parquet_file_keeps_its_types(tmp_path: Path, root: Path) -> None:
    frame = tiny_frame().astype({"label": "int32"})
    frame.to_parquet(root / "mine.parquet")

    ingest.run(params_for(root / "mine.parquet", root), tmp_path / "raw")

    schema = pq.read_schema(tmp_path / "raw" / "part-00000.parquet")
    assert schema.field("label").type == pa.int32() and schema.metadata is None
    assert read_raw(tmp_path / "raw").equals(frame)


def test_folder_reads_files_in_name_order_whatever_their_column_order(
    tmp_path: Path, root: Path
) -> None:
    folder = root / "exports"
    folder.mkdir()
    tiny_frame().to_csv(folder / "a.csv", index=False)
    tiny_frame()[["label", "color", "x"]].assign(x=[7.5, 8.5, 9.5]).to_parquet(folder / "b.parquet")
    (folder / "README.md").write_text("not data")
    (folder / "_SUCCESS").write_text("")

    ingest.run(params_for(folder, root), tmp_path / "raw")

    df = read_raw(tmp_path / "raw")
    assert list(df.columns) == ["x", "color", "label"]
    assert df["x"].tolist() == [0.5, 1.5, 2.5, 7.5, 8.5, 9.5]


def test_hive_partitioned_folder_adds_the_partition_columns(tmp_path: Path, root: Path) -> None:
    for year, offset in ((2023, 0), (2024, 10)):
        part = root / "sales" / f"year={year}"
        part.mkdir(parents=True)
        tiny_frame().assign(x=tiny_frame()["x"] + offset).to_parquet(part / "data.parquet")

    ingest.run(params_for(root / "sales", root), tmp_path / "raw")

    df = read_raw(tmp_path / "raw")
    assert df["year"].tolist() == [2023] * 3 + [2024] * 3
    assert df["x"].tolist() == [0.5, 1.5, 2.5, 10.5, 11.5, 12.5]


def test_semicolon_csv_reads_with_ingest_delimiter(tmp_path: Path, root: Path) -> None:
    tiny_frame().to_csv(root / "eu.csv", index=False, sep=";")

    ingest.run(params_for(root / "eu.csv", root, delimiter=";"), tmp_path / "raw")

    assert read_raw(tmp_path / "raw").to_dict("list") == tiny_frame().to_dict("list")


def test_same_input_gives_byte_identical_output(tmp_path: Path, root: Path) -> None:
    tiny_frame().to_csv(root / "mine.csv", index=False)
    params = params_for(root / "mine.csv", root)

    ingest.run(params, tmp_path / "first")
    ingest.run(params, tmp_path / "second")
    ingest.run(params, tmp_path / "first")  # over itself

    assert snapshot(tmp_path / "first") == snapshot(tmp_path / "second")


def test_row_groups_are_bounded_by_batch_rows_not_by_file_size(tmp_path: Path, root: Path) -> None:
    # What bounds memory: the writer holds one row group (batch_rows rows) at a time.
    n = 10_000
    pd.DataFrame({"x": range(n), "label": [i % 2 for i in range(n)]}).to_csv(
        root / "big.csv", index=False
    )

    ingest.run(params_for(root / "big.csv", root), tmp_path / "raw", batch_rows=1024)

    meta = pq.ParquetFile(tmp_path / "raw" / "part-00000.parquet").metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sizes == [1024] * 9 + [n - 9 * 1024]


# ----------------------------------------------------------------------------- HTTP


class RangeHandler(SimpleHTTPRequestHandler):
    """A static file server that answers HTTP range requests (as S3, nginx... do)."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = Path(self.translate_path(self.path))
        wanted = self.headers.get("Range", "")
        if not wanted.startswith("bytes=") or not path.is_file():
            return super().do_GET()
        data = path.read_bytes()
        first, _, last = wanted.removeprefix("bytes=").partition("-")
        start = int(first) if first else len(data) - int(last)
        end = min(int(last) if first and last else len(data) - 1, len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self.wfile.write(data[start : end + 1])


@pytest.fixture(scope="module")
def http_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``(base URL, folder)``: a real HTTP server on 127.0.0.1 serving the folder."""
    folder = tmp_path_factory.mktemp("http")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("name", ["remote.csv", "remote.parquet"])
def test_http_source_streams_csv_and_parquet(
    tmp_path: Path, http_root: tuple[str, Path], name: str
) -> None:
    base, folder = http_root
    path = folder / name
    tiny_frame().to_csv(path, index=False) if name.endswith(".csv") else tiny_frame().to_parquet(
        path
    )

    result = ingest.run(IngestParams(source=f"{base}/{name}", target="label"), tmp_path / "raw")

    assert result.rows_added == 3
    assert read_raw(tmp_path / "raw").to_dict("list") == tiny_frame().to_dict("list")
    assert ingest.read_manifest(tmp_path / "raw")["source"] == f"{base}/{name}"


def test_http_404_and_unreachable_host_name_the_url(
    tmp_path: Path, raw: Path, http_root: tuple[str, Path]
) -> None:
    before = snapshot(raw)
    missing = f"{http_root[0]}/nothing-here.csv"
    unreachable = f"http://127.0.0.1:{free_port()}/data.csv"  # nothing listens there

    for url, rule in ((missing, "exists"), (unreachable, "reachable")):
        with pytest.raises(DataError) as info:
            ingest.run(IngestParams(source=url, target="label"), raw)
        assert (info.value.file, info.value.rule) == (url, rule)
        assert f"file={url}" in str(info.value)
    assert snapshot(raw) == before


def test_a_store_without_its_driver_says_what_to_install(raw: Path) -> None:
    # s3fs is installed now (the stack's S3 store, DVC's S3 remote); gcsfs is not
    with pytest.raises(DataError, match=r"pip install gcsfs") as info:
        ingest.run(IngestParams(source="gs://bucket/data.csv", target="label"), raw)

    assert (info.value.file, info.value.rule) == ("gs://bucket/data.csv", "driver")


# ----------------------------------------------------------------------------- bad inputs


def _later_block_value(path: Path, value: str) -> None:
    # More than one CSV block (4 MiB): the types come from the first block only.
    rows = "".join(f"{i},{i}.5,red,{i % 2}\n" for i in range(260_000))
    path.write_text(f"id,x,color,label\n{rows}260000,{value},red,0\n")


def _partition_with_other_schema(path: Path) -> None:
    for year in (2023, 2024):
        (path / f"year={year}").mkdir(parents=True)
    tiny_frame().to_parquet(path / "year=2023" / "data.parquet")
    tiny_frame().astype({"x": "string"}).to_parquet(path / "year=2024" / "data.parquet")


def _truncated_parquet(path: Path) -> None:
    tiny_frame().to_parquet(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


BAD_FILES: dict[str, tuple[str, Callable[[Path], None], str | None, str, str]] = {
    # case: (name under the data root, how to make it, column, rule, words in the message)
    "zero-byte csv": ("empty.csv", _write(b""), None, "not_empty", "0 bytes"),
    "zero-byte parquet": ("empty.parquet", _write(b""), None, "not_empty", "0 bytes"),
    "header-only csv": ("header.csv", _write(b"x,color,label\n"), None, "not_empty", "header"),
    "whitespace-only csv": ("blank.csv", _write(b"  \n\t\n   "), None, "not_empty", "whitespace"),
    "blank-lines csv": ("lines.csv", _write(b"\n\n\n"), None, "not_empty", "no header"),
    "latin-1 csv": (
        "latin.csv",
        _write("x,color,label\n1,caf\xe9,0\n".encode("latin-1")),
        "color",
        "utf8",
        "latin-1",
    ),
    "windows-1252 csv": (
        "cp.csv",
        _write("x,color,label\n1,\u201cred\u201d,0\n".encode("cp1252")),
        "color",
        "utf8",
        "windows-1252",
    ),
    "utf-16 csv": ("wide.csv", _write("x,label\n1,0\n".encode("utf-16")), None, "utf8", "UTF-16"),
    "semicolon-separated": (
        "eu.csv",
        _write(b"x;color;label\n1;red;0\n"),
        "x;color;label",
        "delimiter",
        "';'-separated: set ingest.delimiter",
    ),
    "tab-separated": (
        "tabs.csv",
        _write(b"x\tcolor\tlabel\n1\tred\t0\n"),
        "x\tcolor\tlabel",
        "delimiter",
        "'\\t'-separated",
    ),
    "pipe-separated": (
        "pipes.csv",
        _write(b"x|color|label\n1|red|0\n"),
        "x|color|label",
        "delimiter",
        "'|'-separated",
    ),
    "duplicated header": (
        "twice.csv",
        _write(b"x,color,label\n1,red,0\nx,color,label\n2,b,1\n"),
        None,
        "duplicate_header",
        "repeats the header",
    ),
    "duplicated header in a later block": (
        "twice_late.csv",
        lambda path: _later_block_value(path, "x"),
        "x",
        "duplicate_header",
        "repeats the header",
    ),
    "text in a numeric column, later block": (
        "late.csv",
        lambda path: _later_block_value(path, "abc"),
        "x",
        "type",
        "'abc' does not convert to double",
    ),
    "ragged csv": ("ragged.csv", _write(b"x,label\n1,0\n1,2,3,4\n"), None, "csv", "columns"),
    "truncated parquet": ("cut.parquet", _truncated_parquet, None, "parquet", "corrupt"),
    "unsupported extension": ("data.json", _write(b"{}"), None, "extension", ".json"),
    "missing file": ("gone.csv", lambda path: None, None, "exists", "not found"),
    "missing target column": (
        "mine.csv",
        _write(b"x,color,diagnosis\n1,red,0\n"),
        "label",
        "target_present",
        "'label' not found",
    ),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_file_names_file_column_rule_and_keeps_raw(root: Path, raw: Path, case: str) -> None:
    name, make, column, rule, words = BAD_FILES[case]
    source = root / name
    make(source)
    before = snapshot(raw)

    with pytest.raises(DataError) as info:
        ingest.run(params_for(source, root), raw)

    err = info.value
    assert (err.file, err.column, err.rule) == (str(source), column, rule)
    assert words in str(err) and f"rule={rule}" in str(err)
    assert snapshot(raw) == before
    assert sorted(path.name for path in raw.parent.iterdir()) == ["raw", "source"]  # no temp


def test_partition_with_another_schema_names_file_and_column(root: Path, raw: Path) -> None:
    _partition_with_other_schema(root / "sales")
    before = snapshot(raw)

    with pytest.raises(DataError) as info:
        ingest.run(params_for(root / "sales", root), raw)

    err = info.value
    assert (err.file, err.column, err.rule) == (
        str(root / "sales" / "year=2024" / "data.parquet"),
        "x",
        "same_schema",
    )
    assert "differs from the first file's double" in str(err) and snapshot(raw) == before


def test_folder_file_with_unconvertible_value_names_that_file(root: Path, raw: Path) -> None:
    (root / "exports").mkdir()
    tiny_frame().to_csv(root / "exports" / "a.csv", index=False)
    (root / "exports" / "b.csv").write_text("x,color,label\nabc,red,0\n")

    with pytest.raises(DataError) as info:
        ingest.run(params_for(root / "exports", root), raw)

    assert (info.value.file, info.value.column, info.value.rule) == (
        str(root / "exports" / "b.csv"),
        "x",
        "type",
    )


@pytest.mark.parametrize("escape", ["relative", "absolute", "symlink"])
def test_source_outside_the_data_root_is_refused(
    tmp_path: Path, root: Path, raw: Path, monkeypatch: pytest.MonkeyPatch, escape: str
) -> None:
    outside = tmp_path / "secret.csv"
    tiny_frame().to_csv(outside, index=False)
    os.symlink(outside, root / "link.csv")
    monkeypatch.chdir(root)
    source = {"relative": "../secret.csv", "absolute": str(outside), "symlink": "link.csv"}[escape]
    before = snapshot(raw)

    with pytest.raises(DataError) as info:
        ingest.run(IngestParams(source=source, target="label", data_root="."), raw)

    assert (info.value.file, info.value.rule) == (source, "inside_data_root")
    assert str(outside) in str(info.value) and snapshot(raw) == before


def test_etc_passwd_is_refused_before_it_is_read(raw: Path, root: Path) -> None:
    with pytest.raises(DataError, match="outside ingest.data_root") as info:
        ingest.run(params_for("../../../../../../../../etc/passwd", root), raw)

    assert info.value.rule == "inside_data_root"
