"""Ingest: stream the configured source into ``data/raw/`` as Parquet parts + a manifest.

Sources (params ``ingest.source``; ``ingest.target`` names the label column):

- ``sklearn:breast_cancer`` / ``sklearn:digits``: a dataset bundled with scikit-learn.
- a CSV or Parquet file, a folder of them, or a hive-partitioned Parquet folder
  (``year=2024/...``), which must lie inside ``ingest.data_root`` (stages/ingest/sources.py);
- an fsspec URL: ``https://...`` (built in), ``s3://`` (``pip install s3fs``), ``gs://``
  (``pip install gcsfs``);
- a SQLAlchemy URL (``postgresql+psycopg://user@host:5432/db``) with ``ingest.table`` or
  ``ingest.query``; the password comes from ``PGPASSWORD`` or ``~/.pgpass``
  (stages/ingest/sql.py).

The output folder holds ``part-00000.parquet``, ``part-00001.parquet``, ... (one schema, row
groups of ``base.batch_rows`` rows) and ``manifest.json``::

    {"source": str, "rows": int, "parts": [{"file", "rows", "watermark_max"}],
     "watermark": {"column", "max"} | null}

``source`` never holds a credential: a presigned URL's signature or a ``user:password@`` is
written as ``***`` (stages/common/redact.py), as in the logs and the MLflow params.

Memory stays bounded by ``base.batch_rows`` whatever the source size: record batches go
straight from the reader to the Parquet writer. The folder is replaced atomically, and the same
input gives byte-identical output (no timestamps), so DVC sees "unchanged".

Incremental ingestion (``ingest.watermark``: a timestamp or increasing-id column): a run reads
only the source rows newer than the manifest's ``watermark.max`` and appends them as a new part
(the old parts are hard-linked into the new folder, then the folder is swapped). With no new
rows ``data/raw`` is left byte-for-byte as it was and ``run()`` reports ``rows_added == 0``.
Every bad source is a DataError naming the file, the column and the rule, and leaves the
previous ``data/raw`` untouched.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.common.cli import build_parser, run_main
from stages.common.config import SKLEARN_SOURCES, BaseParams, IngestParams, Params
from stages.common.errors import DataError
from stages.common.io import atomic_path, read_json, write_json
from stages.common.parquet_files import ParquetFiles
from stages.common.redact import redact_url
from stages.ingest.sources import conform_batch, iter_file_batches, plain_schema
from stages.ingest.watermark import column_max, filter_new_rows, from_json_value, to_json_value

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PART = "part-{:05d}.parquet"
DEFAULT_BATCH_ROWS = BaseParams().batch_rows  # params base.batch_rows


@dataclass(frozen=True)
class IngestResult:
    """What a run did: a flow skips training when ``rows_added`` is 0."""

    rows_added: int  # rows written by this run (all of them without a watermark)
    total_rows: int  # rows in data/raw after the run
    watermark: dict | None  # the manifest's {"column", "max"}, or None

    @property
    def has_new_rows(self) -> bool:
        return self.rows_added > 0


# ----------------------------------------------------------------------------- sklearn


def load_sklearn_dataset(name: str, target: str = "target") -> pd.DataFrame:
    """A scikit-learn bundled dataset as one table: float features + an int label column.

    Feature names are sklearn's with spaces replaced by underscores (``mean radius`` ->
    ``mean_radius``; digits are already ``pixel_<row>_<col>``).
    """
    import pandas as pd
    from sklearn import datasets

    if name not in SKLEARN_SOURCES:
        raise DataError(
            f"unknown sklearn dataset {name!r} (known: {', '.join(SKLEARN_SOURCES)})",
            file=f"sklearn:{name}",
            rule="source",
        )
    bunch = getattr(datasets, f"load_{name}")()
    columns = [str(feature).replace(" ", "_") for feature in bunch.feature_names]
    df = pd.DataFrame(bunch.data, columns=columns).astype("float64")
    df[target] = pd.Series(bunch.target, dtype="int64")
    return df


def iter_sklearn_batches(params: IngestParams, batch_rows: int) -> Iterator[Any]:
    """The sklearn dataset as record batches (it is small: loaded whole)."""
    import pyarrow as pa

    df = load_sklearn_dataset(params.source.split(":", 1)[1], params.target)
    yield from pa.Table.from_pandas(df, preserve_index=False).to_batches(batch_rows)


# ----------------------------------------------------------------------------- the stream


def describe_source(params: IngestParams) -> str:
    """The manifest's ``source``: the source (credentials in a URL as ``***``), plus the table
    or query for databases."""
    if params.kind != "sql":
        return redact_url(params.source)
    from stages.ingest.sql import shown_url

    what = f"table={params.table}" if params.table else f"query={params.query}"
    return f"{shown_url(params.source)} {what}"


def iter_source_batches(
    params: IngestParams, batch_rows: int, schema: Any = None, after: Any = None
) -> Iterator[Any]:
    """Record batches of the source, each with the dataset's schema (``schema`` or the first
    batch's). SQL sources apply the watermark (``> after``) in the database."""
    if params.kind == "sklearn":
        batches = iter_sklearn_batches(params, batch_rows)
    elif params.kind == "sql":
        from stages.ingest.sql import iter_sql_batches

        batches = iter_sql_batches(params, batch_rows, None if after is None else after.as_py())
    else:
        batches = iter_file_batches(params, batch_rows, schema)
    name = describe_source(params)
    for batch in batches:
        if schema is None:
            schema = plain_schema(batch.schema)
            check_columns_present(schema, params, name)
        yield conform_batch(batch, schema, name)


