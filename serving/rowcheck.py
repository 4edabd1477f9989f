"""Each request's rows against the served model's input contract, and the row policy.

The contract (``model.contract``, shipped with the model as ``contract.json``) carries
the reviewed suite's rules; a row that breaks one (an unseen category, a value outside the
suite's range, every column null, ...) is handled per params ``serve.row_policy``:

* ``reject``: the request is answered 422, naming each row, column and rule;
* ``flag``: the rows are scored and the response lists them under ``flagged``; a value the
  preprocessor cannot take (a text date it cannot parse) is scored as missing.

Either way the service counts each violation in ``/metrics``
(``serving_row_violations_total{column, rule, action}``) and marks the rows in the prediction
log. Pure Python: no web framework here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from model.contract import Violation, check_columns
from serving.payloads import PayloadError

if TYPE_CHECKING:
    from serving.model import LoadedModel

SHOWN = 5  # violations quoted in one message at most
UNSCORABLE = ("date_format",)  # rules whose value the preprocessor cannot take (scored missing)


def find_violations(model: LoadedModel, rows: list[list[Any]]) -> list[Violation]:
    """The contract violations of checked rows (values in ``model.spec`` column order)."""
    if not model.checks_rows:
        return []
    columns = {name: [row[i] for row in rows] for i, name in enumerate(model.spec.names)}
    return check_columns(columns, len(rows), dict(model.contract or {}))


def scorable(
    model: LoadedModel, rows: list[list[Any]], violations: list[Violation]
) -> list[list[Any]]:
    """The rows to score under ``flag``: a value breaking a rule the preprocessor cannot take
    (``UNSCORABLE``: a text date it cannot parse) is set to missing, so the row is scored (a
    missing date gives zero calendar features) instead of failing the whole request.

    Returns:
        ``rows`` itself when nothing is replaced, else a copy (the log keeps the values sent).
    """
    position = {name: i for i, name in enumerate(model.spec.names)}
    broken = [
        (v.row, position[v.column])
        for v in violations
        if v.rule in UNSCORABLE and v.column in position
    ]
    if not broken:
        return rows
    rows = list(rows)
    for row, column in broken:
        rows[row] = list(rows[row])
        rows[row][column] = None
    return rows


def describe(violations: list[Violation]) -> list[dict[str, Any]]:
    """The violations as JSON objects: row, column, rule, value."""
    return [
        {"row": v.row, "column": v.column, "rule": v.rule, "value": v.value} for v in violations
    ]


def rejection(violations: list[Violation]) -> PayloadError:
    """The 422 answer under ``row_policy: reject``, naming rows, columns and rules."""
    shown = "; ".join(v.describe() for v in violations[:SHOWN])
    more = f" and {len(violations) - SHOWN} more" if len(violations) > SHOWN else ""
    return PayloadError(
        f"row(s) outside the model's input contract: {shown}{more} (the rules come from the "
        "reviewed suite; serve.row_policy: flag scores such rows and marks them instead)",
        status=422,
        columns=sorted({v.column for v in violations}),
        details=describe(violations),
    )


def row_marks(violations: list[Violation], n_rows: int) -> list[str | None]:
    """Per row: ``"column:rule;..."`` of its violations, or None (the prediction log's mark)."""
    marks: list[list[str]] = [[] for _ in range(n_rows)]
    for v in violations:
        marks[v.row].append(f"{v.column}:{v.rule}")
    return [";".join(found) or None for found in marks]
