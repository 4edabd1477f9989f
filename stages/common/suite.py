"""The validation suite: a Great Expectations 1.x suite kept as JSON in the repo (``suites/``).

``profile_snapshot`` writes one from a trusted snapshot, reading it in record batches and keeping
aggregates only (types, min/max, null counts, up to ``MAX_PROFILED_VALUES`` distinct values, the
row count). ``render_suite`` gives pretty JSON with sorted keys, one expectation per entry, so a
``git diff`` of an edited suite is easy to review. ``load_suite`` reads it back into the typed
``Suite`` the streaming gate (``stages.validate.rules``) evaluates; the file itself is plain GX and
loads with ``great_expectations.ExpectationSuite(**json.load(f))``.

The expectations this module writes and the gate understands:

- ``expect_table_columns_to_match_set`` (exact): the column set;
- ``expect_table_row_count_to_be_between``: row-count bounds;
- ``expect_column_values_to_be_in_type_list``: the column's type, named by the first entry of
  ``type_list`` (``float64``, ``int64``, ``str``, ``bool``, ``datetime64[us]``; see TYPE_LISTS);
  for dates held as text, its ``meta.format`` is their strftime format (``%Y/%m/%d``; none:
  ISO 8601), found by profiling (see DATE_FORMATS) and used by the gate to parse them;
- ``expect_column_values_to_not_be_null``: without ``mostly`` a null is a bad row; with it, the
  share of nulls is bounded for the whole data;
- ``expect_column_values_to_be_between``, ``expect_column_values_to_be_in_set``: bad rows;
- ``expect_column_unique_value_count_to_be_between`` (``min_value``): e.g. at least two classes.

Any other GX expectation a user adds is run by GX on the validated rows only. No GX import here.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.common.errors import ConfigError, DataError

MAX_PROFILED_VALUES = 50  # a text column with more distinct values gets no value set
MAX_LABELS = 1000  # a target with more distinct values is not a class label

logger = logging.getLogger(__name__)

# Text date formats profiling tries, in this order: the first one that parses every value of a
# text column wins, so ISO comes first and month-first beats day-first (as in the US-made
# tables seen in the wild); a column both fit is reported as ambiguous in the suite's notes.
DATE_FORMATS = (
    "%Y-%m-%d",
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%dT%H:%M:%S",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%dT%H:%M",
    "%Y/%m/%d",
    "%Y/%m/%d %H:%M:%S",
    "%Y/%m/%d %H:%M",
    "%m/%d/%Y",
    "%d/%m/%Y",
    "%m/%d/%Y %H:%M:%S",
    "%d/%m/%Y %H:%M:%S",
    "%m/%d/%Y %H:%M",
    "%d/%m/%Y %H:%M",
    "%m/%d/%y",
    "%d/%m/%y",
    "%d.%m.%Y",
    "%d.%m.%Y %H:%M:%S",
    "%d.%m.%Y %H:%M",
    "%d-%m-%Y",
    "%b %d %Y",
    "%b %d, %Y",
    "%d %b %Y",
    "%d-%b-%Y",
    "%d-%b-%y",
)  # Arrow's %b reads full month names too (as glibc's): no %B needed
MIN_YEAR = 1000  # a 4-digit-year format that reads a smaller year does not fit

# Types are checked on the validated (cast) data, as pandas sees it. The first entry names the
# type; raw Arrow types that fit: float <- float/int/decimal, int <- int (or whole floats),
# category <- string/dictionary/int/bool, bool <- bool, datetime <- timestamp/date/ISO text.
TYPE_LISTS = {
    "float": ["float64"],
    "int": ["int64", "Int64Dtype"],
    "category": ["str"],
    "bool": ["bool", "BooleanDtype"],
    "datetime": ["datetime64[us]", "datetime64[ns]", "datetime64[ms]", "datetime64[s]"],
}
KINDS = {types[0]: kind for kind, types in TYPE_LISTS.items()}

COLUMNS = "expect_table_columns_to_match_set"
ROW_COUNT = "expect_table_row_count_to_be_between"
TYPE = "expect_column_values_to_be_in_type_list"
NOT_NULL = "expect_column_values_to_not_be_null"
BETWEEN = "expect_column_values_to_be_between"
IN_SET = "expect_column_values_to_be_in_set"
UNIQUE_COUNT = "expect_column_unique_value_count_to_be_between"


@dataclass
class ColumnSpec:
    """What the suite says about one column."""

    kind: str  # float | int | category | bool | datetime
    not_null: bool = False  # a null is a bad row
    max_null_fraction: float | None = None  # from `mostly`: a dataset-level bound
    min: float | None = None
    max: float | None = None
    values: list[Any] | None = None
    min_unique: int | None = None
    format: str | None = None  # datetime held as text: its strftime format (None: ISO 8601)


@dataclass
class Suite:
    """A loaded suite: the column rules, the target and its labels, the row-count bounds."""

    name: str
    columns: dict[str, ColumnSpec]
    target: str
    labels: list[Any]
    min_rows: int | None = None
    max_rows: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)  # the JSON, for GX
    other: list[str] = field(default_factory=list)  # expectation types left to GX


# ----------------------------------------------------------------------------- loading


def load_suite(path: str | Path) -> Suite:
    """Read and check a suite JSON file; any problem raises ConfigError naming the file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{path}: suite file not found (params validate.suite_path; write "
            "one with `python -m stages.validate suite`)"
        ) from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from exc
    return parse_suite(raw, str(path))


