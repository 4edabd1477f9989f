"""Pages served on 127.0.0.1 render with no network: the service's /docs ("Try it out" scores
rows with the documented example) and the MLflow UI in its classic view, showing Models."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from serving.app import ServiceConfig
from tests.browser.harness import assert_clean
from tests.conftest import Reproduced
from tests.serving.live import live_service

pytestmark = pytest.mark.slow  # the session's reproduced pipeline (one dvc repro)

START_S = 90  # a model load or an MLflow server start on 2 busy cores
CLASSIC = "workflowType=machine_learning"  # the MLflow UI's "Model training" view (NOTES14-C)
USERS_PROBE = "/ajax-api/2.0/mlflow/users/current"


def _wait_for(url: str, deadline: float) -> None:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer 200 in time"
        time.sleep(0.2)


@pytest.fixture
def service(pipeline_run: Reproduced, tmp_path: Path) -> Iterator[int]:
    """The model service following the run's ``classifier@champion``; yields its port."""
    config = ServiceConfig(tracking_uri=pipeline_run.uri, log_dir=str(tmp_path / "predictions"))
    with live_service(config, start_s=START_S) as port:
        yield port


def test_service_docs_try_it_out(service: int, open_page) -> None:
    visit = open_page(f"http://127.0.0.1:{service}/docs", name="service-docs")
    page = visit.page
    operation = page.locator("#operations-default-predict_predict_post")
    operation.locator(".opblock-summary").click()
    operation.get_by_role("button", name="Try it out").click()
    operation.get_by_role("button", name="Execute").click()
    status = operation.locator(".live-responses-table .response .response-col_status").first
    status.wait_for(timeout=START_S * 1000)
    assert status.inner_text().strip().startswith("200")
    assert (
        '"predictions"' in operation.locator(".live-responses-table .microlight").first.inner_text()
    )
    assert_clean(visit)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_ui(pipeline_run: Reproduced, tmp_path: Path) -> Iterator[int]:
    """``mlflow server`` (what ``make ui`` runs) on the run's store; yields its port."""
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        pipeline_run.uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = (tmp_path / "mlflow-server.log").open("w")
    # no job runner: its eight huey consumer processes serve GenAI jobs, none of this test's
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_for(f"http://127.0.0.1:{port}/health", time.monotonic() + START_S)
        yield port
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def test_mlflow_ui_classic_view_shows_models(mlflow_ui: int, open_page) -> None:
    # the URL `make ui` prints: the classic view, whose sidebar links the model registry
    visit = open_page(f"http://127.0.0.1:{mlflow_ui}/#/?{CLASSIC}", name="mlflow-ui-models")
    page = visit.page
    page.get_by_role("link", name="Model registry").first.click()
    page.get_by_role("link", name="classifier").first.wait_for(timeout=START_S * 1000)
    # MLflow's UI asks its auth plugin who the user is; a server without one (`make ui`)
    # answers 404 and the UI goes on: MLflow's own probe, not a page that failed to load.
    visit.problems = [p for p in visit.problems if USERS_PROBE not in p]
    assert_clean(visit)
