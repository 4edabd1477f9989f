"""Reading the files a run left, forgivingly: a missing file is ``None`` (the page says "not
available"), an unreadable one is a ``Broken`` note naming the file (the page says why), so one
bad report never takes the whole page down."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Broken:
    """A file that exists but cannot be read as expected."""

    path: Path
    why: str

    def __str__(self) -> str:
        return f"{self.path}: {self.why}"


def read_json(path: Path | None) -> Any | Broken | None:
    """The JSON value in ``path``; None when there is no such file."""
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return Broken(path, f"not readable JSON ({exc})")


def read_json_lines(path: Path | None) -> list[dict[str, Any]] | Broken | None:
    """One dict per non-empty line of a JSON-lines file; a line that is no JSON object is
    skipped (a check being appended while we read leaves a partial last line)."""
    if path is None or not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return Broken(path, f"not readable ({exc})")
    rows = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            rows.append(value)
    return rows


def read_csv_columns(path: Path | None) -> dict[str, list[float | None]] | Broken | None:
    """A CSV of numbers as ``{column: values}``; a cell that is no number is None."""
    if path is None or not path.is_file():
        return None
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        return Broken(path, f"not a readable CSV ({exc})")
    columns: dict[str, list[float | None]] = {name: [] for name in (rows[0] if rows else {})}
    for row in rows:
        for name in columns:
            columns[name].append(to_number(row.get(name)))
    return columns


def to_number(value: Any) -> float | None:
    """``value`` as a finite float, else None (empty cells, text, NaN, booleans)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def read_quarantine_sample(path: Path | None, limit: int) -> list[dict[str, Any]] | Broken | None:
    """The first ``limit`` quarantined rows: the rule, the column and that column's value."""
    if path is None or not path.is_file():
        return None
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        if "_rule" not in names or "_column" not in names:
            return Broken(path, "no _rule/_column columns: not the validate stage's quarantine")
        rows: list[dict[str, Any]] = []
        for batch in parquet.iter_batches(batch_size=limit):
            for row in batch.to_pylist():
                column = row.get("_column")
                value = row.get(column) if column in row else None
                rows.append({"rule": row.get("_rule"), "column": column, "value": value})
            if len(rows) >= limit:
                break
    except (OSError, ValueError) as exc:
        return Broken(path, f"not a readable Parquet file ({exc})")
    return rows[:limit]
