"""File sources for ingest: local paths under ``ingest.data_root`` and fsspec URLs.

A source is one CSV/Parquet file, a folder of them, or a hive-partitioned Parquet folder
(``year=2024/month=01/part-0.parquet``; the partition keys become columns). Local paths must
resolve (symlinks followed) inside ``ingest.data_root``. URLs are read through fsspec:
``https://`` works out of the box (aiohttp); ``s3://`` needs ``pip install s3fs`` and ``gs://``
``pip install gcsfs``, with credentials from their usual places (AWS_* / ~/.aws, gcloud),
never from params.yaml. A secret in the URL itself (a presigned URL's signature, user:password@)
is used for the fetch only: file names, errors and logs show it as ``***``
(stages/common/redact.py), and ``${NAME}`` in the URL is read from the environment when the URL
is opened, so the secret can stay out of params.yaml, git and dvc.lock.

Every reader yields Arrow record batches, so memory stays bounded by the batch size whatever
the file size; every failure is a DataError naming the file (and the column) and the rule.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from stages.common.config import IngestParams
from stages.common.csvfiles import iter_csv_batches
from stages.common.errors import DataError
from stages.common.redact import expand_env, has_credentials, redact_url, scrub, scrubbed_logs

logger = logging.getLogger(__name__)

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}  # suffix -> format
DRIVERS = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
}  # fsspec protocol -> the package that provides it


@dataclass(frozen=True)
class SourceFile:
    """One file to read: its name in errors, its format and how to open it."""

    name: str
    format: str  # "csv" | "parquet"
    path: str  # path for ``filesystem`` (local: the resolved path)
    filesystem: Any = None  # an fsspec filesystem; None = local


@dataclass(frozen=True)
class FileSet:
    """The files of a source, in read order, and the hive base folder when partitioned."""

    files: list[SourceFile]
    hive_root: str | None = None


def iter_file_batches(params: IngestParams, batch_rows: int, schema: Any = None) -> Iterator[Any]:
    """Record batches of a path or URL source, file after file in sorted order.

    ``schema`` (an existing dataset's) pins the CSV column types; otherwise the first file's
    types pin the later files'.
    """
    if params.kind != "url":
        yield from _iter_fileset(list_path_files(params), params, batch_rows, schema)
        return
    with scrubbed_logs(expand_env_or_same(params.source)):
        yield from _iter_fileset(list_url_files(params), params, batch_rows, schema)


def _iter_fileset(
    fileset: FileSet, params: IngestParams, batch_rows: int, schema: Any
) -> Iterator[Any]:
    if fileset.hive_root is not None:
        for batch in iter_hive_batches(fileset, batch_rows):
            schema = schema if schema is not None else plain_schema(batch.schema)
            yield conform_batch(batch, schema, redact_url(params.source))
        return
    for file in fileset.files:
        for batch in iter_one_file(file, params.delimiter, batch_rows, schema):
            schema = schema if schema is not None else plain_schema(batch.schema)
            yield conform_batch(batch, schema, file.name)


# ----------------------------------------------------------------------------- local paths


def resolve_source_path(source: str, data_root: str) -> Path:
    """``source`` resolved (symlinks followed); it must lie inside ``data_root`` and exist."""
    root, path = Path(data_root).resolve(), Path(source).resolve()
    if not path.is_relative_to(root):
        raise DataError(
            f"source path resolves to {path}, outside ingest.data_root ({root}): "
            f"put the data under {data_root}/",
            file=source,
            rule="inside_data_root",
        )
    if not path.exists():
        raise DataError(
            "source not found (set ingest.source in params.yaml)", file=source, rule="exists"
        )
    return path


def list_path_files(params: IngestParams) -> FileSet:
    """The files of a local source: the file itself, or the data files in a folder."""
    path = resolve_source_path(params.source, params.data_root)
    if path.is_file():
        return FileSet([SourceFile(params.source, pick_format(params.source, params), str(path))])
    root = Path(params.data_root).resolve()
    found = sorted(p for p in path.rglob("*") if p.is_file() and _is_data_file(p, path))
    files = []
    for file in found:
        name = str(Path(params.source) / file.relative_to(path))
        resolve_source_path(str(file), str(root))  # a symlink inside may point outside
        if params.format != "auto" or file.suffix.lower() in FORMATS:
            files.append(SourceFile(name, pick_format(name, params), str(file.resolve())))
    return _as_fileset(
        files, params.source, is_hive([f.relative_to(path) for f in found]), str(path)
    )


def _is_data_file(file: Path, folder: Path) -> bool:
    # Hidden and underscore files (_SUCCESS, .crc, _common_metadata) are not data.
    return not any(part.startswith((".", "_")) for part in file.relative_to(folder).parts)


def is_hive(relative: list[PurePosixPath] | list[Path]) -> bool:
    """True when the files sit in ``key=value`` folders (hive partitioning)."""
    return any("=" in part for rel in relative for part in rel.parts[:-1])


def _as_fileset(files: list[SourceFile], source: str, hive: bool, root: str) -> FileSet:
    if not files:
        raise DataError(f"folder holds no {'/'.join(FORMATS)} files", file=source, rule="not_empty")
    if hive and any(file.format != "parquet" for file in files):
        raise DataError(
            "a partitioned (key=value) folder must hold Parquet files only",
            file=source,
            rule="format",
        )
    return FileSet(files, root if hive else None)


def pick_format(name: str, params: IngestParams) -> str:
    """``params.format``, or the format the file suffix names (DataError: rule extension)."""
    if params.format != "auto":
        return params.format
    suffix = PurePosixPath(name).suffix.lower()
    if suffix not in FORMATS:
        raise DataError(
            f"unsupported file type {suffix or '(none)'!r} (use "
            f"{', '.join(FORMATS)}, or set ingest.format)",
            file=name,
            rule="extension",
        )
    return FORMATS[suffix]


# ----------------------------------------------------------------------------- URLs


def open_url_filesystem(url: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path)`` for ``url``; a missing driver names the package."""
    import fsspec

    protocol = url.split("://", 1)[0].lower()
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        package = DRIVERS.get(protocol, f"the fsspec driver for {protocol}://")
        raise DataError(
            f"reading {protocol}:// URLs needs the {package} package: "
            f"`.venv/bin/pip install {package}`",
            file=url,
            rule="driver",
        ) from exc


def list_url_files(params: IngestParams) -> FileSet:
    """The files of a URL source: the file itself, or (object stores) the files under it."""
    url, shown = opened_url(params.source), redact_url(params.source)
    fs, path = open_url_filesystem(url)
    protocol = url.split("://", 1)[0].lower()
    with network_errors(shown, secret=url):
        folder = protocol not in ("http", "https") and fs.isdir(path)
        if not folder:
            fs.info(path)  # FileNotFoundError (404) or a connection error, named below
            return FileSet([SourceFile(shown, pick_format(url.split("?")[0], params), path, fs)])
        found = sorted(p for p in fs.find(path) if not PurePosixPath(p).name.startswith((".", "_")))
    base = PurePosixPath(path)
    relative = [PurePosixPath(p).relative_to(base) for p in found]
    files = [
        SourceFile(
            f"{shown.rstrip('/')}/{rel}", pick_format(f"{shown.rstrip('/')}/{rel}", params), p, fs
        )
        for p, rel in zip(found, relative, strict=True)
        if params.format != "auto" or rel.suffix.lower() in FORMATS
    ]
    return _as_fileset(files, shown, is_hive(relative), path)


def opened_url(source: str) -> str:
    """``source`` as fetched: ``${NAME}`` read from the environment (DataError if unset).

    A secret written into params.yaml is warned about: redacted here, it is still in git.
    """
    if has_credentials(source):
        logger.warning(
            "ingest.source holds credentials (shown as ***): the manifest, logs and "
            "MLflow get %s, but params.yaml, git and dvc.lock keep them; write the "
            "secret as ${NAME} (e.g. ?X-Amz-Signature=${SALES_SIG}) and export "
            "NAME instead",
            redact_url(source),
        )
    try:
        return expand_env(source)
    except KeyError as exc:
        raise DataError(
            f"ingest.source uses ${{{exc.args[0]}}} but the environment variable "
            f"{exc.args[0]} is not set: export it before the run",
            file=redact_url(source),
            rule="env",
        ) from exc


def expand_env_or_same(source: str) -> str:
    """``source`` with ``${NAME}`` expanded where set (what the log filter must mask)."""
    try:
        return expand_env(source)
    except KeyError:
        return source  # opened_url reports the unset variable


@contextmanager
def network_errors(url: str | None, secret: str | None = None) -> Iterator[None]:
    """Turn a network/driver failure inside the block into a DataError naming the URL.

    ``url`` None (a local file): errors pass through unchanged. ``secret``: the URL as
    fetched, whose credentials are masked in the message (``url`` is the redacted name).
    """
    try:
        yield
    except DataError:
        raise
    except Exception as exc:  # aiohttp, botocore, gcsfs...: each library has its own errors
        if url is None:
            raise
        # a URL with credentials: no chained cause, whose text (and traceback) would quote them
        origin = None if secret is not None and has_credentials(secret) else exc
        cause = exc.__cause__  # fsspec's HTTP reports a refused connection as "not found"
        if (status := _http_status(exc)) in (401, 403):  # fsspec: "not found" too
            raise DataError(
                f"the server refused access (HTTP {status}): the credentials are "
                "wrong or expired (a presigned URL expires: sign a new one)",
                file=url,
                rule="access",
            ) from origin
        if isinstance(exc, FileNotFoundError) and not isinstance(cause, OSError):
            raise DataError(
                "nothing at this URL (HTTP 404 / no such object)", file=url, rule="exists"
            ) from origin
        shown = cause if isinstance(cause, OSError) else exc
        text = scrub(f"{type(shown).__name__}: {shown}", secret or url)
        raise DataError(f"cannot reach the URL: {text}", file=url, rule="reachable") from origin


def _http_status(exc: BaseException | None) -> int | None:
    """The HTTP status of an aiohttp error in ``exc``'s chain (None: no HTTP answer)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(getattr(exc, "status", None), int):
            return exc.status
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


# ----------------------------------------------------------------------------- readers


def iter_one_file(
    file: SourceFile, delimiter: str, batch_rows: int, schema: Any = None
) -> Iterator[Any]:
    """Record batches of one CSV or Parquet file."""
    if file.format == "csv":
        types = dict(zip(schema.names, schema.types, strict=True)) if schema else None
        yield from _guarded(file, iter_csv_batches(_csv_opener(file), file.name, delimiter, types))
    else:
        yield from iter_hive_batches(FileSet([file]), batch_rows)


def _csv_opener(file: SourceFile) -> Callable[[], Any]:
    if file.filesystem is None:
        return lambda: file.path  # pyarrow reads local files natively
    protocol = file.filesystem.protocol
    http = "http" in (protocol if isinstance(protocol, tuple) else (protocol,))
    # block_size=0: a plain streaming GET, no HTTP range requests needed
    return lambda: file.filesystem.open(file.path, "rb", **({"block_size": 0} if http else {}))


def _guarded(file: SourceFile, batches: Iterator[Any]) -> Iterator[Any]:
    with network_errors(file.name if file.filesystem is not None else None, file.path):
        yield from batches


def check_parquet_files(fileset: FileSet) -> Any:
    """Each file's footer is readable and has the first file's schema; return that schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    first = None
    for file in fileset.files:
        try:
            if _size(file) == 0:
                raise DataError("file is empty (0 bytes)", file=file.name, rule="not_empty")
            found = pq.read_schema(file.path, filesystem=_arrow_fs(file))
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise DataError(
                f"not a readable Parquet file (truncated or corrupt?): {exc}",
                file=file.name,
                rule="parquet",
            ) from exc
        first = found if first is None else first
        check_schema(found, first, file.name, reference="the first file")
    return first


def _size(file: SourceFile) -> int:
    return (
        Path(file.path).stat().st_size
        if file.filesystem is None
        else file.filesystem.size(file.path)
    )


def _arrow_fs(file: SourceFile) -> Any:
    if file.filesystem is None:
        return None
    import pyarrow.fs as pafs

    return pafs.PyFileSystem(pafs.FSSpecHandler(file.filesystem))


def iter_hive_batches(fileset: FileSet, batch_rows: int) -> Iterator[Any]:
    """Record batches of Parquet files (hive partition keys as columns when partitioned)."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    first = fileset.files[0]
    with network_errors(first.name if first.filesystem is not None else None, first.path):
        check_parquet_files(fileset)
        dataset = ds.dataset(
            [f.path for f in fileset.files],
            format="parquet",
            filesystem=_arrow_fs(fileset.files[0]),
            partitioning="hive" if fileset.hive_root else None,
            partition_base_dir=fileset.hive_root,
        )
        try:
            yield from dataset.to_batches(
                batch_size=batch_rows, batch_readahead=2, fragment_readahead=1
            )
        except (pa.ArrowException, OSError) as exc:
            raise DataError(
                f"not a readable Parquet file (truncated or corrupt?): {exc}",
                file=fileset.files[0].name,
                rule="parquet",
            ) from exc


def check_schema(found: Any, expected: Any, name: str, reference: str = "the dataset") -> None:
    """Raise DataError (rule same_schema) naming the first column whose name or type differs.

    Column order may differ (batches are reordered to the dataset's), and so may the storage
    of a type (string / large_string / dictionary of strings); names and types may not.
    """
    if found.names == expected.names and found.types == expected.types:
        return
    for column in list(expected.names) + [n for n in found.names if n not in expected.names]:
        if column not in found.names or column not in expected.names:
            where = "this file" if column in found.names else reference
            raise DataError(
                f"columns differ from {reference}'s ({column!r} is only in {where})",
                file=name,
                column=column,
                rule="same_schema",
            )
        ours, theirs = found.field(column).type, expected.field(column).type
        if not same_kind(ours, theirs):
            raise DataError(
                f"type {ours} differs from {reference}'s {theirs}",
                file=name,
                column=column,
                rule="same_schema",
            )


def plain_type(arrow_type: Any) -> Any:
    """``arrow_type`` without storage variants: large_string -> string, dictionary -> values."""
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    return {pa.large_string(): pa.string(), pa.large_binary(): pa.binary()}.get(
        arrow_type, arrow_type
    )


def same_kind(ours: Any, theirs: Any) -> bool:
    """Equal plain types, or timestamps that differ only in unit (cast without loss)."""
    import pyarrow as pa

    if pa.types.is_timestamp(ours) and pa.types.is_timestamp(theirs):
        return ours.tz == theirs.tz
    return plain_type(ours) == plain_type(theirs)


def plain_schema(schema: Any) -> Any:
    """``schema`` with plain types, every field nullable and no metadata (pandas')."""
    import pyarrow as pa

    return pa.schema([pa.field(field.name, plain_type(field.type)) for field in schema])


def conform_batch(batch: Any, schema: Any, name: str) -> Any:
    """``batch`` with ``schema``'s column order and types; DataError if it really differs."""
    import pyarrow as pa

    check_schema(batch.schema, schema, name)
    columns = [batch.column(field.name) for field in schema]
    return pa.RecordBatch.from_arrays(
        [
            col if col.type == field.type else _cast(col, field, name)
            for col, field in zip(columns, schema, strict=True)
        ],
        schema=schema,
    )


def _cast(column: Any, field: Any, name: str) -> Any:
    import pyarrow as pa

    try:
        return column.cast(field.type)  # safe: a lossy cast (ns -> s with a fraction) fails
    except pa.ArrowInvalid as exc:
        raise DataError(
            f"{column.type} values do not fit the dataset's {field.type}: {exc}",
            file=name,
            column=field.name,
            rule="same_schema",
        ) from exc
