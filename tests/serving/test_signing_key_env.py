"""The service, and register's pre-promotion serving check, take the signing key from the env var
``register.signing_key_env`` names (not always ``MODEL_SIGNING_KEY``): with the key set there,
an unsigned version is refused everywhere the service loads one, and a signed one shows as
signed.
"""

from __future__ import annotations

import time
from typing import Any

import mlflow
import pytest
from fastapi.testclient import TestClient

from flows.serve import build_config, build_parser
from model import artifacts
from serving.app import ServiceConfig, create_app
from serving.check import check_servable
from stages.common.config import RegisterParams
from stages.register import gate, judge, manifest
from tests.builders import make_params
from tests.serving.test_artifact_integrity import NAME, Store, register_version, store

__all__ = ["store"]  # the module's MLflow store fixture, shared with the integrity tests
OTHER = "OTHER_SIGNING_KEY"  # register.signing_key_env in these tests


@pytest.fixture(autouse=True)
def _only_the_other_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(artifacts.DEFAULT_KEY_ENV, raising=False)
    monkeypatch.delenv(OTHER, raising=False)


def _ready(service: TestClient, status: int, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while (answer := service.get("/ready")).status_code != status:
        assert time.monotonic() < deadline, answer.json()
        time.sleep(0.05)
    return answer.json()


def test_serve_takes_the_key_env_from_register_params() -> None:
    args = build_parser().parse_args([])
    config, _, _ = build_config(args, make_params({"register": {"signing_key_env": OTHER}}))
    assert config.signing_key_env == OTHER
    default, _, _ = build_config(args, make_params())
    assert default.signing_key_env == artifacts.DEFAULT_KEY_ENV


def test_the_service_and_the_serving_check_use_the_key_register_signs_with(
    store: Store, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = mlflow.MlflowClient()
    unsigned = register_version(store)  # hashes recorded, no key set: not signed
    signed = register_version(store, record=False)
    monkeypatch.setenv(OTHER, "the-key")
    manifest.record_version(client, NAME, signed, OTHER)  # as register does with the key
    client.set_registered_model_alias(NAME, "champion", signed)
    config = ServiceConfig(
        model_name=NAME,
        tracking_uri=store.uri,
        poll_interval_s=0.05,
        log_dir=str(tmp_path / "log"),
        signing_key_env=OTHER,
    )

    with TestClient(create_app(config)) as service:  # follows the alias
        assert _ready(service, 200)["model_version"] == signed
        integrity = service.get("/version").json()["integrity"]
        client.set_registered_model_alias(NAME, "champion", unsigned)
        refused = _ready(service, 503)
    assert integrity.endswith("verified, signed")
    assert refused["model_version"] == signed  # the signed one keeps serving
    assert f"{NAME} v{unsigned} is not signed" in refused["reason"]
    assert f"{OTHER} is set" in refused["reason"]

    fixed = ServiceConfig(
        model_uri=f"models:/{NAME}/{unsigned}",
        tracking_uri=store.uri,
        log_dir=str(tmp_path / "log"),
        signing_key_env=OTHER,
    )
    with TestClient(create_app(fixed)) as service:  # one fixed URI
        deadline = time.monotonic() + 120
        while (answer := service.get("/ready").json())["reason"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert f"{OTHER} is set" in answer["reason"]

    # register's check before the alias moves loads it as the service will
    check = check_servable(f"models:/{NAME}/{unsigned}", 60_000, repeats=1, key_env=OTHER)
    assert not check.passed and f"{OTHER} is set" in check.describe()
    decision = judge.check_serving(
        f"models:/{NAME}/{unsigned}",
        RegisterParams(signing_key_env=OTHER),
        gate.Decision(True, "better", False),
    )
    assert decision.gate_failed and f"{OTHER} is set" in decision.reason
