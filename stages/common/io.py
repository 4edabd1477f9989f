"""Atomic writes and careful reads: a failed stage never leaves a half-written file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Re-exported: pipeline code writes through stages.common.io; the model package owns them.
from model.files import atomic_path as atomic_path
from model.files import same_content as same_content
from stages.common.errors import DataError

if TYPE_CHECKING:
    import pandas as pd


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file, naming the file when it is missing or malformed."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(
            "file not found; run the upstream stage first", file=str(path), rule="exists"
        ) from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON: {exc}", file=str(path), rule="json") from exc


def write_parquet(path: str | Path, df: pd.DataFrame) -> None:
    """Write a DataFrame to Parquet atomically (no index)."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False, engine="pyarrow")


def read_parquet(path: str | Path) -> pd.DataFrame:
    """Read a Parquet file or folder; a missing, empty or corrupt file gets a clear error."""
    import pandas as pd
    import pyarrow as pa

    path = Path(path)
    if not path.exists():
        raise DataError("file not found", file=str(path), rule="exists")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError("file is empty (0 bytes)", file=str(path), rule="not_empty")
    try:
        return pd.read_parquet(path, engine="pyarrow")
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(
            f"not a readable Parquet file (truncated or corrupt?): {exc}",
            file=str(path),
            rule="parquet",
        ) from exc


# Streaming: the data stages read and write record batches, so memory stays bounded by the batch
# size (params base.batch_rows) rather than by the size of the data.


def open_dataset(path: str | Path):  # -> pyarrow.dataset.Dataset
    """The Parquet file, or every ``*.parquet`` file in a folder, as one pyarrow dataset.

    Raises DataError naming the file when it is missing, empty, corrupt, or (in a folder) has a
    schema that differs from the others.
    """
    import pyarrow as pa
    import pyarrow.dataset as ds

    path = Path(path)
    if not path.exists():
        raise DataError(
            "file not found; run the upstream stage first", file=str(path), rule="exists"
        )
    files = sorted(p for p in path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise DataError("folder holds no .parquet files", file=str(path), rule="not_empty")
    for file in files:
        if file.stat().st_size == 0:
            raise DataError("file is empty (0 bytes)", file=str(file), rule="not_empty")
    try:
        dataset = ds.dataset([str(file) for file in files], format="parquet")
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(
            f"not a readable Parquet file (truncated or corrupt?): {exc}",
            file=str(path),
            rule="parquet",
        ) from exc
    check_same_schema(files, dataset.schema)
    return dataset


def check_same_schema(files: list[Path], schema) -> None:
    """Raise DataError (rule ``same_schema``) naming the first file and column that differ."""
    import pyarrow.parquet as pq

    for file in files:
        found = pq.read_schema(file)
        if found.names == schema.names and found.types == schema.types:
            continue
        for name in sorted(set(found.names) | set(schema.names)):
            if name not in found.names or name not in schema.names:
                raise DataError(
                    f"columns differ from the other files ({name!r} is only in "
                    f"{'this file' if name in found.names else 'the others'})",
                    file=str(file),
                    column=name,
                    rule="same_schema",
                )
            if found.field(name).type != schema.field(name).type:
                raise DataError(
                    f"type {found.field(name).type} differs from the other files' "
                    f"{schema.field(name).type}",
                    file=str(file),
                    column=name,
                    rule="same_schema",
                )
        raise DataError(
            "column order differs from the other files", file=str(file), rule="same_schema"
        )


def iter_batches(path: str | Path, batch_rows: int, columns: list[str] | None = None):
    """Record batches of at most ``batch_rows`` rows from a Parquet file or folder, in order.

    One row group is read at a time: pyarrow's dataset scanner reads ahead of its consumer and
    its memory grew with the file (2.2 GB at 10M rows against 0.5 GB this way).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    dataset = open_dataset(path)
    for file in dataset.files:
        try:
            parquet = pq.ParquetFile(file)
            for index in range(parquet.num_row_groups):
                group = parquet.read_row_group(index, columns=columns)
                yield from group.to_batches(max_chunksize=batch_rows)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(
                f"not a readable Parquet file (truncated or corrupt?): {exc}",
                file=str(file),
                rule="parquet",
            ) from exc


def open_parquet_writer(path: str | Path, schema) -> Any:
    """A ``pyarrow.parquet.ParquetWriter`` that dictionary-encodes text columns only.

    On number columns dictionary encoding is tried and abandoned page after page: writes take
    about 3x as long and the files are hardly smaller.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = [
        field.name
        for field in schema
        if pa.types.is_string(field.type)
        or pa.types.is_large_string(field.type)
        or pa.types.is_dictionary(field.type)
    ]
    return pq.ParquetWriter(path, schema, use_dictionary=text)
