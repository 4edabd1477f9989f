"""The model's input contract: what a served model accepts, taken from the reviewed suite.

Built at registration from the suite (``suites/*.json``) plus params ``validate.rules`` and the
preprocessor's feature columns, and shipped inside the logged model as ``contract.json``. The
signature MLflow shows, the service's payload check and its row checks all come from it, so
what validate lets through, serving accepts: including a row exactly as it stands in the source
table (ids and dates the features stage drops are in the contract, ``used: false``). Shape::

    {"version": 1, "target": "species", "labels": ["Adelie", ...],
     "columns": [{"name", "kind": float|int|category|bool|datetime, "nullable": bool,
                  "min", "max", "positive": bool, "values": list|None,
                  "format": str|None (strftime of a text date; None = ISO), "used": bool}]}

``check_rows`` finds the row-level problems (rules ``not_null``, ``between``, ``positive``,
``in_set``, ``date_format``, ``all_null``) in the used columns, for serving's row policy.
No MLflow or pandas at import time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.errors import ConfigError
from model.files import atomic_path

if TYPE_CHECKING:
    import pandas as pd


CONTRACT_VERSION = 1
CONTRACT_FILE = "contract.json"  # the file name inside the logged model
CONTRACT_ARTIFACT = "contract"  # its key among the pyfunc's artifacts
ALL_COLUMNS = "*"  # the column an ``all_null`` violation names
PROBA_PREFIX = "proba_"  # the pyfunc's output columns (model.servable)
# MLflow signature type name -> contract kind (for models logged before contracts existed)
_SIGNATURE_KINDS = {
    "double": "float",
    "float": "float",
    "long": "int",
    "integer": "int",
    "boolean": "bool",
    "string": "category",
    "datetime": "datetime",
}
_SCHEMA_KEYS = ("kind", "format")  # what contract_differences compares per column
_RULE_KEYS = ("nullable", "min", "max", "positive", "values")  # row rules (rule_differences)
_NUMBER_KINDS = {"int", "float"}  # one kind to a signature (it may type an int as double)


@dataclass(frozen=True)
class Violation:
    """One row breaking one rule of the contract."""

    row: int  # position in the checked frame
    column: str  # ALL_COLUMNS for ``all_null``
    rule: str  # not_null | between | positive | in_set | date_format | all_null
    value: Any

    def describe(self) -> str:
        """``row 3: column 'x' breaks between (value 1e+30)``."""
        return f"row {self.row}: column {self.column!r} breaks {self.rule} (value {self.value!r})"


def contract_from_signature(
    input_columns: Iterable[tuple[str, str, bool]], output_columns: Iterable[str]
) -> dict[str, Any]:
    """A contract for a model logged before contracts existed, from its MLflow signature.

    Args:
        input_columns: ``(name, MLflow type name, required)`` per signature input.
        output_columns: the output signature's column names (``proba_<label>`` give labels).
    """
    columns = [
        {
            "name": name,
            "kind": _SIGNATURE_KINDS.get(type_name, "category"),
            "nullable": not required,
            "min": None,
            "max": None,
            "positive": False,
            "values": None,
            "format": None,
            "used": True,
        }
        for name, type_name, required in input_columns
    ]
    labels = [
        name.removeprefix(PROBA_PREFIX) for name in output_columns if name.startswith(PROBA_PREFIX)
    ]
    return {
        "version": CONTRACT_VERSION,
        "target": None,
        "labels": labels,
        "columns": columns,
        "derived_from": "signature",
    }


# ----------------------------------------------------------------------------- comparing


def contract_differences(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """What makes ``new`` another input schema or label set than ``old``; [] = the same.

    Compared: the target (when both name one), the labels (as text, order ignored), the column
    names, and each column's kind and date format. Which columns the model uses (``used``),
    nullability, ranges and value sets are not: the same source rows and labels go in, so the
    metrics of both stay comparable. A contract derived from a signature (a model logged before
    contracts) knows only the columns the model took, no date formats, and may type an int as
    a double: against one, a column it lacks, a format and int vs float are no difference.
    """
    if old is None:
        return ["the old model has no contract (and no signature to derive one from)"]
    found = []
    if old.get("target") and new.get("target") and old["target"] != new["target"]:
        found.append(f"target {old['target']!r} -> {new['target']!r}")
    old_labels, new_labels = _label_set(old), _label_set(new)
    if old_labels != new_labels:
        found.append(f"labels {sorted(old_labels)} -> {sorted(new_labels)}")
    old_cols, new_cols = _by_name(old), _by_name(new)
    old_derived, new_derived = _derived(old), _derived(new)
    gone = [] if new_derived else sorted(set(old_cols) - set(new_cols))
    added = [] if old_derived else sorted(set(new_cols) - set(old_cols))
    if gone:
        found.append(f"columns no longer taken: {gone}")
    if added:
        found.append(f"new columns: {added}")
    derived = old_derived or new_derived
    for name in [name for name in old_cols if name in new_cols]:
        for key in ("kind",) if derived else _SCHEMA_KEYS:
            before, after = old_cols[name].get(key), new_cols[name].get(key)
            if before != after and not (derived and {before, after} <= _NUMBER_KINDS):
                found.append(f"column {name!r}: {key} {before!r} -> {after!r}")
    return found


def rule_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The row rules (nullability, ranges, value sets) that differ between two contracts, per
    column both have: ``["column 'x': max 10 -> 12"]``; [] = the same rules."""
    old_cols, new_cols = _by_name(old), _by_name(new)
    return [
        f"column {name!r}: {key} {old_cols[name].get(key)!r} -> {col.get(key)!r}"
        for name, col in new_cols.items()
        if name in old_cols
        for key in _RULE_KEYS
        if old_cols[name].get(key) != col.get(key)
    ]


