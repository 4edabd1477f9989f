"""Request payloads: MLflow's scoring formats in, checked rows out; predictions back to JSON.

The four JSON formats of MLflow's scoring server (``mlflow/pyfunc/scoring_server``) are read
with the same meaning:

* ``{"dataframe_split": {"columns": [...], "data": [[...], ...]}}`` (``index`` is ignored)
* ``{"dataframe_records": [{"col": value, ...}, ...]}``
* ``{"instances": ...}`` and ``{"inputs": ...}``: a list of records, or one record per
  column (``{"col": [v1, v2], ...}``; a scalar means one row). A list of lists is also taken,
  as rows whose values are in the signature's column order.

An optional top-level ``params`` is accepted (the model takes none, so it is ignored). Every
value is checked against the model's input signature before anything is scored, and every
problem raises :class:`PayloadError` with the column named. Only JSON is parsed: nothing from a
request is ever unpickled. Pure Python + numpy/pandas: no MLflow, no web framework here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    import pandas as pd

FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")
PARAMS_KEY = "params"  # MLflow's inference params; accepted and ignored
SHOWN = 10  # column names quoted in one message at most


class PayloadError(Exception):
    """A request the model cannot score: its HTTP status, a message, the columns at fault."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        columns: Sequence[str] = (),
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.columns = message, status, list(columns)
        self.details = details  # e.g. the row violations: [{"row", "column", "rule", "value"}]

    def to_json(self) -> dict[str, Any]:
        """The body of the error response (MLflow's ``error_code`` + ``message`` shape)."""
        codes = {
            401: "UNAUTHENTICATED",
            413: "REQUEST_LIMIT_EXCEEDED",
            415: "UNSUPPORTED_MEDIA_TYPE",
            503: "TEMPORARILY_UNAVAILABLE",
        }
        body: dict[str, Any] = {
            "error_code": codes.get(self.status, "BAD_REQUEST"),
            "message": self.message,
        }
        if self.columns:
            body["columns"] = self.columns
        if self.details:
            body["violations"] = self.details
        return body


@dataclass(frozen=True)
class ColumnSpec:
    """One input column of the signature. ``kind``: float | int | bool | str | any.

    ``required``: the request must send the column (and, unless ``null_ok``, a value in it).
    ``null_ok``: a null passes here; the contract's row checks (``serving.rowcheck``) judge it.
    """

    name: str
    kind: str
    required: bool = True
    null_ok: bool = False


@dataclass(frozen=True)
class InputSpec:
    """The model's input columns, in signature (contract) order."""

    columns: tuple[ColumnSpec, ...]
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(col.name for col in self.columns))

    @property
    def all_float(self) -> bool:
        """Every column is a float column (rows then become one float64 matrix)."""
        return all(col.kind == "float" for col in self.columns)


# Contract kind -> payload kind. A text date stays text here; the model parses it.
CONTRACT_KINDS = {
    "float": "float",
    "int": "int",
    "category": "str",
    "bool": "bool",
    "datetime": "str",
}


def spec_from_contract(contract: dict[str, Any]) -> InputSpec:
    """The payload check for a model's input contract (``model.contract``).

    Every contract column is taken; a column the model does not use, or one the suite lets be
    null, may be left out. A null passes the type check in any column (an int column then
    reaches the model as a float with NaN): whether it may be null is the row check's rule
    ``not_null``, handled per ``serve.row_policy``.
    """
    return InputSpec(
        tuple(
            ColumnSpec(
                str(col["name"]),
                CONTRACT_KINDS.get(col["kind"], "any"),
                bool(col.get("used", True)) and not col["nullable"],
                null_ok=True,
            )
            for col in contract["columns"]
        )
    )


# --- values -----------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}"


def _to_float(value: Any) -> float:
    kind = type(value)
    if kind is float:
        return value
    if kind is int:
        return float(value)
    if value is None:
        return math.nan  # a missing value: the preprocessor imputes it
    raise TypeError("expected a number")


INT64_MAX = 2**63 - 1


def _to_int(value: Any) -> int:
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer() and abs(value) <= INT64_MAX:
        return int(value)
    raise TypeError("expected an integer")


def _to_int_or_huge(value: Any) -> int | float:
    # A whole number beyond int64 stays a float: the contract's range check names it.
    if type(value) is float and value.is_integer() and abs(value) > INT64_MAX:
        return value
    return _to_int(value)


def _to_bool(value: Any) -> bool:
    if type(value) is bool:
        return value
    raise TypeError("expected true or false")


def _to_str(value: Any) -> str:
    if type(value) is str:
        return value
    raise TypeError("expected a string")


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "float": _to_float,
    "int": _to_int,
    "bool": _to_bool,
    "str": _to_str,
    "any": lambda v: v,
}


