"""The service under faults: a model that raises, a missing token on /version, a flood.

Each test serves the real registered model (``tests/serving/conftest.py``) through a variant
loader of this module that wraps it: one raises on demand, one holds every model call until a
gate opens, so the queue fills for real.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from flows.serve import build_config, build_parser
from serving.app import ServiceConfig, create_app
from serving.model import load_pyfunc_predictor
from stages.common.config import parse_params
from tests.serving.conftest import NAME, Registry

SECRET_TEXT = "db password hunter2 at /srv/private/features.parquet"
FAIL = threading.Event()  # set: the wrapped model raises SECRET_TEXT
GATE = threading.Event()  # clear: the wrapped model waits (the queue fills behind it)
GATE.set()


class _Wrapped:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def predict(self, frame: pd.DataFrame) -> Any:
        if FAIL.is_set():
            raise RuntimeError(SECRET_TEXT)
        GATE.wait(60)
        return self.inner.predict(frame)


def wrapped_loader(model_uri: str, variant: str) -> _Wrapped:
    """A variant loader (``module:function``): the pyfunc predictor behind FAIL and GATE."""
    return _Wrapped(load_pyfunc_predictor(model_uri))


VARIANT = f"{__name__}:wrapped_loader"


def serve(registry: Registry, **options: Any) -> Iterator[TestClient]:
    config = ServiceConfig(
        model_uri=f"models:/{NAME}/1", variant=VARIANT, tracking_uri=registry.uri, **options
    )
    with TestClient(create_app(config)) as client:
        headers = {"Authorization": f"Bearer {options['token']}"} if "token" in options else {}
        deadline = time.monotonic() + 120
        while client.get("/ready", headers=headers).status_code != 200:
            assert time.monotonic() < deadline, client.get("/ready").json()
            time.sleep(0.05)
        yield client


@pytest.fixture(autouse=True)
def _healthy_model() -> Iterator[None]:
    FAIL.clear()
    GATE.set()
    yield
    FAIL.clear()
    GATE.set()


def one_row(registry: Registry) -> dict:
    return {"dataframe_records": registry.rows.head(1).to_dict(orient="records")}


def test_a_model_failure_answers_500_with_the_request_id_not_the_exception_text(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    for client in serve(registry):
        FAIL.set()
        with caplog.at_level("ERROR", logger="serving.app"):
            answer = client.post("/predict", json=one_row(registry))

    request_id = answer.headers["X-Request-Id"]
    assert answer.status_code == 500
    assert answer.json() == {
        "error_code": "INTERNAL_ERROR",
        "message": f"internal error, request id {request_id} (the service log has the details)",
    }
    assert "hunter2" not in answer.text and "RuntimeError" not in answer.text
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and SECRET_TEXT in (logged[0].exc_text or "")  # the operator still sees it


def test_version_needs_the_token_when_one_is_set(registry: Registry) -> None:
    for client in serve(registry, token="s3cret"):
        missing = client.get("/version")
        wrong = client.get("/version", headers={"Authorization": "Bearer nope"})
        right = client.get("/version", headers={"Authorization": "Bearer s3cret"})

        assert missing.status_code == wrong.status_code == 401
        assert missing.headers["WWW-Authenticate"] == "Bearer"
        assert "run_id" not in missing.text and "bearer token" in missing.json()["message"]
        assert right.status_code == 200 and right.json()["model_version"] == "1"
        assert client.get("/health").status_code == 200  # probes stay open


def test_a_flood_beyond_max_queue_rows_gets_503_with_retry_after_and_is_counted(
    registry: Registry,
) -> None:
    n = 12
    for client in serve(registry, max_queue_rows=2):
        GATE.clear()  # the first call holds the model; the next requests queue behind it
        with ThreadPoolExecutor(n) as pool:
            futures = [
                pool.submit(client.post, "/predict", json=one_row(registry)) for _ in range(n)
            ]
            deadline = time.monotonic() + 60
            # at most 2 rows in the held model call + 2 queued: the others come back at once
            while sum(f.done() for f in futures) < n - 4 and time.monotonic() < deadline:
                time.sleep(0.02)
            refused_early = sum(f.done() for f in futures)
            GATE.set()
            answers = [f.result(timeout=60) for f in futures]
        metrics = client.get("/metrics").text

    statuses = [a.status_code for a in answers]
    refused = [a for a in answers if a.status_code == 503]
    assert refused_early >= n - 4 and set(statuses) == {200, 503}, statuses
    assert len(refused) >= n - 4
    for answer in refused:
        assert int(answer.headers["Retry-After"]) >= 1
        assert "serve.max_queue_rows" in answer.json()["message"]
        assert answer.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"
    assert f"serving_queue_full_total {float(len(refused))}" in metrics
    assert (
        f'serving_requests_total{{endpoint="predict",model_version="1",status="503"}} '
        f"{float(len(refused))}"
    ) in metrics


def test_max_queue_rows_comes_from_params() -> None:
    params = parse_params({"serve": {"max_queue_rows": 7}})

    config, _, _ = build_config(build_parser().parse_args([]), params)

    assert config.max_queue_rows == 7
    assert parse_params({}).serve.max_queue_rows == ServiceConfig().max_queue_rows
