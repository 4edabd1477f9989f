"""The service's OpenAPI document and its /docs pages, which render with no network.

``/docs`` (Swagger UI) and ``/redoc`` load their scripts, styles and icon from the pinned
``fastapi-offline`` package's files, served by the app itself under ``/static-offline-docs``
(FastAPI's defaults load them from a CDN, so the pages stay blank offline). ``/predict`` and
``/invocations`` read the raw body (:mod:`serving.payloads`), so FastAPI cannot infer their
request body: :func:`scoring_openapi` documents it (MLflow's four scoring formats) and every
answer the endpoint gives. The body's example is one synthetic row built from the served model's
input contract (:func:`synthetic_payload`: a range's midpoint, the first allowed value, a date in
the column's format), so "Try it out" then "Execute" in /docs scores it as it is. It is never a
real row (the model's input example holds rows of the test split): /openapi.json and /docs are
public even when a token guards /predict and /version.
"""

from __future__ import annotations

import copy
import datetime as dt
import math
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from serving.payloads import ColumnSpec, InputSpec

SCORING_PATHS = ("/predict", "/invocations")
BEARER = "bearer"  # the security scheme's name in the document

_ROWS = {"type": "array", "items": {"type": "object", "additionalProperties": True}}
REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "One of MLflow's scoring formats (exactly one of the first four keys). "
    "Columns are the model's input columns; values are checked against its input contract.",
    "properties": {
        "dataframe_split": {
            "type": "object",
            "properties": {
                "columns": {"type": "array", "items": {"type": "string"}},
                "data": {"type": "array", "items": {"type": "array", "items": {}}},
            },
            "required": ["columns", "data"],
        },
        "dataframe_records": _ROWS,
        "inputs": {"description": "records, or one list of values per column"},
        "instances": {"description": "the same as inputs"},
        "params": {"type": "object", "description": "accepted and ignored"},
    },
}
SAMPLE_DATE = dt.date(2024, 1, 15)  # the synthetic row's date, in each column's format
SAMPLE_TEXT = "example"  # a text column with no value set: any text is accepted
# Until a model is loaded the document cannot know its columns.
PLACEHOLDER_EXAMPLE = {"dataframe_split": {"columns": ["<input column>"], "data": [[0.0]]}}


def _error(description: str, example: dict[str, Any], **headers: str) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"example": example}},
    }
    if headers:
        answer["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in headers.items()
        }
    return answer


RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "One prediction per row (the predicted label and a probability per "
        "label), the version that scored them, and under row_policy flag the rows that broke "
        "the input contract. Headers X-Model-Version and X-Request-Id.",
        "content": {
            "application/json": {
                "example": {
                    "predictions": [{"prediction": 1, "proba_0": 0.03, "proba_1": 0.97}],
                    "model_version": "3",
                }
            }
        },
    },
    400: _error(
        "The payload is not one the model can score: bad JSON, unknown format, a missing "
        "column or a value of the wrong type (named in columns).",
        {"error_code": "BAD_REQUEST", "message": "missing column(s)", "columns": ["age"]},
    ),
    401: _error(
        "A bearer token is configured and the request has none or another one.",
        {"error_code": "UNAUTHENTICATED", "message": "missing or wrong bearer token"},
        **{"WWW-Authenticate": "Bearer"},
    ),
    413: _error(
        "The body is over the service's max_body_bytes.",
        {"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "body is over the limit"},
    ),
    415: _error(
        "The body is not UTF-8 JSON.",
        {"error_code": "UNSUPPORTED_MEDIA_TYPE", "message": "send the payload as JSON"},
    ),
    422: _error(
        "Under row_policy reject: row(s) outside the model's input contract, each named with "
        "its column, rule and value.",
        {
            "error_code": "BAD_REQUEST",
            "message": "row(s) outside the model's input contract: row 0 age: max",
            "columns": ["age"],
            "violations": [{"row": 0, "column": "age", "rule": "max", "value": 250}],
        },
    ),
    500: _error(
        "The model failed; the body names only the request id (the log has the error).",
        {"error_code": "INTERNAL_ERROR", "message": "internal error, request id 3f2a..."},
    ),
    503: _error(
        "No model is loaded yet, or max_queue_rows rows already wait for the model "
        "(then with Retry-After).",
        {"error_code": "TEMPORARILY_UNAVAILABLE", "message": "no model loaded yet (loading)"},
        **{"Retry-After": "seconds to wait, when the queue is full"},
    ),
}


def scoring_openapi() -> dict[str, Any]:
    """The ``openapi_extra`` of the scoring routes: their request body and the bearer token."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": REQUEST_SCHEMA, "example": PLACEHOLDER_EXAMPLE}
            },
        },
        "security": [{}, {BEARER: []}],  # the token is optional: only when one is configured
    }


def synthetic_payload(spec: InputSpec, contract: Mapping[str, Any] | None) -> dict[str, Any]:
    """A ``dataframe_split`` payload of one made-up row that keeps ``contract``: per column
    the midpoint of its range (a positive number when it must be), its first allowed value, or
    a date in its format; without a contract (or a column's rules) a plain value of its type.
    No real data goes into it."""
    rules = {str(col["name"]): col for col in (contract or {}).get("columns") or []}
    row = [_synthetic_value(col, rules.get(col.name, {})) for col in spec.columns]
    return {"dataframe_split": {"columns": list(spec.names), "data": [row]}}


def _synthetic_value(col: ColumnSpec, rule: Mapping[str, Any]) -> Any:
    allowed = rule.get("values") or []
    if rule.get("kind") == "datetime" and not allowed:
        return SAMPLE_DATE.strftime(rule["format"]) if rule.get("format") else str(SAMPLE_DATE)
    if col.kind == "bool":
        return allowed[0] if allowed and isinstance(allowed[0], bool) else False
    if col.kind not in ("float", "int") and rule.get("kind") not in ("float", "int"):
        return str(allowed[0]) if allowed else SAMPLE_TEXT  # text, or a column of no known type
    value = float(allowed[0]) if allowed else _midpoint(rule)
    if col.kind == "int":
        low = rule.get("min")
        return int(max(round(value), math.ceil(low) if low is not None else round(value)))
    return value


def _midpoint(rule: Mapping[str, Any]) -> float:
    low, high = rule.get("min"), rule.get("max")
    finite = [float(v) for v in (low, high) if v is not None and math.isfinite(float(v))]
    value = sum(finite) / len(finite) if finite else 0.0
    if rule.get("positive") and value <= 0:  # min 0 and no max, or both at 0
        value = max(finite + [1.0])
    return value


def install_openapi(app: FastAPI, example: Callable[[], dict[str, Any] | None]) -> None:
    """Serve the app's OpenAPI document with the scoring routes' example from ``example()``.

    The document is built once; the example is filled in on every request, so it follows the
    served model (a hot swap to another input contract changes it).
    """
    base: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not base:
            base.update(
                get_openapi(
                    title=app.title,
                    version=app.version,
                    description=app.description,
                    routes=app.routes,
                )
            )
            base.setdefault("components", {})["securitySchemes"] = {
                BEARER: {"type": "http", "scheme": "bearer"}
            }
        document = copy.deepcopy(base)
        payload = example()
        if payload is not None:
            for path in SCORING_PATHS:
                body = document["paths"][path]["post"]["requestBody"]
                body["content"]["application/json"]["example"] = payload
        return document

    app.openapi = openapi  # type: ignore[method-assign]