def _convert(value: Any, col: ColumnSpec, row: int) -> Any:
    if value is None and col.kind != "float":
        if col.required and not col.null_ok:
            raise PayloadError(
                f"column {col.name!r} row {row}: missing value in a required {col.kind} column",
                columns=[col.name],
            )
        return None
    try:
        if col.kind == "int" and col.null_ok:  # an int column checked by the contract
            return _to_int_or_huge(value)
        return _CONVERTERS[col.kind](value)
    except (TypeError, OverflowError) as exc:
        raise PayloadError(
            f"column {col.name!r} row {row}: {exc}, got {_describe(value)}", columns=[col.name]
        ) from None


def _shown(names: Iterable[str]) -> str:
    names = list(names)
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return f"{names[:SHOWN]}{more}"


def check_columns(given: Sequence[str], spec: InputSpec) -> None:
    """The request's columns against the signature: none missing, none extra, no repeats.

    Raises:
        PayloadError: naming the missing, unexpected or repeated columns.
    """
    given_set = set(given)
    if len(given_set) != len(given):
        repeated = sorted({name for name in given if list(given).count(name) > 1})
        raise PayloadError(f"repeated column(s) {_shown(repeated)}", columns=repeated)
    known = set(spec.names)
    missing = [c.name for c in spec.columns if c.required and c.name not in given_set]
    extra = [name for name in given if name not in known]
    problems = []
    if missing:
        problems.append(f"missing column(s) {_shown(missing)}")
    if extra:
        problems.append(f"unexpected column(s) {_shown(extra)}")
    if problems:
        raise PayloadError(
            "; ".join(problems) + f" (the model takes {len(spec.names)} "
            f"columns: {_shown(spec.names)})",
            columns=missing + extra,
        )


# --- formats ----------------------------------------------------------------------------------


def _rows_from_split(data: Any, spec: InputSpec) -> list[list[Any]]:
    if not isinstance(data, dict) or "data" not in data:
        raise PayloadError("dataframe_split must be an object with 'columns' and 'data'")
    extra = sorted(set(data) - {"columns", "data", "index"})
    if extra:
        raise PayloadError(
            f"dataframe_split: unexpected key(s) {extra} (allowed: columns, data, index)"
        )
    columns, rows = data.get("columns"), data["data"]
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        raise PayloadError("dataframe_split.columns must be a list of column names")
    if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        raise PayloadError("dataframe_split.data must be a list of rows (lists of values)")
    check_columns(columns, spec)
    return _rows_from_lists(rows, columns, spec, "dataframe_split.data")


def _rows_from_lists(
    rows: list[list[Any]], columns: Sequence[str], spec: InputSpec, where: str
) -> list[list[Any]]:
    width = len(columns)
    for i, row in enumerate(rows):
        if len(row) != width:
            raise PayloadError(f"{where} row {i} has {len(row)} values for {width} columns")
    position = {name: i for i, name in enumerate(columns)}
    order = [position.get(col.name) for col in spec.columns]
    if order == list(range(width)):  # already in signature order (the usual case)
        return [
            [_convert(v, col, i) for v, col in zip(row, spec.columns, strict=False)]
            for i, row in enumerate(rows)
        ]
    return [
        [
            _convert(row[j] if j is not None else None, col, i)
            for j, col in zip(order, spec.columns, strict=False)
        ]
        for i, row in enumerate(rows)
    ]


def _rows_from_records(records: Any, spec: InputSpec, where: str) -> list[list[Any]]:
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise PayloadError(f"{where} must be a list of records (objects of column: value)")
    names = spec.names
    for record in records:
        if len(record) != len(names) or any(name not in record for name in names):
            check_columns(list(record), spec)
    return [
        [_convert(record.get(col.name), col, i) for col in spec.columns]
        for i, record in enumerate(records)
    ]


def _rows_from_columns(data: dict[str, Any], spec: InputSpec, where: str) -> list[list[Any]]:
    check_columns(list(data), spec)
    values = {name: (v if isinstance(v, list) else [v]) for name, v in data.items()}
    lengths = {name: len(v) for name, v in values.items()}
    if len(set(lengths.values())) > 1:
        raise PayloadError(
            f"{where}: columns have different lengths {lengths}", columns=list(lengths)
        )
    n = next(iter(lengths.values()), 0)
    return [
        [
            _convert(values[col.name][i] if col.name in values else None, col, i)
            for col in spec.columns
        ]
        for i in range(n)
    ]


def _rows_from_tensor_input(data: Any, spec: InputSpec, where: str) -> list[list[Any]]:
    if isinstance(data, dict):
        return _rows_from_columns(data, spec, where)
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        return _rows_from_records(data, spec, where)
    if isinstance(data, list) and data and all(isinstance(r, list) for r in data):
        return _rows_from_lists(data, spec.names, spec, where)
    raise PayloadError(
        f"{where} must be a list of records, an object of columns, or a list "
        "of rows in the signature's column order"
    )


