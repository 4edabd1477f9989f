"""The HTTP service in-process (FastAPI's TestClient): formats, errors, auth, metrics, log."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from flows.serve import build_config, build_parser
from serving.app import ServiceConfig, create_app
from stages.common.config import parse_params
from tests.serving.conftest import LINEAGE, NAME, Registry

MAX_BODY = 16_384  # five rows fit, a thousand do not


def assert_same_predictions(got: list[dict] | pd.DataFrame, expected: list[dict]) -> None:
    pd.testing.assert_frame_equal(
        pd.DataFrame(got).reset_index(drop=True),
        pd.DataFrame(expected),
        check_exact=False,
        atol=1e-6,
    )


def wait_ready(client: TestClient, timeout: float = 120.0) -> None:
    """Poll /ready until the model is loaded (bounded)."""
    deadline = time.monotonic() + timeout
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, client.get("/ready").json()
        time.sleep(0.05)


def serve(config: ServiceConfig, ready: bool = True) -> Iterator[TestClient]:
    with TestClient(create_app(config)) as client:
        if ready:
            wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def client(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The service following ``serve-clf@champion`` (v1), no token, sampling off."""
    log_dir = tmp_path_factory.mktemp("no-log") / "predictions"
    yield from serve(
        ServiceConfig(
            model_name=NAME,
            tracking_uri=registry.uri,
            max_body_bytes=MAX_BODY,
            log_dir=str(log_dir),
        )
    )
    assert not log_dir.exists()  # sample_rate 0 logs nothing


def payloads(rows: pd.DataFrame) -> dict[str, dict]:
    return {
        "dataframe_split": {"dataframe_split": rows.to_dict(orient="split") | {"index": None}},
        "dataframe_records": {"dataframe_records": rows.to_dict(orient="records")},
        "instances": {"instances": rows.to_dict(orient="records")},
        "inputs": {"inputs": rows.to_dict(orient="list")},
    }


@pytest.mark.parametrize("fmt", ["dataframe_split", "dataframe_records", "instances", "inputs"])
def test_every_format_is_answered_like_mlflows_own_scoring_server(
    client: TestClient, registry: Registry, fmt: str
) -> None:
    from mlflow.pyfunc.scoring_server import init

    body = payloads(registry.rows.head(4))[fmt]
    with TestClient(init(mlflow.pyfunc.load_model(f"models:/{NAME}/1"))) as reference:
        expected = reference.post("/invocations", json=body)
    assert expected.status_code == 200, expected.text

    for path in ("/predict", "/invocations"):
        answer = client.post(path, json=body)
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Model-Version"] == "1" and answer.headers["X-Request-Id"]
        assert answer.json()["model_version"] == "1"
        assert_same_predictions(answer.json()["predictions"], expected.json()["predictions"])


def bad_requests(rows: pd.DataFrame) -> list[tuple[str, bytes, str, int, str, list]]:
    record = rows.head(1).to_dict(orient="records")[0]
    js = "application/json"

    def records(**changes: object) -> bytes:
        return json.dumps({"dataframe_records": [{**record, **changes}]}).encode()

    def without(column: str) -> bytes:
        return json.dumps(
            {"dataframe_records": [{k: v for k, v in record.items() if k != column}]}
        ).encode()

    big = json.dumps({"dataframe_records": rows.head(300).to_dict(orient="records")}).encode()
    return [
        ("malformed", b'{"dataframe_records": [', js, 400, "malformed JSON", []),
        (
            "missing",
            without("mean_area"),
            js,
            400,
            "missing column(s) ['mean_area']",
            ["mean_area"],
        ),
        (
            "extra",
            records(patient_id=17),
            js,
            400,
            "unexpected column(s) ['patient_id']",
            ["patient_id"],
        ),
        (
            "wrong type",
            records(mean_texture="high"),
            js,
            400,
            "column 'mean_texture' row 0: expected a number, got str 'high'",
            ["mean_texture"],
        ),
        (
            "too large for the model",
            records(mean_area=1e300),
            js,
            400,
            "value too large for float32 after scaling",
            ["mean_area"],
        ),
        ("oversized", big, js, 413, f"over the limit of {MAX_BODY}", []),
        ("csv", b"mean_radius\n1.0\n", "text/csv", 415, "send the payload as JSON", []),
    ]


def test_bad_requests_get_a_4xx_naming_the_problem_and_the_service_stays_up(
    client: TestClient, registry: Registry
) -> None:
    for name, raw, content_type, status, message, columns in bad_requests(registry.rows):
        answer = client.post("/predict", content=raw, headers={"Content-Type": content_type})

        assert answer.status_code == status, (name, answer.text)
        assert message in answer.json()["message"], name
        assert answer.json().get("columns", []) == columns, name
        assert answer.headers["X-Model-Version"] == "1"

    assert (
        client.post("/predict", json=payloads(registry.rows.head(1))["inputs"]).status_code == 200
    )
    assert client.get("/health").json() == {"status": "ok"}


