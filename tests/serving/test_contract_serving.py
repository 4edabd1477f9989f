"""Real rows of real tables, served through the model's input contract (real MLflow, no mocks).

Two models trained by the real stages on palmerpenguins' tables and logged through
``log_servable`` with their contracts (``conftest.tables``): v1 on ``penguins.csv`` (int columns
with missing values), v2 on ``penguins-raw.csv`` (ids, an ISO date and free-text comments the
features stage drops or turns into calendar features, names with spaces and parentheses).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from model.contract import model_contract
from serving.app import ServiceConfig, create_app
from serving.batch import score_frame
from serving.batcher import score_rows
from serving.check import check_servable
from serving.model import ModelHolder, RegistryFollower, load_model
from serving.payloads import parse_payload
from serving.rowcheck import find_violations
from tests.serving.conftest import CONTRACT_NAME, NAME, WEATHER_NAME, Registry, source_rows

# Every test here shares the registry of the two models built once per module (seconds).
pytestmark = pytest.mark.slow

PENGUIN = 0  # a complete row of penguins.csv
MISSING_INTS = 3  # "Adelie,Torgersen,NA,NA,NA,NA,NA,2007": flipper_length_mm etc. missing


def wait_ready(client: TestClient, timeout: float = 120.0) -> None:
    """Poll /ready until the model is loaded (bounded)."""
    deadline = time.monotonic() + timeout
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, client.get("/ready").json()
        time.sleep(0.05)


@contextmanager
def serve(registry: Registry, log_dir: Path, **settings: Any) -> Iterator[TestClient]:
    """The service following ``penguins-clf@champion`` (or ``model_uri``), ready."""
    config = ServiceConfig(
        model_name=CONTRACT_NAME, tracking_uri=registry.uri, log_dir=str(log_dir), **settings
    )
    with TestClient(create_app(config)) as client:
        wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def reject_client(
    tables: dict, registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    """``penguins-clf@champion`` (v1) under the default row policy, reject."""
    with serve(registry, tmp_path_factory.mktemp("reject") / "log") as client:
        yield client


def records(*rows: dict[str, Any]) -> dict[str, Any]:
    return {"dataframe_records": list(rows)}


def with_values(row: int, **values: Any) -> dict[str, Any]:
    return {**source_rows("penguins")[row], **values}


def violations_counted(client: TestClient) -> dict[tuple[str, str, str], float]:
    """``serving_row_violations_total`` by (column, rule, action), from /metrics."""
    found = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "serving_row_violations_total":
                labels = sample.labels
                found[labels["column"], labels["rule"], labels["action"]] = sample.value
    return found


# --- item 1: what validate lets through, serving accepts ------------------------------------


def test_a_source_row_with_missing_ints_is_served(reject_client: TestClient) -> None:
    row = source_rows("penguins")[MISSING_INTS]
    assert row["flipper_length_mm"] is None and row["body_mass_g"] is None

    response = reject_client.post("/predict", json=records(row))

    assert response.status_code == 200, response.json()
    assert response.json()["predictions"][0]["prediction"] in ("Adelie", "Chinstrap", "Gentoo")
    assert "flagged" not in response.json()


def test_every_row_of_the_source_table_is_served(reject_client: TestClient) -> None:
    response = reject_client.post("/predict", json=records(*source_rows("penguins")))

    assert response.status_code == 200, response.json()
    assert len(response.json()["predictions"]) == 344


def test_mlflows_own_schema_enforcement_takes_the_same_rows(tables: dict) -> None:
    model = mlflow.pyfunc.load_model(f"models:/{CONTRACT_NAME}/1")

    answer = model.predict(pd.DataFrame(source_rows("penguins")[:5]))  # one int missing
    one = model.predict(pd.DataFrame([source_rows("penguins")[PENGUIN]]))  # none missing

    assert len(answer) == 5 and len(one) == 1
    flipper = model.metadata.get_input_schema().input_dict()["flipper_length_mm"]
    assert not flipper.required


def test_a_row_of_another_table_with_ids_dates_and_comments_is_served(
    tables: dict, registry: Registry, tmp_path: Path
) -> None:
    """penguins-raw: the columns the features stage drops come as they stand in the file."""
    rows = source_rows("penguins-raw")
    assert rows[MISSING_INTS]["Date Egg"] == "2007-11-16"  # ISO text, as in the CSV
    assert rows[MISSING_INTS]["Flipper Length (mm)"] is None

    with serve(registry, tmp_path / "log", model_uri=f"models:/{CONTRACT_NAME}/2") as served:
        response = served.post("/predict", json=records(*rows))
    assert response.status_code == 200, response.json()
    assert len(response.json()["predictions"]) == len(rows)


def test_a_non_iso_text_date_is_served_as_it_stands_in_the_source(tables: dict) -> None:
    """seattle-weather: ``date`` like 2012/01/01, a used column (calendar features)."""
    rows = source_rows("seattle-weather")
    assert rows[0]["date"] == "2012/01/01"
    date = {col["name"]: col for col in tables["seattle-weather"].contract["columns"]}["date"]
    assert (date["kind"], date["format"], date["used"]) == ("datetime", "%Y/%m/%d", True)
    model = load_model(f"models:/{WEATHER_NAME}/1")

    ours = score_rows(model, parse_payload(json.dumps(records(*rows[:20])).encode(), model.spec))
    mlflows = mlflow.pyfunc.load_model(f"models:/{WEATHER_NAME}/1").predict(pd.DataFrame(rows[:20]))

    assert [r["prediction"] for r in ours] == mlflows["prediction"].tolist()
    assert (
        find_violations(model, parse_payload(json.dumps(records(*rows)).encode(), model.spec)) == []
    )


def test_the_model_ships_its_contract_and_an_old_model_gets_one_from_its_signature(
    tables: dict, registry: Registry
) -> None:
    assert model_contract(f"models:/{CONTRACT_NAME}/1") == tables["penguins"].contract

    legacy = model_contract(f"models:/{NAME}/1")  # logged without a contract
    assert legacy["derived_from"] == "signature" and legacy["labels"] == ["0", "1"]


# --- item 8: the row policy -------------------------------------------------------------------

BAD_ROWS = {  # name -> (row, the column and rule it breaks)
    "unseen category": (with_values(PENGUIN, island="Atlantis"), ("island", "in_set")),
    "absurd value": (
        with_values(PENGUIN, flipper_length_mm=1e30),
        ("flipper_length_mm", "between"),
    ),
    "all null": ({name: None for name in with_values(PENGUIN)}, ("*", "all_null")),
}


@pytest.mark.parametrize("name", list(BAD_ROWS))
def test_reject_answers_422_naming_column_and_rule_and_counts_it(
    reject_client: TestClient, name: str
) -> None:
    row, (column, rule) = BAD_ROWS[name]
    before = violations_counted(reject_client).get((column, rule, "rejected"), 0)

    response = reject_client.post("/predict", json=records(row))

    assert response.status_code == 422
    body = response.json()
    assert column in body["columns"]
    assert {"row": 0, "column": column, "rule": rule} in [
        {key: v[key] for key in ("row", "column", "rule")} for v in body["violations"]
    ]
    assert f"column {column!r} breaks {rule}" in body["message"]
    assert violations_counted(reject_client)[column, rule, "rejected"] == before + 1


def test_flag_scores_the_rows_marks_them_and_logs_them(
    tables: dict, registry: Registry, tmp_path: Path
) -> None:
    rows = [row for row, _ in BAD_ROWS.values()] + [source_rows("penguins")[PENGUIN]]
    log_dir = tmp_path / "log"

    # sample_rate 0: only the marked rows are logged
    with serve(registry, log_dir, row_policy="flag") as served:
        response = served.post("/predict", json=records(*rows))
        counted = violations_counted(served)
    assert response.status_code == 200, response.json()
    assert len(response.json()["predictions"]) == 4
    flagged = {(v["row"], v["column"], v["rule"]) for v in response.json()["flagged"]}
    assert {
        (0, "island", "in_set"),
        (1, "flipper_length_mm", "between"),
        (2, "*", "all_null"),
    } <= flagged
    assert all(row < 3 for row, _, _ in flagged)  # the good row is not flagged
    assert counted["island", "in_set", "flagged"] == 1
    logged = pd.read_parquet(log_dir)  # flushed at shutdown
    assert logged["row_violations"].tolist()[:2] == ["island:in_set", "flipper_length_mm:between"]
    assert "*:all_null" in logged["row_violations"][2]
    assert logged["row_violations"].isna().tolist()[3] and not logged["row_rejected"].any()
    assert not logged["sampled"].any()  # sample_rate 0: logged for their marks alone


def test_flag_scores_a_row_with_an_unparseable_date_beside_a_good_one(
    tables: dict, registry: Registry, tmp_path: Path
) -> None:
    """seattle-weather's ``date`` is used (calendar features): under flag a date that parses
    neither as %Y/%m/%d nor as ISO is scored as missing, not a 400 for every row."""
    good, bad = source_rows("seattle-weather")[:2]
    bad = {**bad, "date": "the 2nd of January"}
    classes = {"sun", "fog", "rain", "drizzle", "snow"}

    with serve(
        registry, tmp_path / "log", row_policy="flag", model_uri=f"models:/{WEATHER_NAME}/1"
    ) as served:
        response = served.post("/predict", json=records(good, bad))
        counted = violations_counted(served)
        missing = served.post("/predict", json=records({**bad, "date": None}))
    assert response.status_code == 200, response.json()
    predictions = response.json()["predictions"]
    assert len(predictions) == 2 and {p["prediction"] for p in predictions} <= classes
    assert response.json()["flagged"] == [
        {"row": 1, "column": "date", "rule": "date_format", "value": "the 2nd of January"}
    ]
    assert counted["date", "date_format", "flagged"] == 1
    alone = missing.json()["predictions"][0]  # the row with its date missing, scored alone
    assert predictions[1]["prediction"] == alone["prediction"]
    assert {
        key: value for key, value in predictions[1].items() if key != "prediction"
    } == pytest.approx(
        {key: value for key, value in alone.items() if key != "prediction"}, rel=1e-5
    )  # float noise of the batch size
    logged = pd.read_parquet(tmp_path / "log")
    marked = logged.dropna(subset=["row_violations"])
    assert marked[["date", "row_violations"]].values.tolist()[0] == [
        "the 2nd of January",
        "date:date_format",
    ]  # logged as sent


def test_a_rejected_row_is_marked_in_the_prediction_log(
    tables: dict, registry: Registry, tmp_path: Path
) -> None:
    with serve(registry, tmp_path / "log") as served:
        assert (
            served.post("/predict", json=records(BAD_ROWS["unseen category"][0])).status_code == 422
        )
    logged = pd.read_parquet(tmp_path / "log")
    assert logged[["island", "row_violations", "row_rejected"]].values.tolist() == [
        ["Atlantis", "island:in_set", True]
    ]
    assert logged["prediction"].isna().all()


# --- item 5: the follower never swaps to another input contract unless told to -------------


def test_the_follower_refuses_a_model_with_another_contract(tables: dict) -> None:
    client = mlflow.MlflowClient()
    holder = ModelHolder()
    follower = RegistryFollower(holder, CONTRACT_NAME, "champion")
    assert follower.check_once() and holder.current.version == "1"

    client.set_registered_model_alias(CONTRACT_NAME, "champion", "2")  # penguins-raw
    try:
        assert not follower.check_once()
        assert not follower.check_once()  # refused once, not reloaded on every poll
    finally:
        client.set_registered_model_alias(CONTRACT_NAME, "champion", "1")

    assert holder.current.version == "1"
    assert "refused penguins-clf v2: its input contract differs" in follower.last_error
    assert "new columns: ['Body Mass (g)'" in follower.refused["2"]
    assert "serve.allow_contract_change" in follower.last_error


def test_allow_contract_change_swaps(tables: dict) -> None:
    holder = ModelHolder(load_model(f"models:/{CONTRACT_NAME}/1"))
    follower = RegistryFollower(holder, CONTRACT_NAME, "champion", allow_contract_change=True)
    mlflow.MlflowClient().set_registered_model_alias(CONTRACT_NAME, "champion", "2")
    try:
        assert follower.check_once()
    finally:
        mlflow.MlflowClient().set_registered_model_alias(CONTRACT_NAME, "champion", "1")
    assert holder.current.version == "2" and follower.last_error is None


def test_the_service_shows_the_refusal_on_version(
    tables: dict, registry: Registry, tmp_path: Path
) -> None:
    with serve(registry, tmp_path / "log", poll_interval_s=0.05) as served:
        mlflow.MlflowClient().set_registered_model_alias(CONTRACT_NAME, "champion", "2")
        try:
            deadline = time.monotonic() + 60
            while not served.get("/version").json()["follower"]["refused_versions"]:
                assert time.monotonic() < deadline, served.get("/version").json()
                time.sleep(0.05)
            version = served.get("/version").json()
            prediction = served.post("/predict", json=records(source_rows("penguins")[0]))
        finally:
            mlflow.MlflowClient().set_registered_model_alias(CONTRACT_NAME, "champion", "1")
    assert version["model_version"] == "1"
    assert "input contract differs" in version["follower"]["last_error"]
    assert prediction.status_code == 200


@pytest.mark.parametrize("version", ["1", "2"])
def test_the_pre_promotion_check_answers_the_models_own_example(tables: dict, version: str) -> None:
    """What register runs before promotion: the example holds every source column."""
    check = check_servable(f"models:/{CONTRACT_NAME}/{version}", max_latency_ms=60_000)

    assert check.problems == ()


def test_a_contract_is_plain_json(tables: dict) -> None:
    contract = copy.deepcopy(tables["penguins"].contract)

    assert json.loads(json.dumps(contract)) == contract


def test_batch_scoring_takes_the_test_split_with_its_missing_ints(tables: dict) -> None:
    test = pd.read_parquet(tables["penguins"].features / "test.parquet").drop(columns="species")
    model = load_model(f"models:/{CONTRACT_NAME}/1")

    scored = score_frame(model, test)

    assert len(scored) == len(test) and scored["prediction"].notna().all()