def decode_json(body: bytes) -> Any:
    """Parse a JSON body; malformed JSON raises PayloadError saying where it broke."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise PayloadError(f"malformed JSON: {exc}") from None


def parse_payload(body: bytes, spec: InputSpec) -> list[list[Any]]:
    """A request body -> checked rows, each a list of values in the signature's column order.

    Raises:
        PayloadError: malformed JSON, not exactly one known format key, missing or unexpected
            columns, a value of the wrong type, or no rows at all.
    """
    doc = decode_json(body)
    if not isinstance(doc, dict):
        raise PayloadError(
            f"the body must be a JSON object with exactly one of the keys "
            f"{list(FORMATS)}, got a {type(doc).__name__}"
        )
    keys = [key for key in doc if key in FORMATS]
    unknown = [key for key in doc if key not in FORMATS and key != PARAMS_KEY]
    if len(keys) != 1 or unknown:
        raise PayloadError(
            f"the body must have exactly one of the keys {list(FORMATS)} "
            f"(and optionally 'params'), got {list(doc)}"
        )
    fmt = keys[0]
    if fmt == "dataframe_split":
        rows = _rows_from_split(doc[fmt], spec)
    elif fmt == "dataframe_records":
        rows = _rows_from_records(doc[fmt], spec, fmt)
    else:
        rows = _rows_from_tensor_input(doc[fmt], spec, fmt)
    if not rows:
        raise PayloadError(f"{fmt}: no rows to score")
    return rows


# --- frames and answers -----------------------------------------------------------------------


def rows_to_frame(rows: list[list[Any]], spec: InputSpec) -> pd.DataFrame:
    """Checked rows -> the DataFrame the model takes (one float64 matrix when it can be)."""
    import numpy as np
    import pandas as pd

    if spec.all_float:
        return pd.DataFrame(np.array(rows, dtype=np.float64), columns=list(spec.names))
    frame = pd.DataFrame.from_records(rows, columns=list(spec.names))
    dtypes = {"float": "float64", "int": "int64", "bool": "bool"}
    strict = [c for c in spec.columns if c.required and not c.null_ok]
    casts = {c.name: dtypes[c.kind] for c in strict if c.kind in dtypes}
    # a numeric column that may hold None: float64 with NaN, as training saw it
    casts.update(
        {c.name: "float64" for c in spec.columns if c.kind in ("float", "int") and c not in strict}
    )
    return frame.astype(casts)


def frame_to_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Predictions -> one plain dict per row (MLflow's ``records`` orient), without pandas' slow
    ``to_dict``: each column goes to Python once."""
    columns = [str(c) for c in frame.columns]
    values = [frame[c].to_numpy().tolist() for c in frame.columns]
    return [dict(zip(columns, row, strict=False)) for row in zip(*values, strict=False)]


def encode_predictions(
    records: list[dict[str, Any]], version: str | None, flagged: list[dict[str, Any]] | None = None
) -> bytes:
    """The response body: MLflow's ``{"predictions": [...]}`` plus the model version, and
    ``flagged`` (the row violations scored under ``serve.row_policy: flag``) when there are."""
    body: dict[str, Any] = {"predictions": records, "model_version": version}
    if flagged:
        body["flagged"] = flagged
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def encode_split_payload(frame: pd.DataFrame) -> bytes:
    """A DataFrame as a ``dataframe_split`` request body (what an MLflow client sends)."""
    return orjson.dumps(
        {
            "dataframe_split": {
                "columns": [str(c) for c in frame.columns],
                "data": frame.to_numpy().tolist(),
            }
        }
    )


def check_frame(frame: pd.DataFrame, spec: InputSpec) -> None:
    """A whole table (batch scoring) against the signature: columns present, types numeric.

    Extra columns are allowed here: they are carried through beside the predictions.

    Raises:
        PayloadError: naming the missing columns or the column of the wrong type.
    """
    import pandas as pd

    missing = [c.name for c in spec.columns if c.required and c.name not in frame.columns]
    if missing:
        raise PayloadError(f"missing column(s) {_shown(missing)}", columns=missing)
    checks = {
        "float": pd.api.types.is_numeric_dtype,
        "int": pd.api.types.is_integer_dtype,
        "bool": pd.api.types.is_bool_dtype,
    }
    for col in spec.columns:
        # an int column that may hold nulls reads as float64 with NaN
        check = checks["float"] if col.kind == "int" and col.null_ok else checks.get(col.kind)
        if col.name not in frame.columns or check is None:
            continue
        dtype = frame[col.name].dtype
        if not check(dtype) or (col.kind == "float" and pd.api.types.is_bool_dtype(dtype)):
            raise PayloadError(
                f"column {col.name!r} has dtype {dtype}, the model takes {col.kind}",
                columns=[col.name],
            )
