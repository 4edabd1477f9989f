"""Row-level rules on Arrow arrays: which raw types fit a suite type, casting, the checks.

Everything here works on one record batch at a time with ``pyarrow.compute``, no per-row Python.
A check returns a boolean array, True for a bad row; nulls are only ever bad for ``not_null``.
Rule names (the ``_rule`` column of ``data/quarantine/rows.parquet``):

- ``not_null``  a null where the suite (no ``mostly``) or params ``not_null`` forbids one;
- ``finite``    NaN or +-inf in a float (or int) column;
- ``between``   outside the suite's ``expect_column_values_to_be_between`` range;
- ``in_set``    not in the suite's (or params') value set;
- ``label``     a target value not in the suite's label set;
- ``min`` / ``max`` / ``positive``  params ``validate.rules`` on top of the suite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stages.common.config import ColumnRuleParams
from stages.common.errors import ConfigError, GateError
from stages.common.suite import Suite

NUMBER_PATTERN = r"^\s*[-+]?((\d+\.?\d*)|(\.\d+))([eE][-+]?\d+)?\s*$|^\s*[-+]?(nan|inf)\s*$"


def gate_error(
    message: str, *, file: str | None = None, column: str | None = None, rule: str | None = None
) -> GateError:
    """A GateError rendered like DataError (``msg [file=..., column=..., rule=...]``)."""
    where = ", ".join(
        f"{key}={value}"
        for key, value in (("file", file), ("column", column), ("rule", rule))
        if value is not None
    )
    error = GateError(f"{message} [{where}]" if where else message)
    error.file, error.column, error.rule = file, column, rule
    return error


@dataclass(frozen=True)
class Check:
    """One row-level rule on one column."""

    column: str
    rule: str
    bad: Callable[[Any], Any]  # cast array -> BooleanArray (True = bad row)


# ----------------------------------------------------------------------------- types


def output_field(name: str, kind: str, raw_type: Any, date_format: str | None = None) -> Any:
    """The Arrow field of column ``name`` in ``data/validated``; a text date's format goes into
    its metadata (``b"format"``) so the features stage can parse served text the same way."""
    import pyarrow as pa

    metadata = {b"format": date_format.encode()} if date_format else None
    return pa.field(name, output_type(kind, raw_type), metadata=metadata)


def output_type(kind: str, raw_type: Any) -> Any:
    """The Arrow type a column of suite type ``kind`` is written as in ``data/validated``."""
    import pyarrow as pa

    if kind == "datetime":
        return pa.timestamp("us", tz=getattr(raw_type, "tz", None))
    return {"float": pa.float64(), "int": pa.int64(), "category": pa.string(), "bool": pa.bool_()}[
        kind
    ]


def type_fits(kind: str, raw_type: Any) -> bool:
    """Whether a raw Arrow type can hold values of suite type ``kind``."""
    import pyarrow.types as t

    if t.is_dictionary(raw_type):
        raw_type = raw_type.value_type
    text = t.is_string(raw_type) or t.is_large_string(raw_type)
    fits = {
        "float": t.is_integer(raw_type) or t.is_floating(raw_type) or t.is_decimal(raw_type),
        "int": t.is_integer(raw_type) or t.is_floating(raw_type),
        "category": text or t.is_integer(raw_type) or t.is_boolean(raw_type),
        "bool": t.is_boolean(raw_type),
        "datetime": t.is_timestamp(raw_type) or t.is_date(raw_type) or text,
    }[kind]
    return fits or t.is_null(raw_type)


def cast_column(
    array: Any,
    kind: str,
    out_type: Any,
    file: str,
    name: str,
    known_date: str | None = None,
    date_format: str | None = None,
) -> tuple[Any, Any | None]:
    """``array`` as ``out_type`` plus, for an int column held as floats, its NaN/inf rows.

    Raises GateError for data that cannot be that type at all: a fraction in an int column
    (rule ``type``), or text dates (rule ``date_format``) that do not match ``date_format``
    (the suite's strftime format) or, without one, are not ISO 8601 (mixed formats are named
    as such; ``known_date`` is a text date of this column that parsed in an earlier batch).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if kind == "int" and pa.types.is_floating(array.type):
        nonfinite = pc.invert(pc.is_finite(array)).fill_null(False)
        finite = pc.if_else(nonfinite, pa.scalar(None, array.type), array)
        fraction = pc.not_equal(finite, pc.floor(finite)).fill_null(False)
        if pc.any(fraction).as_py():
            examples = pc.filter(finite, fraction)[:3].to_pylist()
            raise gate_error(
                f"column {name!r} holds fractions where the suite expects int, e.g. {examples}",
                file=file,
                column=name,
                rule="type",
            )
        return finite.cast(out_type), nonfinite
    if kind == "datetime" and (
        pa.types.is_string(array.type) or pa.types.is_large_string(array.type)
    ):
        if date_format is not None:
            return _parse_dates(array, date_format, out_type, file, name), None
        try:
            return pc.cast(array, out_type), None
        except pa.ArrowInvalid:
            raise _date_error(array, out_type, file, name, known_date) from None
    return pc.cast(array, out_type, safe=kind != "datetime"), None