def check_columns_present(schema: Any, params: IngestParams, name: str) -> None:
    """Raise DataError if the target (or the watermark) column is not in ``schema``."""
    for column, what, rule in (
        (params.target, "target", "target_present"),
        (params.watermark, "watermark", "watermark_present"),
    ):
        if column is not None and column not in schema.names:
            shown = ", ".join(schema.names[:20]) + (" ..." if len(schema.names) > 20 else "")
            raise DataError(
                f"{what} column {column!r} not found; columns are: {shown}",
                file=name,
                column=column,
                rule=rule,
            )


# ----------------------------------------------------------------------------- watermark


def read_manifest(out_dir: str | Path) -> dict | None:
    """The manifest of an earlier run in ``out_dir`` (None if there is none)."""
    path = Path(out_dir) / MANIFEST
    return read_json(path) if path.exists() else None


def manifest_to_append(params: IngestParams, previous: dict | None) -> dict | None:
    """``previous`` if this run appends to it: same source, same watermark column."""
    if params.watermark is None or previous is None or not previous.get("watermark"):
        return None
    if previous["source"] != describe_source(params):
        logger.info("source changed (was %s): ingesting everything", previous["source"])
        return None
    if previous["watermark"]["column"] != params.watermark:
        logger.info(
            "watermark column changed (was %s): ingesting everything",
            previous["watermark"]["column"],
        )
        return None
    return previous


# ----------------------------------------------------------------------------- writing


def write_part(
    folder: Path,
    name: str,
    schema: Any,
    batches: Iterator[Any],
    batch_rows: int,
    watermark: str | None,
) -> tuple[int, Any]:
    """Write the batches as the Parquet part ``folder/<name>.parquet`` (row groups of
    ``batch_rows``; encoding runs on a background thread while the next batch is read).

    Returns the rows written and the largest watermark value (None without a watermark).
    """
    rows, largest = 0, None
    with ParquetFiles(folder, [name], schema, batch_rows) as part:
        for batch in batches:
            part.add(name, batch)
            rows += batch.num_rows
            if watermark is not None:
                largest = column_max(batch, watermark, largest)
    return rows, largest


def link_parts(previous: dict, old_dir: Path, new_dir: Path) -> list[dict]:
    """Hard-link the earlier parts into ``new_dir`` (copy across file systems)."""
    for part in previous["parts"]:
        try:
            os.link(old_dir / part["file"], new_dir / part["file"])
        except OSError:
            shutil.copy2(old_dir / part["file"], new_dir / part["file"])
    return list(previous["parts"])


