"""Stream a CSV file as Arrow record batches, turning every parse failure into a clear DataError.

pyarrow's streaming reader (``pyarrow.csv.open_csv``) infers the column types from the first
block and then converts each later block to them; its errors name columns by index
("In CSV column #3: ..."). Here they become a DataError naming the file, the column and the
rule: ``not_empty``, ``utf8``, ``delimiter``, ``duplicate_header``, ``type`` or ``csv``.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable, Iterator
from typing import Any

from stages.common.errors import DataError

BLOCK_BYTES = 4 << 20  # bytes per CSV block: types are inferred from the first one
HEAD_BYTES = 1 << 16  # sniffed before parsing: empty / whitespace-only / UTF-16
OTHER_DELIMITERS = (",", ";", "\t", "|")
_CONVERSION = re.compile(r"In CSV column #(\d+): CSV conversion error to ([^:]+): (.*)", re.S)

Opener = Callable[[], Any]  # returns a path, a pyarrow NativeFile or a binary file object


def iter_csv_batches(
    open_stream: Opener, name: str, delimiter: str, column_types: dict[str, Any] | None = None
) -> Iterator[Any]:
    """Record batches of the CSV that ``open_stream()`` opens; ``name`` is used in errors.

    ``column_types`` (column -> pyarrow type) pins the types instead of inferring them (a
    later file of a folder, or rows appended to an existing dataset).
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    head = read_head(open_stream)
    check_head(head, name)
    options = dict(
        read_options=pacsv.ReadOptions(block_size=BLOCK_BYTES),
        parse_options=pacsv.ParseOptions(delimiter=delimiter),
        convert_options=pacsv.ConvertOptions(
            column_types=column_types or {}, strings_can_be_null=True
        ),
    )
    try:
        reader = pacsv.open_csv(open_stream(), **options)
    except pa.ArrowInvalid as exc:
        raise explain_csv_error(exc, name, header_names(head, delimiter), open_stream) from exc
    names = reader.schema.names
    check_columns(reader.schema, name, delimiter, open_stream)
    rows = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        except pa.ArrowInvalid as exc:
            raise explain_csv_error(exc, name, names, open_stream) from exc
        check_no_header_row(batch, name, rows)
        rows += batch.num_rows
        yield batch
    if rows == 0:
        raise DataError(
            f"no data rows, only a header ({len(names)} columns)", file=name, rule="not_empty"
        )


def read_head(open_stream: Opener) -> bytes:
    """The first ``HEAD_BYTES`` bytes of the file."""
    import pyarrow as pa

    source = open_stream()
    if isinstance(source, str):
        source = pa.input_stream(source)
    with source as stream:
        return bytes(stream.read(HEAD_BYTES))


def check_head(head: bytes, name: str) -> None:
    """Raise DataError for an empty, whitespace-only or UTF-16 file (rules not_empty, utf8)."""
    if not head:
        raise DataError("file is empty (0 bytes)", file=name, rule="not_empty")
    if len(head) < HEAD_BYTES and not head.strip():
        raise DataError(
            "file holds only whitespace: no header and no rows", file=name, rule="not_empty"
        )
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(
            "file is UTF-16, not UTF-8: convert it, e.g. "
            "`iconv -f utf-16 -t utf-8 in.csv > out.csv`",
            file=name,
            rule="utf8",
        )


def header_names(head: bytes, delimiter: str) -> list[str]:
    """The column names on the first line of ``head`` (for errors raised before the reader
    knows them)."""
    import csv

    first = head.decode("utf-8", errors="replace").splitlines()[:1]
    return next(csv.reader(first, delimiter=delimiter), [])


def check_columns(schema: Any, name: str, delimiter: str, open_stream: Opener) -> None:
    """Raise DataError for a wrong delimiter (rule delimiter) or a non-UTF-8 column (utf8)."""
    import pyarrow as pa

    if len(schema.names) == 1:
        found = [sep for sep in OTHER_DELIMITERS if sep != delimiter and sep in schema.names[0]]
        if found:
            shown = "\\t" if found[0] == "\t" else found[0]
            raise DataError(
                f"the whole header is one column {schema.names[0]!r}: the file "
                f"looks '{shown}'-separated: set ingest.delimiter",
                file=name,
                column=schema.names[0],
                rule="delimiter",
            )
    for field in schema:
        if pa.types.is_binary(field.type):
            raise DataError(
                f"values are not valid UTF-8{guess_encoding(open_stream)}",
                file=name,
                column=field.name,
                rule="utf8",
            )


def check_no_header_row(batch: Any, name: str, rows_before: int) -> None:
    """Raise DataError (rule duplicate_header) if a data row repeats the header line."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not all(pa.types.is_string(field.type) for field in batch.schema):
        return  # a typed (non-string) column cannot hold its own name
    mask = None
    for column, field in zip(batch.columns, batch.schema, strict=True):
        equal = pc.fill_null(pc.equal(column, field.name), False)
        mask = equal if mask is None else pc.and_(mask, equal)
    if mask is not None and pc.any(mask).as_py():
        row = rows_before + pc.index(mask, True).as_py() + 1
        raise DataError(
            f"data row {row} repeats the header line (concatenated exports?)",
            file=name,
            rule="duplicate_header",
        )


def explain_csv_error(
    exc: Exception, name: str, names: list[str], open_stream: Opener
) -> DataError:
    """A DataError naming the file, the column and the rule for a pyarrow CSV error."""
    message = str(exc)
    if "Empty CSV file" in message:
        return DataError("file has no header and no rows", file=name, rule="not_empty")
    match = _CONVERSION.match(message)
    if not match:
        return DataError(f"not a readable CSV file: {message}", file=name, rule="csv")
    index, type_name, detail = int(match[1]), match[2], match[3].strip()
    column = names[index] if index < len(names) else f"#{index}"
    if "invalid UTF8" in detail:
        return DataError(
            f"values are not valid UTF-8{guess_encoding(open_stream)}",
            file=name,
            column=column,
            rule="utf8",
        )
    value = re.fullmatch(r"invalid value '(.*)'", detail, re.S)
    if value and value[1] == column:
        return DataError(
            "a data row repeats the header line (concatenated exports?)",
            file=name,
            column=column,
            rule="duplicate_header",
        )
    shown = repr(value[1]) if value else detail
    return DataError(
        f"value {shown} does not convert to {type_name}, the type inferred from the earlier rows",
        file=name,
        column=column,
        rule="type",
    )


def guess_encoding(open_stream: Opener) -> str:
    """'; it looks <encoding>: convert it ...' from the first bytes that are not UTF-8."""
    import pyarrow as pa

    decoder = codecs.getincrementaldecoder("utf-8")()
    source = open_stream()
    if isinstance(source, str):
        source = pa.input_stream(source)
    offset = 0
    with source as stream:
        while chunk := bytes(stream.read(1 << 20)):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                return _describe_bad_bytes(chunk[exc.start : exc.start + 8], offset + exc.start)
            offset += len(chunk)
    return ""


def _describe_bad_bytes(bad: bytes, offset: int) -> str:
    # Bytes 0x80-0x9f are control codes in latin-1 but letters/quotes in windows-1252.
    encoding, iconv = (
        ("windows-1252", "cp1252") if 0x80 <= bad[0] <= 0x9F else ("latin-1 (ISO-8859-1)", "latin1")
    )
    return (
        f" (first bad byte 0x{bad[0]:02x} at byte {offset}: {bad!r}); it looks "
        f"{encoding}: convert it, e.g. `iconv -f {iconv} -t utf-8 in.csv > out.csv`"
    )