def _parse_dates(array: Any, date_format: str, out_type: Any, file: str, name: str) -> Any:
    import pyarrow.compute as pc

    parsed = pc.strptime(array, format=date_format, unit="us", error_is_null=True)
    if parsed.null_count > array.null_count:
        failed = pc.and_(parsed.is_null(), array.is_valid())
        example = pc.filter(array, failed)[0].as_py()
        raise gate_error(
            f"column {name!r} holds text that does not match the suite's date "
            f"format {date_format!r}, e.g. {example!r} (fix the data, or the "
            "format in the suite's type expectation meta)",
            file=file,
            column=name,
            rule="date_format",
        )
    return parsed.cast(out_type)


def _date_error(
    array: Any, out_type: Any, file: str, name: str, known_date: str | None
) -> GateError:
    import re

    import pyarrow as pa
    import pyarrow.compute as pc

    def parses(text: str) -> bool:
        try:
            pa.array([text]).cast(out_type)
            return True
        except pa.ArrowInvalid:
            return False

    values = array.drop_null()
    shapes = pc.replace_substring_regex(values, r"[0-9]", "9")
    examples = {
        shape: values[pc.index(shapes, shape).as_py()].as_py()
        for shape in pc.unique(shapes)[:20].to_pylist()
    }
    if known_date is not None:
        examples.setdefault(re.sub(r"[0-9]", "9", known_date), known_date)
    good = [text for text in examples.values() if parses(text)]
    bad = (
        [text for text in examples.values() if not parses(text)]
        or [text for text in values[:1000].to_pylist() if not parses(text)][:1]
        or ["?"]
    )
    if len(examples) > 1:
        shown = (good[:1] + bad)[:2]
        return gate_error(
            f"column {name!r} mixes date formats, e.g. {shown[0]!r} and "
            f"{shown[1]!r}; write one format (ISO 8601: 2024-01-31)",
            file=file,
            column=name,
            rule="date_format",
        )
    return gate_error(
        f"column {name!r} holds text that is not an ISO 8601 date, e.g. {bad[0]!r}",
        file=file,
        column=name,
        rule="date_format",
    )


def not_numbers(array: Any) -> Any:
    """The values of a text column that do not read as numbers (a BooleanArray mask)."""
    import pyarrow.compute as pc

    looks = pc.match_substring_regex(array, NUMBER_PATTERN, ignore_case=True)
    return pc.invert(looks).fill_null(False)


# ----------------------------------------------------------------------------- checks


def build_checks(
    suite: Suite, rules: dict[str, ColumnRuleParams], schema: Any, source: str
) -> dict[str, list[Check]]:
    """Each column's row-level checks, in the order they are tried: suite rules, then params.

    Raises:
        ConfigError: a params rule names an unknown column, or a numeric rule a text column.
    """
    unknown = sorted(set(rules) - set(suite.columns))
    if unknown:
        raise ConfigError(
            f"params validate.rules names {unknown}, not columns of {source} "
            f"({', '.join(suite.columns)})"
        )
    checks: dict[str, list[Check]] = {}
    for name, spec in suite.columns.items():
        out_type = output_type(spec.kind, schema.field(name).type if name in schema.names else None)
        found = []
        if spec.not_null:
            found.append(Check(name, "not_null", _is_null))
        if spec.kind == "float":
            found.append(Check(name, "finite", _not_finite))
        if spec.min is not None or spec.max is not None:
            found.append(Check(name, "between", _outside(spec.min, spec.max)))
        if spec.values is not None:
            found.append(Check(name, "in_set", _not_in(spec.values, out_type, source, name)))
        if name == suite.target:
            found.append(Check(name, "label", _not_in(suite.labels, out_type, source, name)))
        if name in rules:
            found += _params_checks(name, rules[name], spec.kind, out_type)
        checks[name] = found
    return checks