def _derived(contract: dict[str, Any]) -> bool:
    return contract.get("derived_from") == "signature"


def _label_set(contract: dict[str, Any]) -> set[str]:
    return {str(label) for label in contract.get("labels") or []}


def _by_name(contract: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {col["name"]: col for col in contract.get("columns") or []}


# ----------------------------------------------------------------------------- checking rows


def check_rows(frame: pd.DataFrame, contract: dict[str, Any]) -> list[Violation]:
    """The row-level problems of ``frame`` against the contract's used columns.

    Rules: ``not_null`` (a missing value where the suite allows none), ``between`` (outside the
    suite's/params' min..max, or infinite), ``positive``, ``in_set`` (an unseen category),
    ``date_format`` (a text date the preprocessor cannot parse: neither with the contract's
    format, by Arrow's strptime as validate parses it, nor as ISO 8601)
    and ``all_null`` (every used column missing: column ``*``). Unused columns (ids, dropped
    dates) are never checked. A column absent from ``frame`` counts as all missing.

    Returns:
        The violations, by row (then in the contract's column order).
    """
    names = [col["name"] for col in _used(contract) if col["name"] in frame.columns]
    return check_columns({name: frame[name].tolist() for name in names}, len(frame), contract)


def check_columns(
    columns: Mapping[str, Sequence[Any]], n_rows: int, contract: dict[str, Any]
) -> list[Violation]:
    """``check_rows`` on plain values: ``{column: one value per row}`` (serving's rows)."""
    found: list[Violation] = []
    all_missing = [True] * n_rows
    for col in _used(contract):
        values = columns.get(col["name"])
        nulls = [True] * n_rows if values is None else [is_null(value) for value in values]
        all_missing = [a and b for a, b in zip(all_missing, nulls, strict=False)]
        found += _column_violations(col, values, nulls)
    if _used(contract):
        found += [
            Violation(i, ALL_COLUMNS, "all_null", None)
            for i, missing in enumerate(all_missing)
            if missing
        ]
    return sorted(found, key=lambda v: v.row)


def is_null(value: Any) -> bool:
    """None, NaN, NaT or pandas' NA."""
    if isinstance(value, float):
        return math.isnan(value)
    return value is None or type(value).__name__ in ("NAType", "NaTType")  # no pandas import


def _used(contract: dict[str, Any]) -> list[dict[str, Any]]:
    return [col for col in contract.get("columns") or [] if col.get("used", True)]


def _column_violations(
    col: dict[str, Any], values: Sequence[Any] | None, nulls: list[bool]
) -> list[Violation]:
    name = col["name"]
    found = []
    if not col.get("nullable", True):
        found += [Violation(i, name, "not_null", None) for i, null in enumerate(nulls) if null]
    bad_dates = _bad_dates(col, values or [], nulls)
    for i, value in enumerate(values or []):
        if not nulls[i]:
            rule = "date_format" if bad_dates[i] else _broken_rule(col, value)
            if rule is not None:
                found.append(Violation(i, name, rule, _plain(value)))
    return found


def _broken_rule(col: dict[str, Any], value: Any) -> str | None:
    kind = col.get("kind")
    if kind in ("float", "int") and isinstance(value, (int, float)) and not isinstance(value, bool):
        if (
            (col.get("min") is not None and value < col["min"])
            or (col.get("max") is not None and value > col["max"])
            or math.isinf(value)
        ):
            return "between"
        if col.get("positive") and value <= 0:
            return "positive"
    if (
        col.get("values") is not None
        and kind in ("category", "bool", "int", "float")
        and not _in_values(value, col["values"])
    ):
        return "in_set"
    return None


def _in_values(value: Any, allowed: list[Any]) -> bool:
    # A category arrives as text; the suite may list it as text or as the number it was.
    return value in allowed or str(value) in {str(item) for item in allowed}


def _bad_dates(col: dict[str, Any], values: Sequence[Any], nulls: list[bool]) -> list[bool]:
    # Per value: a text date the preprocessor cannot parse (its own parser: the column's format
    # with Arrow's strptime, as validate parses it, then ISO 8601). Non-text values pass.
    texts = [
        value if isinstance(value, str) and not null else None
        for value, null in zip(values, nulls, strict=False)
    ]
    if col.get("kind") != "datetime" or all(text is None for text in texts):
        return [False] * len(values)
    import pandas as pd

    from model.datetimes import parse_dates

    _, bad = parse_dates(pd.Series(texts, dtype=object), col.get("format"))
    return bad.tolist()


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


# ----------------------------------------------------------------------------- files


def save_contract(contract: dict[str, Any], path: str | Path) -> Path:
    """Write the contract as reviewable JSON (atomically); returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(render_contract(contract), encoding="utf-8")
    return path


def render_contract(contract: dict[str, Any]) -> str:
    """The contract as indented JSON, ending in a newline."""
    return json.dumps(contract, indent=2, ensure_ascii=False, default=str) + "\n"


def load_contract(path: str | Path) -> dict[str, Any]:
    """Read a contract file; a missing or malformed one raises ConfigError naming it."""
    path = Path(path)
    try:
        contract = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: contract file not found") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(contract, dict) or not isinstance(contract.get("columns"), list):
        raise ConfigError(f"{path}: not a model input contract (no 'columns' list)")
    return contract


def contract_in_model_dir(path: str | Path) -> dict[str, Any] | None:
    """The contract of a downloaded model folder: its ``contract.json`` artifact, or one
    derived from its signature (None when it has neither)."""
    from mlflow.models import Model

    path = Path(path)
    found = sorted(path.glob(f"artifacts/{CONTRACT_FILE}")) or sorted(path.glob(CONTRACT_FILE))
    if found:
        return load_contract(found[0])
    meta = Model.load(path)
    inputs, outputs = meta.get_input_schema(), meta.get_output_schema()
    if inputs is None or not inputs.has_input_names():
        return None
    return contract_from_signature(
        [
            (str(col.name), getattr(col.type, "name", ""), bool(getattr(col, "required", True)))
            for col in inputs.inputs
        ],
        outputs.input_names() if outputs is not None else [],
    )


def model_contract(model_uri: str) -> dict[str, Any] | None:
    """The input contract of a logged model (``models:/name/3``, ``runs:/id/model``, ...).

    From the model's ``contract`` artifact, or derived from its signature and ``proba_``
    output columns for a model logged before contracts existed; None when it has neither.
    """
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory(prefix="contract-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
        return contract_in_model_dir(local)
