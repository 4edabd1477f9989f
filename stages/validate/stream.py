"""The streaming gate: dataset-level checks up front, then row-level rules batch by batch.

``check_dataset`` looks at the Arrow schema and the row count from the Parquet footers (plus a
scan for examples when a column has the wrong type). ``StreamingGate.feed`` evaluates one record
batch: it casts every column to the suite's type, marks each row with the first rule it breaks,
and returns the clean rows (cast) and the bad ones (raw, with ``_rule`` and ``_column``).
``StreamingGate.finish`` runs the checks that need every row: all-null target, one class only,
null shares, duplicated rows and the bad-row threshold. Memory stays bounded by the batch size,
a sample of at most 2M row hashes and at most ``docs_rows`` sample rows for GX.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from stages.common.config import ValidateParams
from stages.common.suite import Suite
from stages.validate.rules import (
    Check,
    cast_column,
    gate_error,
    hash_rows,
    header_rows,
    not_numbers,
    output_field,
    type_fits,
)

MAX_HASHES = 2_000_000  # duplicates are counted exactly up to this many rows, sampled above


def check_dataset(
    files: list[Path], schema: Any, rows: int, suite: Suite, source: str, batch_rows: int
) -> None:
    """Raise GateError for the wrong column set, no rows, a repeated header, a wrong type or a
    row count outside the suite's bounds."""
    import pyarrow as pa

    missing = [name for name in suite.columns if name not in schema.names]
    extra = [name for name in schema.names if name not in suite.columns]
    if len(missing) == 1 and len(extra) == 1:
        raise gate_error(
            f"column {missing[0]!r} is missing and {extra[0]!r} is not in the "
            "suite: was it renamed?",
            file=source,
            column=missing[0],
            rule="columns",
        )
    if missing or extra:
        raise gate_error(
            f"columns differ from the suite: missing {missing}, unexpected {extra}",
            file=source,
            column=(missing or extra)[0],
            rule="columns",
        )
    if rows == 0:
        raise gate_error("no data rows", file=source, rule="not_empty")
    text = [pa.types.is_string(f.type) or pa.types.is_large_string(f.type) for f in schema]
    if all(text):
        _check_no_header(files, batch_rows)
    for name, spec in suite.columns.items():
        found = schema.field(name).type
        if not type_fits(spec.kind, found):
            raise gate_error(
                f"column {name!r} is {found}, which does not fit the suite's "
                f"{spec.kind}{_type_examples(files, name, found, batch_rows)}",
                file=source,
                column=name,
                rule="type",
            )
    if (suite.min_rows is not None and rows < suite.min_rows) or (
        suite.max_rows is not None and rows > suite.max_rows
    ):
        raise gate_error(
            f"{rows} rows, outside the suite's bounds [{suite.min_rows}, {suite.max_rows}]",
            file=source,
            rule="row_count",
        )


def _check_no_header(files: list[Path], batch_rows: int) -> None:
    import pyarrow.compute as pc

    from stages.common.io import iter_batches

    for file in files:
        seen = 0
        for batch in iter_batches(file, batch_rows):
            mask = header_rows(batch)
            if pc.any(mask).as_py():
                row = seen + pc.index(mask, True).as_py()
                raise gate_error(
                    f"row {row} repeats the header (the column names): "
                    "files concatenated with their headers?",
                    file=str(file),
                    rule="duplicated_header",
                )
            seen += batch.num_rows


def _type_examples(files: list[Path], name: str, found: Any, batch_rows: int) -> str:
    import pyarrow as pa
    import pyarrow.compute as pc

    from stages.common.io import iter_batches

    if not (pa.types.is_string(found) or pa.types.is_large_string(found)):
        return ""
    for file in files:
        for batch in iter_batches(file, batch_rows, columns=[name]):
            bad = pc.filter(batch.column(0), not_numbers(batch.column(0)))
            if len(bad):
                return f"; values that are not numbers, e.g. {bad[:3].to_pylist()}"
    return "; the values are numbers stored as text"