def test_version_ready_and_metrics_describe_what_is_served(client: TestClient) -> None:
    client.post("/predict", content=b"{", headers={"Content-Type": "application/json"})

    version = client.get("/version").json()
    ready = client.get("/ready").json()
    metrics = client.get("/metrics").text

    registered = mlflow.MlflowClient().get_model_version(NAME, "1")
    assert version["model_name"] == NAME and version["model_version"] == "1"
    assert version["alias"] == "champion" and version["run_id"] == registered.run_id
    assert LINEAGE.items() <= version["tags"].items()
    assert ready == {"ready": True, "model_version": "1"}
    assert 'serving_requests_total{endpoint="predict",model_version="1",status="400"}' in metrics
    assert (
        'serving_request_duration_seconds_bucket{endpoint="predict",le="0.01",'
        'model_version="1",status="400"}' in metrics
    )
    assert f'serving_model_version{{alias="champion",model_name="{NAME}"}} 1.0' in metrics
    assert 'serving_model_loads_total{outcome="ok"} 1.0' in metrics


def test_a_configured_token_is_required_for_predict(registry: Registry) -> None:
    body = payloads(registry.rows.head(1))["dataframe_split"]
    for client in serve(ServiceConfig(model_name=NAME, tracking_uri=registry.uri, token="s3cret")):
        missing = client.post("/predict", json=body)
        wrong = client.post("/invocations", json=body, headers={"Authorization": "Bearer no"})
        right = client.post("/predict", json=body, headers={"Authorization": "Bearer s3cret"})

        assert missing.status_code == wrong.status_code == 401
        assert missing.headers["WWW-Authenticate"] == "Bearer"
        assert "bearer token" in missing.json()["message"]
        assert right.status_code == 200
        assert client.get("/health").status_code == 200  # probes stay open


def test_no_model_means_not_ready_but_alive(registry: Registry) -> None:
    config = ServiceConfig(model_uri=f"models:/{NAME}/99", tracking_uri=registry.uri)
    for client in serve(config, ready=False):
        deadline = time.monotonic() + 60
        while "loading" in client.get("/ready").text and time.monotonic() < deadline:
            time.sleep(0.05)

        ready = client.get("/ready")
        predict = client.post("/predict", json=payloads(registry.rows.head(1))["inputs"])

        assert ready.status_code == 503 and f"models:/{NAME}/99" in ready.json()["reason"]
        assert predict.status_code == 503 and "no model loaded yet" in predict.json()["message"]
        assert client.get("/version").status_code == 503
        assert client.get("/health").status_code == 200


def test_sampled_requests_and_predictions_land_in_parquet_part_files(
    registry: Registry, tmp_path: Path
) -> None:
    log_dir = tmp_path / "predictions"
    config = ServiceConfig(
        model_name=NAME,
        tracking_uri=registry.uri,
        sample_rate=1.0,
        log_dir=str(log_dir),
        log_flush_rows=3,
        log_flush_interval_s=60,
    )
    sent = {}
    for client in serve(config):
        for i in range(4):
            rows = registry.rows.iloc[2 * i : 2 * i + 2]
            answer = client.post("/predict", json=payloads(rows)["dataframe_records"])
            sent[answer.headers["X-Request-Id"]] = (rows, answer.json()["predictions"])
        deadline = time.monotonic() + 30  # 8 rows > flush_rows: the flusher writes a part
        while not list(log_dir.glob("part-*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(log_dir.glob("part-*.parquet")), "no flush before shutdown"
    # shutdown flushed the rest
    assert all(
        p.name.startswith("part-") and p.name.endswith("-v1-" + p.name[-16:])
        for p in log_dir.iterdir()
    )
    logged = pd.read_parquet(log_dir)

    assert len(logged) == 8 and set(logged["request_id"]) == set(sent)
    assert logged["sampled"].all()  # taken by the draw (sample_rate 1)
    assert set(logged["model_version"]) == {"1"} and set(logged["model_name"]) == {NAME}
    assert str(logged["logged_at"].dtype).startswith("datetime64")
    for request_id, (rows, predictions) in sent.items():
        got = logged[logged["request_id"] == request_id]
        pd.testing.assert_frame_equal(
            got[list(rows.columns)].reset_index(drop=True), rows.reset_index(drop=True)
        )
        assert_same_predictions(got[["prediction", "proba_0", "proba_1"]], predictions)


def test_cli_takes_params_then_flags_and_the_token_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    params = parse_params(
        {
            "register": {"model_name": "clf", "alias": "prod"},
            "serve": {"port": 9000, "sample_rate": 0.25, "token_env": "MY_TOKEN"},
        }
    )
    monkeypatch.setenv("MY_TOKEN", "t0k")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")

    args = build_parser().parse_args(["--alias", "staging", "--sample-rate", "0"])
    config, host, port = build_config(args, params)

    assert (host, port) == ("127.0.0.1", 9000)  # loopback unless asked otherwise
    assert (config.model_name, config.alias, config.sample_rate) == ("clf", "staging", 0.0)
    assert config.token == "t0k" and config.tracking_uri == "sqlite:///elsewhere.db"
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["--help"])
    assert done.value.code == 0


def test_cli_row_policy_and_contract_change_come_from_params_then_flags() -> None:
    params = parse_params({"serve": {"row_policy": "flag", "allow_contract_change": True}})

    from_params, _, _ = build_config(build_parser().parse_args([]), params)
    from_flags, _, _ = build_config(
        build_parser().parse_args(["--row-policy", "reject", "--no-allow-contract-change"]), params
    )

    assert (from_params.row_policy, from_params.allow_contract_change) == ("flag", True)
    assert (from_flags.row_policy, from_flags.allow_contract_change) == ("reject", False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--row-policy", "ignore"])
