"""/ready follows what the service can serve, not the registry's uptime; deleting a version's
hash tags does not downgrade it to "unverified"; a refused version fixed with
``python -m flows.artifacts record`` is tried again (issue 10 item 7 and 6; review #4, #9).
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from typing import Any

import mlflow
import pytest
from fastapi.testclient import TestClient

from flows import artifacts as artifacts_cli
from model import artifacts
from model.servable import log_servable
from serving.app import ServiceConfig, create_app
from serving.model import ModelHolder, ModelIntegrityError, RegistryFollower, load_model
from stages.register import manifest
from tests.serving.conftest import Store

NAME = "ready-clf"  # this module's own model in the session's integrity store


def register(store: Store, network: Path | None = None) -> str:
    """Log + register a version as register does: its hashes recorded."""
    with mlflow.start_run():
        info = log_servable(
            store.features / "preprocessor.joblib",
            network or store.network,
            store.rows.head(5),
            registered_model_name=NAME,
        )
    version = str(info.registered_model_version)
    manifest.record_version(mlflow.MlflowClient(), NAME, version)
    return version


def strip_hash_tags(version: str) -> None:
    client = mlflow.MlflowClient()
    for tag in (artifacts.DIGEST_TAG, artifacts.MANIFEST_TAG, artifacts.SIGNATURE_TAG):
        if tag in client.get_model_version(NAME, version).tags:
            client.delete_model_version_tag(NAME, version, tag)


def wait_for(check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)
    return result


def test_a_registry_outage_keeps_the_service_ready_and_says_since_when(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # An MLflow server restarting made every replica 503 in the same poll: all dropped by the
    # load balancer at once, although each could serve the alias's version.
    caplog.set_level(logging.INFO, logger="serving.model")
    version = register(store)
    mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", version)
    config = ServiceConfig(
        model_name=NAME, tracking_uri=store.uri, poll_interval_s=0.05, log_dir=str(tmp_path / "log")
    )
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as sock:  # a registry address where nobody answers
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with TestClient(create_app(config)) as service:
        wait_for(lambda: service.get("/ready").status_code == 200)

        mlflow.set_tracking_uri(dead)  # the follower's next polls cannot read the registry
        try:
            down = wait_for(
                lambda: (v := service.get("/version").json())["follower"]["registry_error"] and v
            )
            ready = service.get("/ready")
        finally:
            mlflow.set_tracking_uri(store.uri)
        wait_for(lambda: service.get("/version").json()["follower"]["registry_error"] is None)

    assert ready.status_code == 200, ready.json()
    assert ready.json() == {"ready": True, "model_version": version}
    assert down["model_version"] == version
    assert down["follower"]["registry_error"].startswith("registry unreachable since 20")
    assert down["follower"]["registry_error"].endswith(f"still serving v{version}")
    assert "registry unreachable since" in caplog.text  # said once in the log
    assert caplog.text.count("registry unreachable since") == 1
    assert "registry reachable again" in caplog.text


def test_deleting_the_hash_tags_does_not_downgrade_a_version_to_unverified(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(artifacts.DEFAULT_KEY_ENV, raising=False)  # no key: the old bypass
    version = register(store)
    strip_hash_tags(version)

    with pytest.raises(
        ModelIntegrityError,
        match=rf"{NAME} v{version} has no recorded "
        r"artifact hashes .*MLmodel carries artifact_sha256.*tags were removed; "
        rf"refused.*flows\.artifacts record models:/{NAME}/{version}",
    ):
        load_model(f"models:/{NAME}/{version}")


def test_a_refused_version_is_tried_again_once_its_hashes_are_recorded(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(artifacts.DEFAULT_KEY_ENV, raising=False)
    client = mlflow.MlflowClient()
    good = register(store)
    fixed = register(store, store.zeroed)
    strip_hash_tags(fixed)
    client.set_registered_model_alias(NAME, "champion", good)
    holder = ModelHolder()
    follower = RegistryFollower(holder, NAME, "champion", interval_s=0.05)
    assert follower.check_once() and holder.current.version == good

    client.set_registered_model_alias(NAME, "champion", fixed)
    assert not follower.check_once()
    assert fixed in follower.refused and follower.unready == follower.refused[fixed]
    assert not follower.check_once()  # the same tags: refused again without a download

    # the operator checks the files and records them
    assert artifacts_cli.main(["record", f"models:/{NAME}/{fixed}"]) == 0
    assert follower.check_once() and holder.current.version == fixed
    assert follower.refused == {} and follower.unready is None
    client.set_registered_model_alias(NAME, "champion", good)