def write_dataset(
    out_dir: Path,
    params: IngestParams,
    batches: Iterator[Any],
    schema: Any,
    batch_rows: int,
    previous: dict | None,
) -> dict:
    """Write the new folder (earlier parts + one new part + manifest) and swap it in.

    Returns the manifest written. On any error ``out_dir`` is left as it was, and so it is
    when the new folder is byte-identical to it (a source read again without changes).
    """
    with atomic_path(out_dir, keep_if_identical=True) as tmp:
        tmp.mkdir()
        parts = link_parts(previous, out_dir, tmp) if previous else []
        name = PART.format(len(parts))
        rows, largest = write_part(
            tmp, Path(name).stem, schema, batches, batch_rows, params.watermark
        )
        top = None if largest is None else to_json_value(largest)
        parts.append({"file": name, "rows": rows, "watermark_max": top})
        manifest = {
            "source": describe_source(params),
            "rows": sum(part["rows"] for part in parts),
            "parts": parts,
            "watermark": None if top is None else {"column": params.watermark, "max": top},
        }
        write_json(tmp / MANIFEST, manifest)
    return manifest


# ----------------------------------------------------------------------------- run / main


def previous_schema(out_dir: Path, previous: dict) -> Any:
    """The Arrow schema of the dataset already in ``out_dir``."""
    import pyarrow.parquet as pq

    return plain_schema(pq.read_schema(out_dir / previous["parts"][0]["file"]))


def run(
    params: IngestParams, out_dir: str | Path, batch_rows: int = DEFAULT_BATCH_ROWS
) -> IngestResult:
    """Ingest the source into ``out_dir`` (replaced atomically, or appended to); see module doc."""
    out_dir = Path(out_dir)
    previous = manifest_to_append(params, read_manifest(out_dir))
    schema = after = None
    if previous is not None:
        schema = previous_schema(out_dir, previous)
        after = from_json_value(previous["watermark"]["max"], schema.field(params.watermark).type)
    batches = iter_source_batches(params, batch_rows, schema, after)
    rows = filter_new_rows(
        batches, params, after, previous["rows"] if previous else 0, describe_source(params)
    )
    first = next(rows, None)
    if first is None:
        return report_no_rows(params, previous)
    manifest = write_dataset(
        out_dir, params, chain([first], rows), first.schema, batch_rows, previous
    )
    added = manifest["parts"][-1]["rows"]
    logger.info(
        "ingested %s: %d %srows x %d columns -> %s (%d rows in %d parts)",
        manifest["source"],
        added,
        "new " if previous else "",
        len(first.schema),
        out_dir,
        manifest["rows"],
        len(manifest["parts"]),
    )
    return IngestResult(added, manifest["rows"], manifest["watermark"])


def report_no_rows(params: IngestParams, previous: dict | None) -> IngestResult:
    """Log that nothing is new (incremental) or raise: a source without rows is a DataError."""
    if previous is None:
        raise DataError(
            "the source has no data rows", file=describe_source(params), rule="not_empty"
        )
    watermark = previous["watermark"]
    logger.info(
        "no rows newer than %s = %s: data/raw unchanged, nothing to retrain",
        watermark["column"],
        watermark["max"],
    )
    return IngestResult(0, previous["rows"], watermark)


def main(argv: list[str] | None = None) -> int:
    """``python -m stages.ingest --out data/raw [--params params.yaml]``."""
    parser = build_parser(
        "ingest",
        (
            "Stream the source named in params (ingest.source: sklearn:<name>, a CSV/Parquet file "
            "or (hive-partitioned) folder under ingest.data_root, an https/s3/gs URL, or a "
            "SQLAlchemy URL with ingest.table or ingest.query) into OUT/part-NNNNN.parquet + "
            "OUT/manifest.json. With ingest.watermark set, only rows newer than the last run's are "
            "read and appended as a new part; none new leaves OUT unchanged. Database passwords "
            "come from PGPASSWORD or ~/.pgpass."
        ),
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output folder (Parquet parts and manifest.json, replaced atomically)",
    )

    def body(args: argparse.Namespace, params: Params) -> None:
        run(params.ingest, args.out, params.base.batch_rows)

    return run_main("ingest", parser, body, argv)