class StreamingGate:
    """Row-level rules and dataset-level tallies over a stream of record batches."""

    def __init__(
        self,
        suite: Suite,
        checks: dict[str, list[Check]],
        raw_schema: Any,
        total_rows: int,
        params: ValidateParams,
        source: str,
    ) -> None:
        import pyarrow as pa

        self.suite, self.checks, self.params, self.source = suite, checks, params, source
        self.out_schema = pa.schema(
            [
                output_field(name, spec.kind, raw_schema.field(name).type, spec.format)
                for name, spec in suite.columns.items()
            ]
        )
        self.bad_schema = raw_schema.append(pa.field("_rule", pa.string())).append(
            pa.field("_column", pa.string())
        )
        self.keys: list[tuple[str, str]] = []  # (column, rule), the index is the rule's code
        self.counts: Counter[tuple[str, str]] = Counter()
        self.rows = self.bad_rows = self.target_values = 0
        self.clean_nulls: Counter[str] = Counter()
        self.distinct = {name: set() for name, spec in suite.columns.items() if spec.min_unique}
        self.date_examples: dict[str, str] = {}  # a parsed text date, to name mixed formats
        self.hash_every = max(1, math.ceil(total_rows / MAX_HASHES))
        self.hashes: list[Any] = []
        self._duplicates: float | None = None
        self.sample_every = max(1, math.ceil(total_rows / params.docs_rows))
        self.sample: list[Any] = []

    def feed(self, batch: Any, file: str) -> tuple[Any, Any | None]:
        """(clean rows cast to the suite's types, bad raw rows with ``_rule``/``_column``)."""
        import numpy as np
        import pyarrow as pa

        rows = batch.num_rows
        hashes = hash_rows(batch)
        self.hashes.append(hashes[hashes % np.uint64(self.hash_every) == 0])
        first = np.full(rows, -1, dtype=np.int32)
        columns = []
        for name, spec in self.suite.columns.items():
            raw = batch.column(name)
            cast, nonfinite = cast_column(
                raw,
                spec.kind,
                self.out_schema.field(name).type,
                file,
                name,
                self.date_examples.get(name),
                spec.format,
            )
            if nonfinite is not None:
                self._mark(first, name, "finite", nonfinite)
            for check in self.checks[name]:
                self._mark(first, name, check.rule, check.bad(cast))
            self._remember_date(name, raw, cast)
            columns.append(cast)
        self.target_values += rows - batch.column(self.suite.target).null_count
        clean = pa.RecordBatch.from_arrays(columns, schema=self.out_schema)
        bad = first >= 0
        picked = (np.arange(self.rows, self.rows + rows) % self.sample_every == 0) & ~bad
        self.rows += rows
        if picked.any():
            self.sample.append(clean.filter(pa.array(picked)))
        if not bad.any():
            self._tally_clean(clean)
            return clean, None
        codes = first[bad]
        for code, count in enumerate(np.bincount(codes, minlength=len(self.keys))):
            self.counts[self.keys[code]] += int(count)
        self.bad_rows += int(bad.sum())
        clean = clean.filter(pa.array(~bad))
        self._tally_clean(clean)
        codes = pa.array(codes)
        rejected = batch.filter(pa.array(bad))
        rejected = rejected.append_column(
            "_rule", pa.array([rule for _, rule in self.keys], pa.string()).take(codes)
        )
        rejected = rejected.append_column(
            "_column", pa.array([column for column, _ in self.keys], pa.string()).take(codes)
        )
        return clean, rejected

    def _mark(self, first: Any, column: str, rule: str, mask: Any) -> None:
        import pyarrow.compute as pc

        if not pc.any(mask).as_py():
            return
        if (column, rule) not in self.keys:
            self.keys.append((column, rule))
        code = self.keys.index((column, rule))
        hit = mask.to_numpy(zero_copy_only=False) & (first < 0)
        first[hit] = code

    def _remember_date(self, name: str, raw: Any, cast: Any) -> None:
        import pyarrow as pa

        if (
            name not in self.date_examples
            and pa.types.is_string(raw.type)
            and self.suite.columns[name].kind == "datetime"
            and raw.null_count < len(raw)
        ):
            self.date_examples[name] = raw.drop_null()[0].as_py()

    def _tally_clean(self, clean: Any) -> None:
        import pyarrow.compute as pc

        for name, spec in self.suite.columns.items():
            if spec.max_null_fraction is not None:
                self.clean_nulls[name] += clean.column(name).null_count
            if name in self.distinct and len(self.distinct[name]) < spec.min_unique:
                self.distinct[name].update(
                    pc.unique(clean.column(name).drop_null())[: spec.min_unique].to_pylist()
                )

    def finish(self) -> None:
        """Raise GateError for what only every row can tell (see the module docstring)."""
        suite, source, clean_rows = self.suite, self.source, self.rows - self.bad_rows
        if self.target_values == 0:
            raise gate_error(
                "the target column is null in every row",
                file=source,
                column=suite.target,
                rule="all_null",
            )
        # First: with too many rows quarantined, the statistics of the few left (null shares,
        # distinct counts) would blame a column that is not the cause.
        if self.bad_fraction() > self.params.max_bad_fraction:
            (column, rule), count = self.counts.most_common(1)[0]
            raise gate_error(
                f"{self.bad_rows} of {self.rows} rows ({self.bad_fraction():.2%}) broke "
                f"row-level rules, above validate.max_bad_fraction "
                f"{self.params.max_bad_fraction:.2%}; worst: column {column!r} rule {rule} "
                f"({count} rows)",
                file=source,
                column=column,
                rule=rule,
            )
        for name, spec in suite.columns.items():
            if (
                spec.max_null_fraction is not None
                and clean_rows
                and self.clean_nulls[name] / clean_rows > spec.max_null_fraction
            ):
                raise gate_error(
                    f"column {name!r} is {self.clean_nulls[name] / clean_rows:.2%} null, above "
                    f"the {spec.max_null_fraction:.2%} the suite allows (mostly "
                    f"{1 - spec.max_null_fraction:g})",
                    file=source,
                    column=name,
                    rule="null_fraction",
                )
            if name in self.distinct and len(self.distinct[name]) < spec.min_unique:
                found = sorted(self.distinct[name], key=str)
                what = (
                    "one class only"
                    if name == suite.target and len(found) == 1
                    else f"{len(found)} distinct values"
                )
                raise gate_error(
                    f"column {name!r} has {what} {found} in the valid rows; the "
                    f"suite wants at least {spec.min_unique}",
                    file=source,
                    column=name,
                    rule="one_class" if name == suite.target else "unique_count",
                )
        if self.duplicate_fraction() > self.params.max_duplicate_fraction:
            raise gate_error(
                f"{self.duplicate_fraction():.2%} of rows are duplicates, above "
                f"validate.max_duplicate_fraction "
                f"{self.params.max_duplicate_fraction:.2%}",
                file=source,
                rule="duplicates",
            )

    def bad_fraction(self) -> float:
        return self.bad_rows / self.rows if self.rows else 0.0

    def duplicate_fraction(self) -> float:
        """Duplicated rows (beyond each first copy) over rows, from the hash sample."""
        import numpy as np

        if self._duplicates is None:
            hashes = np.concatenate(self.hashes) if self.hashes else np.empty(0, np.uint64)
            hashes.sort()  # sorting beats np.unique's hash table by far on uint64
            repeats = int(np.count_nonzero(hashes[1:] == hashes[:-1]))
            self.hashes = [hashes]
            self._duplicates = repeats / len(hashes) if len(hashes) else 0.0
        return self._duplicates

    def summary(self) -> dict[str, Any]:
        """Counts so far: rows, bad rows and fractions, rows per (column, rule)."""
        rules = [
            {"column": column, "rule": rule, "rows": count}
            for (column, rule), count in sorted(
                self.counts.items(), key=lambda item: (-item[1], item[0])
            )
        ]
        return {
            "rows": self.rows,
            "bad_rows": self.bad_rows,
            "valid_rows": self.rows - self.bad_rows,
            "bad_fraction": round(self.bad_fraction(), 6),
            "duplicate_fraction": round(self.duplicate_fraction(), 6),
            "duplicates_exact": self.hash_every == 1,
            "rules": rules,
        }
