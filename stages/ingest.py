"""Ingest: read the configured source into ``data/raw/data.parquet``, unchanged.

Sources (params ``ingest.source``): a dataset bundled with scikit-learn (``sklearn:breast_cancer``,
``sklearn:digits``; nothing is downloaded) or a local CSV/Parquet file or a folder of them, with
``ingest.target`` naming the label column. Every check runs before the one atomic write, so a
bad source leaves the previous ``data/raw`` exactly as it was.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd

from stages.common.cli import build_parser, run_main
from stages.common.config import SKLEARN_SOURCES, IngestParams, Params
from stages.common.errors import DataError
from stages.common.io import read_parquet, write_parquet

logger = logging.getLogger(__name__)

OUTPUT_FILE = "data.parquet"
READERS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}  # suffix -> format


def load_sklearn_dataset(name: str, target: str = "target") -> pd.DataFrame:
    """A scikit-learn bundled dataset as one table: float features + an int label column.

    Feature names are sklearn's with spaces replaced by underscores (``mean radius`` ->
    ``mean_radius``; digits are already ``pixel_<row>_<col>``).
    """
    from sklearn import datasets

    if name not in SKLEARN_SOURCES:
        raise DataError(f"unknown sklearn dataset {name!r} (known: {', '.join(SKLEARN_SOURCES)})",
                        file=f"sklearn:{name}", rule="source")
    bunch = getattr(datasets, f"load_{name}")()
    columns = [str(feature).replace(" ", "_") for feature in bunch.feature_names]
    df = pd.DataFrame(bunch.data, columns=columns).astype("float64")
    df[target] = pd.Series(bunch.target, dtype="int64")
    return df


def check_target(df: pd.DataFrame, target: str, file: str) -> None:
    """Raise DataError (rule ``target_present``) if ``target`` is not a column of ``df``."""
    if target not in df.columns:
        shown = ", ".join(map(str, df.columns[:20])) + (" ..." if len(df.columns) > 20 else "")
        raise DataError(f"target column {target!r} not found; columns are: {shown}",
                        file=file, column=target, rule="target_present")


def read_source(path: str | Path) -> pd.DataFrame:
    """Read a CSV/Parquet file, or concatenate a folder of them (same columns required)."""
    path = Path(path)
    if not path.exists():
        raise DataError("source not found (set ingest.source in params.yaml)",
                        file=str(path), rule="exists")
    if path.is_dir():
        return _read_folder(path)
    return read_table(path)


def read_table(path: Path) -> pd.DataFrame:
    """Read one CSV or Parquet file; an empty, header-only or corrupt file is a DataError."""
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"unsupported file type {path.suffix!r} (use {', '.join(READERS)})",
                        file=str(path), rule="extension")
    if path.stat().st_size == 0:
        raise DataError("file is empty (0 bytes)", file=str(path), rule="not_empty")
    df = read_parquet(path) if kind == "parquet" else _read_csv(path)
    if df.empty:
        raise DataError(f"no data rows (columns: {len(df.columns)})", file=str(path),
                        rule="not_empty")
    return df


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError as exc:  # whitespace only: no header either
        raise DataError("file has no header and no rows", file=str(path),
                        rule="not_empty") from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"not a readable CSV file: {exc}", file=str(path), rule="csv") from exc


def _read_folder(folder: Path) -> pd.DataFrame:
    files = sorted(path for path in folder.iterdir() if path.is_file()
                   and path.suffix.lower() in READERS and not path.name.startswith("."))
    if not files:
        raise DataError(f"folder holds no {'/'.join(READERS)} files", file=str(folder),
                        rule="not_empty")
    frames = [read_table(path) for path in files]
    expected = list(frames[0].columns)
    for path, df in zip(files[1:], frames[1:], strict=True):
        if set(df.columns) != set(expected):
            differing = sorted(set(df.columns) ^ set(expected), key=str)
            raise DataError(f"columns differ from {files[0].name}: {differing}", file=str(path),
                            column=str(differing[0]), rule="same_columns")
    logger.info("concatenating %d files from %s", len(files), folder)
    return pd.concat([df[expected] for df in frames], ignore_index=True)


def ingest_source(params: IngestParams) -> pd.DataFrame:
    """The source table that ``params`` names, with its target column checked."""
    if params.is_sklearn:
        return load_sklearn_dataset(params.source.split(":", 1)[1], params.target)
    df = read_source(params.source)
    check_target(df, params.target, params.source)
    return df


def run(params: IngestParams, out_dir: str | Path) -> Path:
    """Ingest the source into ``out_dir/data.parquet`` (atomic); return the file written."""
    df = ingest_source(params)
    out_file = Path(out_dir) / OUTPUT_FILE
    write_parquet(out_file, df)
    logger.info("ingested %s: %d rows x %d columns -> %s", params.source, len(df),
                len(df.columns), out_file)
    return out_file


def main(argv: list[str] | None = None) -> int:
    """``python -m stages.ingest --out data/raw [--params params.yaml]``."""
    parser = build_parser("ingest", "Read the source named in params (ingest.source) into "
                                    "OUT/data.parquet.")
    parser.add_argument("--out", required=True, help="output folder (data.parquet goes here)")

    def body(args: argparse.Namespace, params: Params) -> None:
        run(params.ingest, args.out)

    return run_main("ingest", parser, body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
