"""Incremental ingestion: keep the source rows newer than the last ingested watermark.

The watermark is a timestamp or increasing-id column (params ``ingest.watermark``); the
manifest of ``data/raw`` records its largest ingested value. File sources are filtered batch by
batch with pyarrow compute; SQL sources filter in the database (stages/ingest/sql.py) and are
only checked here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from stages.common.config import IngestParams
from stages.common.errors import DataError


def filter_new_rows(
    batches: Iterator[Any], params: IngestParams, after: Any, ingested_rows: int, name: str
) -> Iterator[Any]:
    """The non-empty batches, keeping only rows with watermark > ``after`` when given.

    Raises DataError: a null watermark (rule watermark_not_null); a row that is not newer
    (watermark_order); more source rows at or below ``after`` than the ``ingested_rows``
    ingested before (late arrivals that an append would silently drop: watermark_order).
    """
    import pyarrow.compute as pc

    column, old_rows = params.watermark, 0
    for batch in batches:
        if column is not None and batch.column(column).null_count:
            raise DataError(
                "the watermark column has missing values",
                file=name,
                column=column,
                rule="watermark_not_null",
            )
        if after is not None and params.kind != "sql":
            newer = pc.greater(batch.column(column), after)
            old_rows += batch.num_rows - newer.true_count
            batch = batch.filter(newer)
        if (
            after is not None
            and batch.num_rows
            and not pc.all(pc.greater(batch.column(column), after)).as_py()
        ):
            raise DataError(
                f"rows are not newer than the last ingested {column} = {after}",
                file=name,
                column=column,
                rule="watermark_order",
            )
        if batch.num_rows:
            yield batch
    if after is not None:
        if params.kind == "sql":
            from stages.ingest.sql import count_sql_rows_upto

            old_rows = count_sql_rows_upto(params, after.as_py())
        check_no_late_rows(old_rows, ingested_rows, column, after, name)


def check_no_late_rows(
    old_rows: int, ingested_rows: int, column: str, after: Any, name: str
) -> None:
    """Raise DataError (rule watermark_order) if rows arrived with an old watermark."""
    if old_rows > ingested_rows:
        raise DataError(
            f"{old_rows} source rows have {column} <= {after} but only "
            f"{ingested_rows} were ingested: {old_rows - ingested_rows} rows arrived "
            f"late (not newer than the watermark) and would be lost; fix the source "
            f"or delete data/raw to re-ingest everything",
            file=name,
            column=column,
            rule="watermark_order",
        )


def to_json_value(scalar: Any) -> Any:
    """A watermark value for the manifest: numbers and text as they are, times as ISO text."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if (
        pa.types.is_integer(scalar.type)
        or pa.types.is_floating(scalar.type)
        or pa.types.is_string(scalar.type)
        or pa.types.is_boolean(scalar.type)
    ):
        return scalar.as_py()
    return pc.cast(scalar, pa.string()).as_py()


def from_json_value(value: Any, arrow_type: Any) -> Any:
    """The manifest's watermark value as an Arrow scalar of the column's type."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(value, str) and not pa.types.is_string(arrow_type):
        return pc.cast(pa.scalar(value), arrow_type)
    return pa.scalar(value, type=arrow_type)


def column_max(batch: Any, column: str, running: Any) -> Any:
    """The larger of ``running`` and the batch's largest ``column`` value."""
    import pyarrow.compute as pc

    found = pc.max(batch.column(column))
    return found if running is None else pc.max_element_wise(running, found)
