"""/predict's OpenAPI example is a made-up row that keeps the model's input contract (review
#7): /openapi.json is public, so no real row may be in it, and "Try it out" must still score."""

from __future__ import annotations

import json

from model.contract import check_rows, contract_from_signature
from serving.docs import synthetic_payload
from serving.payloads import ColumnSpec, InputSpec, parse_payload, rows_to_frame, spec_from_contract


def _col(name: str, kind: str, **rules: object) -> dict:
    return {"name": name, "kind": kind, "nullable": False, "used": True, **rules}


CONTRACT = {
    "version": 1,
    "columns": [
        _col("bill_length_mm", "float", min=32.1, max=59.6),
        _col("body_mass_g", "int", min=2700, max=6301),
        _col("rain_mm", "float", min=0, positive=True),  # no max: a positive value still
        _col("island", "category", values=["Biscoe", "Dream"]),
        _col("code", "category", values=[3, 7]),  # listed as numbers, sent as text
        _col("sex_known", "bool", values=[True, False]),
        _col("date", "datetime", format="%Y/%m/%d"),
        _col("seen_at", "datetime"),
        _col("id", "int", used=False),
    ],
}


def _scores_without_a_violation(payload: dict, spec: InputSpec, contract: dict) -> list:
    rows = parse_payload(json.dumps(payload).encode(), spec)  # what /predict reads
    return check_rows(rows_to_frame(rows, spec), contract)


def test_the_example_is_one_synthetic_row_inside_every_rule_of_the_contract() -> None:
    spec = spec_from_contract(CONTRACT)
    payload = synthetic_payload(spec, CONTRACT)
    split = payload["dataframe_split"]
    assert split["columns"] == list(spec.names)
    assert split["data"] == [[45.85, 4500, 1.0, "Biscoe", "3", True, "2024/01/15", "2024-01-15", 0]]
    assert _scores_without_a_violation(payload, spec, CONTRACT) == []


def test_a_model_without_ranges_or_a_contract_gets_plain_values_of_each_type() -> None:
    derived = contract_from_signature(
        [("x", "double", True), ("n", "long", True), ("c", "string", True)], ["proba_a"]
    )
    spec = spec_from_contract(derived)
    payload = synthetic_payload(spec, derived)
    assert payload["dataframe_split"]["data"] == [[0.0, 0, "example"]]
    assert _scores_without_a_violation(payload, spec, derived) == []

    bare = InputSpec((ColumnSpec("x", "float"), ColumnSpec("ok", "bool"), ColumnSpec("a", "any")))
    assert synthetic_payload(bare, None)["dataframe_split"]["data"] == [[0.0, False, "example"]]