def parse_suite(raw: Any, source: str = "suite") -> Suite:
    """The typed ``Suite`` for a suite mapping; ConfigError names ``source`` and the entry."""
    if not isinstance(raw, dict) or not isinstance(raw.get("expectations"), list):
        raise ConfigError(f"{source}: not a GX expectation suite (no 'expectations' list)")
    target = (raw.get("meta") or {}).get("target")
    if not isinstance(target, str):
        raise ConfigError(f"{source}: meta.target (the label column) is missing")
    suite = Suite(
        name=str(raw.get("name") or Path(source).stem),
        columns={},
        target=target,
        labels=[],
        raw=raw,
    )
    entries = [_entry(item, index, source) for index, item in enumerate(raw["expectations"])]
    column_sets = [kwargs["column_set"] for kind, kwargs in entries if kind == COLUMNS]
    if len(column_sets) != 1 or not column_sets[0]:
        raise ConfigError(f"{source}: needs exactly one {COLUMNS} with the column list")
    types = {
        item.get("kwargs", {}).get("column"): item
        for item in raw["expectations"]
        if item["type"] == TYPE
    }
    for name in column_sets[0]:
        expectation = types.get(name) or {}
        first = (expectation.get("kwargs", {}).get("type_list") or [None])[0]
        if first not in KINDS:
            raise ConfigError(
                f"{source}: column {name!r} needs a {TYPE} whose type_list "
                f"starts with one of {', '.join(KINDS)} (found {first!r})"
            )
        suite.columns[name] = ColumnSpec(
            kind=KINDS[first],
            format=_date_format(expectation.get("meta") or {}, KINDS[first], name, source),
        )
    for kind, kwargs in entries:
        _apply(suite, kind, kwargs, source)
    if target not in suite.columns:
        raise ConfigError(f"{source}: meta.target {target!r} is not one of the columns")
    if not suite.labels:
        raise ConfigError(f"{source}: the target {target!r} needs an {IN_SET} (its labels)")
    return suite


def _entry(item: Any, index: int, source: str) -> tuple[str, dict[str, Any]]:
    if (
        not isinstance(item, dict)
        or not isinstance(item.get("type"), str)
        or not isinstance(item.get("kwargs", {}), dict)
    ):
        raise ConfigError(f"{source}: expectations[{index}] needs a 'type' and 'kwargs'")
    return item["type"], item.get("kwargs", {})


