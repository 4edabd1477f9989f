"""SQL sources for ingest: a table or a SELECT read through SQLAlchemy 2.0, in chunks.

``ingest.source`` is a SQLAlchemy URL without a password, e.g.
``postgresql+psycopg://etl@db.internal:5432/sales`` (``postgresql://`` means the same: psycopg 3
is the driver installed). The password comes from libpq's usual places: the ``PGPASSWORD``
environment variable or ``~/.pgpass`` (never from params.yaml, so it never reaches git or DVC).
Rows stream through a server-side cursor ``base.batch_rows`` at a time; with a watermark the
WHERE clause (``column > :after``, a bound parameter) runs in the database.

A ``sqlite:`` database is a local file, so like any local source it must exist and lie inside
``ingest.data_root`` (``sqlite:///data/source/sales.db``; symlinks are followed).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stages.common.config import IngestParams
from stages.common.errors import ConfigError, DataError

# PostgreSQL type OIDs -> Arrow type names; anything else is read as text.
PG_TYPES = {
    16: "bool",
    20: "int64",
    21: "int16",
    23: "int32",
    26: "int64",
    700: "float32",
    701: "float64",
    1700: "float64",
    25: "string",
    1042: "string",
    1043: "string",
    19: "string",
    1082: "date32",
    1114: "timestamp",
    1184: "timestamptz",
}


def source_url(source: str) -> Any:
    """The SQLAlchemy URL of ``source``; a password in it is a ConfigError."""
    from sqlalchemy.engine import make_url

    url = make_url(source)
    if url.password is not None:
        raise ConfigError(
            "ingest.source: remove the password from the database URL; set "
            "PGPASSWORD or use ~/.pgpass (libpq reads both)"
        )
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")  # psycopg 3, not the default psycopg2
    return url


def engine_url(params: IngestParams) -> Any:
    """The URL to connect to: ``source_url``, and a sqlite file checked against the data root.

    Raises:
        DataError: the sqlite file is missing or lies outside ``ingest.data_root`` (sqlite
            would create a missing file, and read any file the process can).
    """
    url = source_url(params.source)
    database = url.database or ""
    if url.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        return url
    if url.query.get("uri") == "true" or database.startswith("file:"):
        database = database.removeprefix("file:").split("?", 1)[0]
    root, path = Path(params.data_root).resolve(), Path(database).resolve()
    if not path.is_relative_to(root):
        raise DataError(
            f"sqlite database {database} resolves to {path}, outside "
            f"ingest.data_root ({root}): move it under {params.data_root}/ and set "
            f"ingest.source: sqlite:///{params.data_root}/{path.name}",
            file=shown_url(params.source),
            rule="inside_data_root",
        )
    if not path.is_file():
        raise DataError(
            f"sqlite database {path} not found (sqlite would create an empty one):"
            f" check ingest.source",
            file=shown_url(params.source),
            rule="exists",
        )
    return url


def shown_url(source: str) -> str:
    """``source`` as it may appear in logs and errors (no password)."""
    from sqlalchemy.engine import make_url

    return make_url(source).render_as_string(hide_password=True)


@contextmanager
def sql_errors(params: IngestParams) -> Iterator[None]:
    """Turn a SQLAlchemy/driver failure into a DataError naming the URL and table/query."""
    import sqlalchemy.exc as sa_exc

    name = shown_url(params.source)
    what = f"table {params.table!r}" if params.table else "the query"
    try:
        yield
    except sa_exc.NoSuchModuleError as exc:
        raise DataError(
            f"no SQLAlchemy driver for this URL: {exc}", file=name, rule="driver"
        ) from exc
    except sa_exc.OperationalError as exc:
        raise DataError(
            f"cannot connect or read {what}: {_first_line(exc)}", file=name, rule="connect"
        ) from exc
    except sa_exc.DBAPIError as exc:
        raise DataError(
            f"the database refused {what}: {_first_line(exc)}", file=name, rule="sql"
        ) from exc


def _first_line(exc: Any) -> str:
    return str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]


def build_select(params: IngestParams, after: Any = None, upto: bool = False) -> Any:
    """SELECT * from the table or query; with a watermark, ``column > :after`` and ordered.

    ``upto`` selects the count of rows with ``column <= :after`` instead (rows already
    ingested, or late arrivals).
    """
    import sqlalchemy as sa

    if params.table:
        schema, _, table = params.table.rpartition(".")
        source = sa.table(table, schema=schema or None).alias("src")
    else:
        source = sa.text(params.query).columns().subquery("src")
    if params.watermark is None or after is None and not upto:
        select = sa.select(sa.text("*")).select_from(source)
        return select.order_by(sa.column(params.watermark)) if params.watermark else select
    column, bound = sa.column(params.watermark), sa.bindparam("after", after)
    if upto:
        return sa.select(sa.func.count()).select_from(source).where(column <= bound)
    return sa.select(sa.text("*")).select_from(source).where(column > bound).order_by(column)


def read_sql_schema(conn: Any, params: IngestParams) -> tuple[list[str], list[Any] | None]:
    """Column names and (PostgreSQL) Arrow types of the source, from a zero-row probe.

    The target and watermark columns must be among them.
    """
    probe = build_select(params.model_copy(update={"watermark": None})).limit(0)
    result = conn.execute(probe)
    names = list(result.keys())
    types = arrow_types(result.cursor.description, conn.dialect.name)
    result.close()
    for column, rule in (
        (params.target, "target_present"),
        (params.watermark, "watermark_present"),
    ):
        if column is not None and column not in names:
            raise DataError(
                f"column {column!r} not in the source; columns are: {', '.join(names[:20])}",
                file=shown_url(params.source),
                column=column,
                rule=rule,
            )
    return names, types


def arrow_types(description: Any, dialect: str) -> list[Any] | None:
    """Arrow types from a DB-API cursor description (PostgreSQL OIDs); None elsewhere."""
    import pyarrow as pa

    if dialect != "postgresql" or description is None:
        return None
    named = {"timestamp": pa.timestamp("us"), "timestamptz": pa.timestamp("us", tz="UTC")}
    return [
        named.get(PG_TYPES.get(col.type_code, "string"))
        or pa.type_for_alias(PG_TYPES.get(col.type_code, "string"))
        for col in description
    ]


def rows_to_batch(rows: list[tuple], names: list[str], types: list[Any] | None) -> Any:
    """One record batch from DB-API rows (column-wise conversion, no per-value Python)."""
    import pyarrow as pa

    columns = list(zip(*rows, strict=True)) if rows else [() for _ in names]
    arrays = [
        _to_array(list(values), types[i] if types else None) for i, values in enumerate(columns)
    ]
    return pa.RecordBatch.from_arrays(arrays, names=names)


def _to_array(values: list, arrow_type: Any) -> Any:
    import pyarrow as pa

    try:
        return pa.array(values, type=arrow_type)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        if arrow_type == pa.string():  # uuid, json, arrays...: their text form
            return pa.array([None if v is None else str(v) for v in values], pa.string())
        return pa.array(values).cast(arrow_type)  # numeric (Decimal) -> float64


def iter_sql_batches(params: IngestParams, batch_rows: int, after: Any = None) -> Iterator[Any]:
    """Record batches of the table/query (rows with watermark > ``after`` when given)."""
    import sqlalchemy as sa

    with sql_errors(params):
        engine = sa.create_engine(engine_url(params))
        try:
            with engine.connect() as conn:
                names, types = read_sql_schema(conn, params)
                # a server-side cursor: the database sends batch_rows rows at a time
                streaming = conn.execution_options(stream_results=True, yield_per=batch_rows)
                result = streaming.execute(build_select(params, after))
                chunks = result.partitions(batch_rows)
                for rows in chunks:
                    batch = rows_to_batch(rows, names, types)
                    types = types or batch.schema.types  # elsewhere: the first chunk's
                    yield batch
        finally:
            engine.dispose()


def count_sql_rows_upto(params: IngestParams, after: Any) -> int:
    """Rows of the source with watermark <= ``after`` (the ones ingested before)."""
    import sqlalchemy as sa

    with sql_errors(params):
        engine = sa.create_engine(engine_url(params))
        try:
            with engine.connect() as conn:
                return int(conn.execute(build_select(params, after, upto=True)).scalar_one())
        finally:
            engine.dispose()