def _params_checks(name: str, rule: ColumnRuleParams, kind: str, out_type: Any) -> list[Check]:
    numeric = kind in ("float", "int")
    if not numeric and (rule.min is not None or rule.max is not None or rule.positive):
        raise ConfigError(
            f"params validate.rules.{name}: min/max/positive need a numeric "
            f"column; the suite says {kind}"
        )
    found = []
    if rule.not_null:
        found.append(Check(name, "not_null", _is_null))
    if rule.min is not None:
        found.append(Check(name, "min", _outside(rule.min, None)))
    if rule.max is not None:
        found.append(Check(name, "max", _outside(None, rule.max)))
    if rule.positive:
        found.append(Check(name, "positive", _not_positive))
    if rule.values is not None:
        found.append(
            Check(name, "in_set", _not_in(rule.values, out_type, "params validate.rules", name))
        )
    return found


def _is_null(array: Any) -> Any:
    return array.is_null()


def _not_finite(array: Any) -> Any:
    import pyarrow.compute as pc

    return pc.invert(pc.is_finite(array)).fill_null(False)


def _not_positive(array: Any) -> Any:
    import pyarrow.compute as pc

    return pc.less_equal(array, 0).fill_null(False)


def _outside(low: float | None, high: float | None) -> Callable[[Any], Any]:
    import pyarrow.compute as pc

    def bad(array: Any) -> Any:
        below = pc.less(array, low) if low is not None else None
        above = pc.greater(array, high) if high is not None else None
        both = below if above is None else above if below is None else pc.or_(below, above)
        return both.fill_null(False)

    return bad


def _not_in(values: list[Any], out_type: Any, source: str, name: str) -> Callable[[Any], Any]:
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        allowed = pa.array(values).cast(out_type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise ConfigError(
            f"{source}: the value set of column {name!r} does not fit its type {out_type}: {exc}"
        ) from exc

    def bad(array: Any) -> Any:
        return pc.and_(pc.invert(pc.is_in(array, value_set=allowed)), pc.is_valid(array))

    return bad


# ----------------------------------------------------------------------------- rows


def hash_rows(batch: Any) -> Any:
    """One uint64 per row; equal rows hash alike (in every batch and file)."""
    import numpy as np

    rows = np.full(batch.num_rows, 0x9E3779B97F4A7C15, dtype=np.uint64)
    shifted = np.empty_like(rows)
    for array in batch.columns:  # xor, multiply, xorshift: in place, no per-column temporaries
        np.bitwise_xor(rows, _column_bits(array), out=rows)
        np.multiply(rows, np.uint64(0xBF58476D1CE4E5B9), out=rows)
        np.right_shift(rows, np.uint64(31), out=shifted)
        np.bitwise_xor(rows, shifted, out=rows)
    return rows


def _column_bits(array: Any) -> Any:
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = array.type
    if pa.types.is_dictionary(kind):
        array = array.dictionary_decode()
        kind = array.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind):
        encoded = pc.dictionary_encode(array)  # hash each distinct value once
        words = pd.util.hash_array(encoded.dictionary.to_numpy(zero_copy_only=False))
        bits = words[encoded.indices.fill_null(0).to_numpy(zero_copy_only=False)]
    elif pa.types.is_floating(kind):
        plain = array.cast(pa.float64())
        bits = (
            (plain.fill_null(0) if plain.null_count else plain)
            .to_numpy(zero_copy_only=False)
            .view(np.uint64)
        )
    elif pa.types.is_integer(kind) or pa.types.is_temporal(kind) or pa.types.is_boolean(kind):
        if pa.types.is_temporal(kind):  # its raw integer: no calendar conversion
            array = array.view(pa.int64() if kind.bit_width == 64 else pa.int32())
        plain = array.cast(pa.int64())
        bits = (
            (plain.fill_null(0) if plain.null_count else plain)
            .to_numpy(zero_copy_only=False)
            .view(np.uint64)
        )
    else:
        bits = pd.util.hash_array(array.cast(pa.string()).to_numpy(zero_copy_only=False))
    if array.null_count:
        bits = np.where(
            array.is_null().to_numpy(zero_copy_only=False), np.uint64(0x5851F42D4C957F2D), bits
        )
    return bits


def header_rows(batch: Any) -> Any:
    """A mask of the rows equal to the column names (a header repeated inside the data)."""
    import pyarrow.compute as pc

    mask = None
    for name, array in zip(batch.schema.names, batch.columns, strict=True):
        same = pc.equal(pc.utf8_trim_whitespace(array.cast("string")), name).fill_null(False)
        mask = same if mask is None else pc.and_(mask, same)
    return mask
