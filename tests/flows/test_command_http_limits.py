"""The commands that open an MLflow client outside a stage (make lineage, make rollback, batch
scoring, make serve) bound their wait for a tracking server by params, as stages do."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from flows import batch_score, lineage, rollback
from flows import serve as cli
from serving.model import ModelLoadError
from stages.common import tracking
from stages.common.config import load_params
from tests.builders import TEST_PARAMS

LIMITS = {"request_timeout_s": 7, "max_retries": 0, "backoff_s": 1}
EXPECTED = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "7",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}


@pytest.fixture
def dead_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A params file with tight HTTP limits; MLFLOW_TRACKING_URI a closed 127.0.0.1 port;
    MLflow's HTTP env settings unset (restored after the test)."""
    for name in (*tracking.HTTP_LIMITS, tracking.HTTP_LIMITS_MARKER):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    raw = {name: dict(section) for name, section in TEST_PARAMS.items()}
    raw["mlflow"] = {**raw.get("mlflow", {}), **LIMITS}
    path = tmp_path / "params.yaml"
    path.write_text(json.dumps(raw))
    return path


def _applied() -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in EXPECTED}


def test_rollback_and_lineage_apply_the_limits_and_fail_against_a_dead_server(
    dead_server: Path, tmp_path: Path
) -> None:
    uri = lineage.resolve_tracking_uri(tmp_path, dead_server)
    assert _applied() == EXPECTED
    # with MLflow's defaults (7 retries, backoff 2) this took minutes; now one refused request
    with pytest.raises(MlflowException):
        rollback.rollback(lineage.open_client(uri), "classifier", "champion", "why")


def test_batch_scoring_applies_the_limits(dead_server: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot resolve it in the registry"):
        batch_score.load_scoring_model.fn(str(dead_server), None, "pyfunc")
    assert _applied() == EXPECTED


def test_the_service_applies_the_limits(dead_server: Path) -> None:
    args = cli.build_parser().parse_args(["--params", str(dead_server)])
    cli.build_config(args, load_params(dead_server))
    assert _applied() == EXPECTED