def _date_format(meta: dict[str, Any], kind: str, name: str, source: str) -> str | None:
    found = meta.get("format")
    if found is None:
        return None
    if kind != "datetime" or not isinstance(found, str) or "%" not in found:
        raise ConfigError(
            f"{source}: column {name!r}: meta.format of its {TYPE} must be a "
            f"strftime format such as '%Y/%m/%d' on a datetime column "
            f"(found {found!r} on {kind})"
        )
    return found


def _apply(suite: Suite, kind: str, kwargs: dict[str, Any], source: str) -> None:
    if kind in (COLUMNS, TYPE):
        return
    if kind == ROW_COUNT:
        suite.min_rows, suite.max_rows = kwargs.get("min_value"), kwargs.get("max_value")
        return
    name = kwargs.get("column")
    spec = suite.columns.get(name) if isinstance(name, str) else None
    if spec is None and kind in (NOT_NULL, BETWEEN, IN_SET, UNIQUE_COUNT):
        raise ConfigError(f"{source}: {kind} names column {name!r}, which is not in the column set")
    if kind == NOT_NULL:
        mostly = kwargs.get("mostly", 1.0)
        spec.not_null = mostly >= 1.0
        spec.max_null_fraction = None if spec.not_null else round(1.0 - mostly, 12)
    elif kind == BETWEEN:
        if spec.kind not in ("float", "int"):
            raise ConfigError(f"{source}: {BETWEEN} on column {name!r} needs a numeric type")
        spec.min, spec.max = kwargs.get("min_value"), kwargs.get("max_value")
    elif kind == IN_SET:
        if name == suite.target:
            suite.labels = list(kwargs.get("value_set") or [])
        else:
            spec.values = list(kwargs.get("value_set") or [])
    elif kind == UNIQUE_COUNT:
        spec.min_unique = kwargs.get("min_value")
    else:
        suite.other.append(kind)


# ----------------------------------------------------------------------------- profiling


@dataclass
class _Tally:
    kind: str
    nulls: int = 0
    low: Any = None
    high: Any = None
    values: set[Any] | None = field(default_factory=set)  # None once over the cap
    formats: list[str] = field(default_factory=list)  # text: the DATE_FORMATS still fitting
    looks_like_date: str | None = None  # text: a value that parsed as a date (for the log)
    format: str | None = None  # the date format chosen
    notes: str | None = None  # why that format


def arrow_kind(arrow_type: Any) -> str | None:
    """The suite type a raw Arrow type profiles as (None: not supported)."""
    import pyarrow.types as t

    if t.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    checks = [
        (t.is_boolean, "bool"),
        (t.is_integer, "int"),
        (t.is_floating, "float"),
        (t.is_decimal, "float"),
        (t.is_timestamp, "datetime"),
        (t.is_date, "datetime"),
        (t.is_string, "category"),
        (t.is_large_string, "category"),
    ]
    return next((kind for check, kind in checks if check(arrow_type)), None)


def profile_snapshot(
    batches: Iterable[Any],
    schema: Any,
    target: str,
    margin: float = 0.1,
    source: str = "snapshot",
    growing: str | None = None,
) -> dict[str, Any]:
    """A suite mapping that the snapshot passes: ranges widened by ``margin`` x their span.

    Args:
        batches: the snapshot's record batches (read one at a time: only aggregates are kept).
        schema: their Arrow schema.
        growing: the watermark column of incremental ingestion (params ``ingest.watermark``):
            its values and the row count only grow, so neither gets an upper bound.
    """
    if target not in schema.names:
        raise DataError(
            f"cannot profile: target column {target!r} is not in the data",
            file=source,
            column=target,
            rule="target_present",
        )
    tallies = {}
    for arrow_field in schema:
        kind = arrow_kind(arrow_field.type)
        if kind is None:
            raise DataError(
                f"cannot profile type {arrow_field.type}",
                file=source,
                column=arrow_field.name,
                rule="type",
            )
        tracked = kind in ("category", "bool") or arrow_field.name == target
        text = kind == "category" and arrow_field.name != target
        tallies[arrow_field.name] = _Tally(
            kind, values=set() if tracked else None, formats=list(DATE_FORMATS) if text else []
        )
    rows = 0
    for batch in batches:
        rows += batch.num_rows
        for name, tally in tallies.items():
            _tally_column(
                tally, batch.column(name), cap=MAX_LABELS if name == target else MAX_PROFILED_VALUES
            )
    if rows == 0:
        raise DataError("cannot profile an empty snapshot", file=source, rule="not_empty")
    for name, tally in tallies.items():
        _settle_date(name, tally, rows)
    return build_suite(tallies, rows, target, margin, source, growing)


