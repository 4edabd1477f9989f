"""Batch scoring: a Parquet file or folder in, the same rows with predictions beside them out.

Each output row is its input row plus the model's output columns (``prediction``,
``proba_<label>``) and ``model_version``. Files are read and scored ``batch_size`` rows at a
time (bounded memory) and each output file is written atomically, so a failure never leaves a
half-written file. ``flows/batch_score.py`` orchestrates this with Prefect.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.errors import DataError
from model.files import atomic_path
from serving.model import LoadedModel
from serving.payloads import PayloadError, check_frame

if TYPE_CHECKING:
    import pandas as pd


logger = logging.getLogger(__name__)

VERSION_COLUMN = "model_version"


# --- pure core --------------------------------------------------------------------------------


def score_frame(model: LoadedModel, frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with the model's predictions and ``model_version`` appended, row for row.

    Raises:
        PayloadError: a signature column is missing or of the wrong type, or an output
            column name is already taken by an input column.
    """
    import pandas as pd

    check_frame(frame, model.spec)
    frame = frame.reset_index(drop=True)
    if len(frame):
        given = [name for name in model.spec.names if name in frame.columns]  # some optional
        predictions = model.predict(frame[given]).reset_index(drop=True)
    else:  # the preprocessor refuses 0 rows; an empty file still gets the output columns
        predictions = pd.DataFrame(
            {name: pd.Series(dtype="float64") for name in model.output_columns}
        )
    taken = [c for c in [*predictions.columns, VERSION_COLUMN] if c in frame.columns]
    if taken:
        raise PayloadError(
            f"input already has the output column(s) {taken}; rename them", columns=taken
        )
    version = pd.Series([model.label] * len(frame), name=VERSION_COLUMN, dtype="string")
    return pd.concat([frame, predictions, version], axis=1)


def plan_outputs(source: str | Path, dest: str | Path) -> list[tuple[Path, Path]]:
    """(input file, output file) pairs: a file maps to ``dest`` (or ``dest/<name>`` when
    ``dest`` is a folder), a folder's ``*.parquet`` files to the same relative paths in ``dest``.

    Raises:
        DataError: the source does not exist or holds no Parquet file.
    """
    source, dest = Path(source), Path(dest)
    if source.is_file():
        return [(source, dest / source.name if dest.is_dir() or dest.suffix == "" else dest)]
    if not source.is_dir():
        raise DataError("input not found", file=str(source), rule="exists")
    files = sorted(
        p
        for p in source.rglob("*.parquet")
        if not any(part.startswith((".", "_")) for part in p.relative_to(source).parts)
    )
    if not files:
        raise DataError("no *.parquet files in the folder", file=str(source), rule="not_empty")
    return [(src, dest / src.relative_to(source)) for src in files]


# --- I/O --------------------------------------------------------------------------------------


def score_file(
    model: LoadedModel, src: str | Path, dest: str | Path, batch_size: int = 10_000
) -> int:
    """Score one Parquet file into ``dest`` (atomic), ``batch_size`` rows at a time.

    Returns:
        The number of rows scored.

    Raises:
        DataError: naming the file (and column) when it cannot be read or scored.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = Path(src)
    try:
        parquet = pq.ParquetFile(src)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            f"not a readable Parquet file: {exc}", file=str(src), rule="parquet"
        ) from exc
    rows, writer = 0, None
    with atomic_path(dest) as tmp:
        batches = parquet.iter_batches(batch_size=batch_size)
        for batch in _with_empty_fallback(batches, parquet.schema_arrow):
            table = _score_batch(model, batch, src)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table.cast(writer.schema))
            rows += batch.num_rows
        writer.close()
    logger.info(
        "scored %d row(s) of %s with %s v%s -> %s", rows, src, model.name, model.label, dest
    )
    return rows


def _with_empty_fallback(batches: Any, schema: Any) -> Iterator[Any]:
    import pyarrow as pa

    empty = True
    for batch in batches:
        empty = False
        yield batch
    if empty:
        yield pa.RecordBatch.from_pylist([], schema=schema)


def _score_batch(model: LoadedModel, batch: Any, src: Path) -> Any:
    import pyarrow as pa

    try:
        scored = score_frame(model, batch.to_pandas())
    except PayloadError as exc:
        raise DataError(
            exc.message,
            file=str(src),
            column=exc.columns[0] if exc.columns else None,
            rule="model_signature",
        ) from exc
    return pa.Table.from_pandas(scored, preserve_index=False)
