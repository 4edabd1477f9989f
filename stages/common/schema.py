"""The validation schema: its typed model, loading it from YAML, and profiling data into one.

A schema YAML (``schemas/*.yaml``, params ``validate.schema_path``) lists the columns the data
must have with their types and ranges, the target and its labels, and the row-count bounds;
``stages.validate`` builds the Great Expectations suite from it. This module has no GX and
imports pandas only when profiling, so loading a schema stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from stages.common.config import StrictModel, describe_errors, read_yaml
from stages.common.errors import ConfigError, DataError

if TYPE_CHECKING:
    import pandas as pd

MAX_PROFILED_VALUES = 50  # a text column with more distinct values gets no `values` list

# The header of every written schema. It names stages/validate.py, where the suite is built;
# the committed schemas/*.yaml carry it verbatim, so keep the two in step.
SCHEMA_HEADER = """\
# Validation schema: the rules the Great Expectations suite is built from (stages/validate.py).
# {origin}
#
# columns:                  every column the data must have: no more, no fewer (any order)
#   <name>:
#     type: float|int|category|bool   float/int: numeric values only (a whole number is a float)
#     min: / max:           inclusive value range (numeric columns; leave out for no bound)
#     nullable: false       false: every value must be present
#     values: [..]          category columns only, optional: the allowed values
# target:
#   name: <column>          the label column (listed under columns too; = params ingest.target)
#   labels: [..]            the allowed label values
# rows: {{min: .., max: ..}}  bounds on the row count (max: null for none)
"""




class ColumnRule(StrictModel):
    type: Literal["float", "int", "category", "bool"]
    min: int | float | None = None
    max: int | float | None = None
    nullable: bool = False
    values: list[bool | int | float | str] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ColumnRule:
        if (self.min is not None or self.max is not None) and self.type not in ("float", "int"):
            raise ValueError("min/max apply to float and int columns only")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")
        if self.values is not None and self.type != "category":
            raise ValueError("values apply to category columns only")
        return self


class TargetRule(StrictModel):
    name: str
    labels: list[bool | int | float | str] = Field(min_length=1)


class RowRule(StrictModel):
    min: int = Field(1, ge=0)
    max: int | None = Field(None, ge=0)


class Schema(StrictModel):
    """A parsed schema YAML: column rules, the target and its labels, row bounds."""

    columns: dict[str, ColumnRule] = Field(min_length=1)
    target: TargetRule
    rows: RowRule = RowRule()

    @model_validator(mode="after")
    def _target_is_a_column(self) -> Schema:
        if self.target.name not in self.columns:
            raise ValueError(f"target.name {self.target.name!r} is not one of the columns")
        return self


def parse_schema(raw: Any, source: str = "schema") -> Schema:
    """Check a schema mapping; a bad field raises ConfigError naming the file and field."""
    try:
        return Schema.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(describe_errors(exc))
        raise ConfigError(f"{source}: invalid schema: {problems}") from exc


def load_schema(path: str | Path) -> Schema:
    """Read and check a schema YAML file."""
    raw = read_yaml(path, "schema file",
                    " (params validate.schema_path; write one with --profile)")
    return parse_schema(raw, str(path))


def profile_frame(df: pd.DataFrame, target: str, margin: float = 0.1) -> dict[str, Any]:
    """A schema mapping that ``df`` (a trusted snapshot) passes, with ranges widened.

    Numeric ranges grow by ``margin`` x their span on each side (never below 0 when the data
    has no negatives); row bounds are half to ten times the snapshot's row count.
    """
    if target not in df.columns:
        raise DataError(f"cannot profile: target column {target!r} is not in the data",
                        column=target, rule="target_present")
    columns = {str(name): _profile_column(df[name], margin) for name in df.columns}
    columns[target] = {"type": columns[target]["type"], "nullable": False}
    labels = _sorted_values(df[target])
    raw = {"columns": columns, "target": {"name": target, "labels": labels},
           "rows": {"min": max(1, len(df) // 2), "max": len(df) * 10}}
    parse_schema(raw, "profile")  # what we write must load
    return raw


def _profile_column(column: pd.Series, margin: float) -> dict[str, Any]:
    import pandas as pd

    if pd.api.types.is_bool_dtype(column):
        rule: dict[str, Any] = {"type": "bool"}
    elif pd.api.types.is_numeric_dtype(column):
        integer = pd.api.types.is_integer_dtype(column)
        rule = {"type": "int" if integer else "float"}
        if column.notna().any():
            rule["min"], rule["max"] = _widen(float(column.min()), float(column.max()), margin,
                                              integer)
    else:
        values = _sorted_values(column)
        rule = {"type": "category"}
        if len(values) <= MAX_PROFILED_VALUES:
            rule["values"] = values
    rule["nullable"] = bool(column.isna().any())
    return rule


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


def _sorted_values(column: pd.Series) -> list[Any]:
    values = [value.item() if hasattr(value, "item") else value
              for value in column.dropna().unique()]
    try:
        return sorted(values)
    except TypeError:  # mixed types, e.g. 1 and "a"
        return sorted(values, key=str)


def render_schema(raw: dict[str, Any], origin: str) -> str:
    """Schema YAML text: the format documentation header, then one line per column."""
    body = yaml.safe_dump(raw, sort_keys=False, default_flow_style=None, width=100)
    return SCHEMA_HEADER.format(origin=origin) + body