def _tally_column(tally: _Tally, array: Any, cap: int) -> None:
    import pyarrow.compute as pc

    tally.nulls += array.null_count
    if tally.kind in ("float", "int", "datetime") and array.null_count < len(array):
        low, high = pc.min_max(array).values()
        low, high = low.as_py(), high.as_py()
        tally.low = low if tally.low is None else min(tally.low, low)
        tally.high = high if tally.high is None else max(tally.high, high)
    if tally.values is not None:
        tally.values.update(pc.unique(array.drop_null()).to_pylist()[: cap + 1])
        if len(tally.values) > cap:
            tally.values = None
    if tally.formats:
        tally.formats = _fitting_formats(tally, array)


def _fitting_formats(tally: _Tally, array: Any) -> list[str]:
    """The formats of ``tally.formats`` that parse every non-null value of a text array."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = array.drop_null()
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    if len(values) == 0:
        return tally.formats

    def fits(fmt: str, texts: Any) -> bool:
        parsed = pc.strptime(texts, format=fmt, unit="us", error_is_null=True)
        # Arrow's %Y also takes 1-3 digits: "01/02/03" is no %m/%d/%Y date of year 3
        return parsed.null_count == 0 and (
            "%Y" not in fmt or pc.min(parsed).as_py().year >= MIN_YEAR
        )

    candidates = [fmt for fmt in tally.formats if fits(fmt, values[:1])]  # one value: cheap
    if candidates and tally.looks_like_date is None:
        tally.looks_like_date = values[0].as_py()
    return [fmt for fmt in candidates if fits(fmt, values)]


def _settle_date(name: str, tally: _Tally, rows: int) -> None:
    """Make a text column whose every value parsed with one format a datetime column."""
    if tally.formats and tally.nulls < rows:
        chosen, others = tally.formats[0], tally.formats[1:]
        tally.kind, tally.format, tally.values = "datetime", chosen, None
        tally.notes = f"text dates parsed with format {chosen} (found by profiling)"
        if others:
            tally.notes += (
                f"; every value also fits {', '.join(others)}: chose the first in "
                "suite.DATE_FORMATS (ISO, year-first, then month-first); if that "
                "is wrong, edit this format"
            )
            logger.warning(
                "column %s: dates in format %s (ambiguous: every value also fits "
                "%s; chose the first in suite.DATE_FORMATS)",
                name,
                chosen,
                ", ".join(others),
            )
        else:
            logger.info("column %s: dates in format %s", name, chosen)
    elif tally.kind == "category" and tally.looks_like_date is not None:
        logger.warning(
            "column %s: text like a date (e.g. %r) but no one format of "
            "suite.DATE_FORMATS parses every value (mixed formats?): profiled as "
            "text",
            name,
            tally.looks_like_date,
        )


def build_suite(
    tallies: dict[str, _Tally],
    rows: int,
    target: str,
    margin: float,
    source: str,
    growing: str | None = None,
) -> dict[str, Any]:
    """The suite mapping from per-column aggregates (see ``profile_snapshot``)."""
    labels = tallies[target].values
    if not labels:
        problem = "no values" if labels is not None else f"over {MAX_LABELS} distinct values"
        raise DataError(
            f"cannot profile: the target has {problem}", file=source, column=target, rule="labels"
        )
    expectations = [
        _expect(COLUMNS, column_set=list(tallies), exact_match=True),
        _expect(ROW_COUNT, min_value=max(1, rows // 2), max_value=None if growing else rows * 10),
    ]
    for name, tally in tallies.items():
        expectations += _column_expectations(
            name, tally, rows, margin, name == target, name == growing
        )
    expectations.append(_expect(IN_SET, column=target, value_set=_sorted(labels)))
    if len(labels) >= 2:
        expectations.append(_expect(UNIQUE_COUNT, column=target, min_value=2))
    return {
        "name": Path(source).stem,
        "expectations": expectations,
        "meta": {
            "target": target,
            "profiled_from": {"snapshot": source, "rows": rows, "margin": margin},
        },
        "notes": "Written by `python -m stages.validate suite`; review it, then edit "
        "freely (see stages/common/suite.py for the expectations the gate reads).",
    }


def _column_expectations(
    name: str, tally: _Tally, rows: int, margin: float, is_target: bool, grows: bool = False
) -> list[dict[str, Any]]:
    meta = {"format": tally.format, "notes": tally.notes} if tally.format else None
    out = [_expect(TYPE, column=name, type_list=TYPE_LISTS[tally.kind], meta=meta)]
    share = tally.nulls / rows
    mostly = math.floor((1.0 - min(1.0, 2 * share)) * 1000) / 1000
    if share == 0 or is_target:
        out.append(_expect(NOT_NULL, column=name))
    elif mostly > 0:
        out.append(
            _expect(
                NOT_NULL,
                column=name,
                mostly=mostly,
                meta={
                    "notes": f"{share:.2%} nulls in the snapshot; up to twice that share is allowed"
                },
            )
        )
    if is_target:
        return out
    if tally.kind in ("float", "int") and tally.low is not None:
        low, high = _widen(float(tally.low), float(tally.high), margin, tally.kind == "int")
        out.append(
            _expect(
                BETWEEN,
                column=name,
                min_value=low,
                max_value=None if grows else high,
                meta={"notes": "the watermark: no upper bound"} if grows else None,
            )
        )
    if tally.kind == "category" and tally.values:
        out.append(_expect(IN_SET, column=name, value_set=_sorted(tally.values)))
    return out


def _expect(kind: str, meta: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    return {"type": kind, "kwargs": kwargs, "meta": meta or {}}


def _widen(low: float, high: float, margin: float, integer: bool) -> tuple[float, float]:
    span = (high - low) or abs(high) or 1.0
    lo, hi = low - margin * span, high + margin * span
    if low >= 0:
        lo = max(lo, 0.0)
    if integer:
        return math.floor(lo), math.ceil(hi)
    return _round_out(lo, math.floor), _round_out(hi, math.ceil)


def _round_out(value: float, direction: Callable[[float], int]) -> float:
    # 4 significant digits, rounded away from the data so the bound still holds.
    if value == 0:
        return 0.0
    digits = 3 - math.floor(math.log10(abs(value)))
    scaled = round(value * 10**digits, 6)  # 17.6 * 100 is 1760.0000000000002: not 1761
    return round(direction(scaled) / 10**digits, digits)


def _sorted(values: Iterable[Any]) -> list[Any]:
    try:
        return sorted(values)
    except TypeError:  # mixed types, e.g. 1 and "a"
        return sorted(values, key=str)


def render_suite(raw: dict[str, Any]) -> str:
    """Reviewable JSON: indented, one expectation per entry, in a fixed key order (name, meta,
    notes, expectations; each expectation: type, kwargs, meta; nested keys sorted)."""

    def ordered(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: ordered(value[key]) for key in sorted(value)}
        return [ordered(item) for item in value] if isinstance(value, list) else value

    head = {key: ordered(raw[key]) for key in ("name", "meta", "notes") if key in raw}
    rest = {key: ordered(raw[key]) for key in sorted(raw) if key not in (*head, "expectations")}
    expectations = [
        {
            "type": item["type"],
            "kwargs": ordered(item.get("kwargs", {})),
            "meta": ordered(item.get("meta", {})),
        }
        for item in raw["expectations"]
    ]
    return (
        json.dumps(
            {**head, **rest, "expectations": expectations},
            indent=2,
            ensure_ascii=False,
            default=str,
        )
        + "\n"
    )
