"""Payload parsing: MLflow's four JSON formats, and every way a request can be wrong."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from serving.payloads import (
    ColumnSpec,
    InputSpec,
    PayloadError,
    check_frame,
    encode_predictions,
    encode_split_payload,
    frame_to_records,
    parse_payload,
    rows_to_frame,
    spec_from_contract,
)

SPEC = InputSpec((ColumnSpec("a", "float"), ColumnSpec("b", "float"), ColumnSpec("c", "float")))
MIXED = InputSpec(
    (
        ColumnSpec("x", "float"),
        ColumnSpec("n", "int"),
        ColumnSpec("flag", "bool"),
        ColumnSpec("city", "str"),
        ColumnSpec("note", "str", required=False),
    )
)
ROWS = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
RECORDS = [{"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 4, "b": 5.0, "c": 6.0}]  # ints are numbers


def body(doc: object) -> bytes:
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "doc",
    [
        {"dataframe_split": {"columns": ["a", "b", "c"], "data": ROWS}},
        {
            "dataframe_split": {
                "columns": ["c", "a", "b"],
                "data": [[3, 1, 2], [6, 4, 5]],
                "index": [7, 8],
            }
        },
        {"dataframe_records": RECORDS},
        {"instances": RECORDS},
        {"inputs": RECORDS},
        {"inputs": {"a": [1, 4], "b": [2, 5], "c": [3, 6]}},
        {"instances": ROWS},  # rows in the signature's column order
        {"inputs": ROWS, "params": {"ignored": True}},
    ],
)
def test_every_mlflow_format_gives_the_same_rows(doc: dict) -> None:
    rows = parse_payload(body(doc), SPEC)

    assert rows == ROWS
    assert all(type(v) is float for row in rows for v in row)


def test_a_columnar_input_of_scalars_is_one_row() -> None:
    assert parse_payload(body({"inputs": {"a": 1, "b": 2, "c": 3.5}}), SPEC) == [[1.0, 2.0, 3.5]]


def test_null_in_a_float_column_is_a_missing_value_for_the_imputer() -> None:
    rows = parse_payload(body({"dataframe_records": [{"a": None, "b": 1, "c": 2}]}), SPEC)

    assert math.isnan(rows[0][0])


@pytest.mark.parametrize(
    ("raw", "status", "message"),
    [
        (b"{not json", 400, "malformed JSON"),
        (b"[1, 2]", 400, "must be a JSON object with exactly one of the keys"),
        (body({"dataframe_split": {}, "inputs": []}), 400, "exactly one of the keys"),
        (
            body({"dataframe_split": {"columns": ["a", "b", "c"], "data": ROWS}, "extra": 1}),
            400,
            "got ['dataframe_split', 'extra']",
        ),
        (body({"dataframe_records": []}), 400, "dataframe_records: no rows to score"),
        (body({"dataframe_records": {"a": 1}}), 400, "must be a list of records"),
        (
            body({"dataframe_split": {"columns": ["a", "b", "c"], "data": [[1, 2]]}}),
            400,
            "row 0 has 2 values for 3 columns",
        ),
        (
            body({"dataframe_split": {"columns": ["a", "b", "c"], "data": ROWS, "orient": 1}}),
            400,
            "unexpected key(s) ['orient']",
        ),
        (body({"inputs": {"a": [1, 2], "b": [1], "c": [1, 2]}}), 400, "different lengths"),
        (body({"inputs": "abc"}), 400, "must be a list of records"),
    ],
)
def test_malformed_payloads_are_refused_with_the_reason(
    raw: bytes, status: int, message: str
) -> None:
    with pytest.raises(PayloadError) as caught:
        parse_payload(raw, SPEC)

    assert caught.value.status == status
    assert message in caught.value.message


def test_missing_and_unexpected_columns_are_named() -> None:
    doc = {"dataframe_records": [{"a": 1, "c": 2, "zz": 3, "yy": 4}]}

    with pytest.raises(PayloadError) as caught:
        parse_payload(body(doc), SPEC)

    assert caught.value.message.startswith(
        "missing column(s) ['b']; unexpected column(s) ['zz', 'yy'] (the model takes 3 columns"
    )
    assert caught.value.columns == ["b", "zz", "yy"]
    assert caught.value.to_json() == {
        "error_code": "BAD_REQUEST",
        "message": caught.value.message,
        "columns": ["b", "zz", "yy"],
    }


def test_repeated_columns_are_named() -> None:
    doc = {"dataframe_split": {"columns": ["a", "b", "c", "a"], "data": [[1, 2, 3, 4]]}}

    with pytest.raises(PayloadError, match=r"repeated column\(s\) \['a'\]"):
        parse_payload(body(doc), SPEC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1.5", "column 'b' row 1: expected a number, got str '1.5'"),
        (True, "column 'b' row 1: expected a number, got bool True"),
        ([1], "column 'b' row 1: expected a number, got list [1]"),
    ],
)
def test_wrong_types_name_the_column_and_row(value: object, expected: str) -> None:
    doc = {"dataframe_records": [RECORDS[0], {**RECORDS[1], "b": value}]}

    with pytest.raises(PayloadError) as caught:
        parse_payload(body(doc), SPEC)

    assert caught.value.message == expected and caught.value.columns == ["b"]


def test_mixed_signature_types_are_checked_and_framed() -> None:
    good = {"x": 1, "n": 2.0, "flag": False, "city": "Oslo"}  # 2.0 is an integer value
    rows = parse_payload(body({"dataframe_records": [good]}), MIXED)

    frame = rows_to_frame(rows, MIXED)

    assert rows == [[1.0, 2, False, "Oslo", None]]  # the optional column may be left out
    assert frame.dtypes.astype(str).tolist()[:3] == ["float64", "int64", "bool"]
    for column, value, message in [
        ("n", 2.5, "expected an integer"),
        ("flag", 1, "expected true or false"),
        ("city", None, "missing value in a required str column"),
    ]:
        with pytest.raises(PayloadError, match=f"column '{column}' row 0: {message}"):
            parse_payload(body({"dataframe_records": [{**good, column: value}]}), MIXED)


def test_frames_records_and_the_response_body() -> None:
    frame = rows_to_frame(ROWS, SPEC)
    predictions = pd.DataFrame(
        {"prediction": [0, 1], "proba_0": [0.75, 0.25], "proba_1": [0.25, 0.75]}
    )

    records = frame_to_records(predictions)

    assert frame.to_numpy().tolist() == ROWS and list(frame.columns) == ["a", "b", "c"]
    assert records == [
        {"prediction": 0, "proba_0": 0.75, "proba_1": 0.25},
        {"prediction": 1, "proba_0": 0.25, "proba_1": 0.75},
    ]
    assert type(records[0]["prediction"]) is int
    assert json.loads(encode_predictions(records, "3")) == {
        "predictions": records,
        "model_version": "3",
    }
    assert parse_payload(encode_split_payload(frame), SPEC) == ROWS


def test_check_frame_allows_extra_columns_but_not_missing_or_wrong_types() -> None:
    frame = pd.DataFrame({"a": [1.0], "b": [2], "c": [3.0], "id": ["r1"]})
    check_frame(frame, SPEC)  # ints are numbers, extra columns are carried along

    with pytest.raises(PayloadError, match=r"missing column\(s\) \['c'\]"):
        check_frame(frame.drop(columns=["c"]), SPEC)
    with pytest.raises(
        PayloadError, match="column 'b' has dtype (str|object), the model takes float"
    ):
        check_frame(frame.assign(b=["x"]), SPEC)
    with pytest.raises(PayloadError, match="column 'a' has dtype bool"):
        check_frame(frame.assign(a=np.array([True])), SPEC)


# --- the spec from the model's input contract ----------------------------------------------

CONTRACT = {
    "columns": [
        {"name": "x", "kind": "float", "nullable": False, "used": True},
        {"name": "n", "kind": "int", "nullable": True, "used": True},
        {"name": "year", "kind": "int", "nullable": False, "used": True},
        {"name": "island", "kind": "category", "nullable": False, "used": True},
        {"name": "id", "kind": "int", "nullable": False, "used": False},
        {"name": "day", "kind": "datetime", "nullable": False, "used": False},
    ]
}


def test_a_contract_spec_takes_a_source_row_with_a_missing_int_and_a_text_date() -> None:
    spec = spec_from_contract(CONTRACT)
    doc = {
        "dataframe_records": [
            {"x": 1.5, "n": None, "year": 2007, "island": "Dream", "id": 7, "day": "2007/11/11"},
            {"x": 2.5, "n": 181, "year": 2008, "island": "Biscoe"},  # unused columns left out
        ]
    }

    rows = parse_payload(body(doc), spec)
    frame = rows_to_frame(rows, spec)

    assert [c.name for c in spec.columns if c.required] == ["x", "year", "island"]
    assert frame["n"].dtype == np.float64 and math.isnan(frame["n"][0]) and frame["n"][1] == 181
    assert frame["day"][0] == "2007/11/11" and frame["day"].isna()[1]


def test_a_contract_spec_leaves_nulls_and_huge_ints_to_the_row_checks() -> None:
    spec = spec_from_contract(CONTRACT)
    doc = {"dataframe_records": [{"x": None, "n": 1e30, "year": None, "island": None}]}

    rows = parse_payload(body(doc), spec)

    assert rows[0][1:4] == [1e30, None, None]
    assert rows_to_frame(rows, spec)["year"].isna().all()
