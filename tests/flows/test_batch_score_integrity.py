"""The batch-scoring flow refuses a champion whose stored files were replaced (issue 10, item 6),
without retrying the refusal, and runs none of the crafted pickle (tests/serving/
test_artifact_integrity.py builds the registry and the tampering)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from tests.serving.conftest import Store, store  # noqa: F401 - store: the session's store
from tests.serving.test_artifact_integrity import (
    KEY_ENV,
    NAME,
    crafted_pickle,
    register_version,
    stored,
    tamper,
)


@pytest.mark.slow
def test_the_batch_flow_refuses_a_tampered_champion_without_retrying(
    prefect_api: str,
    store: Store,
    tmp_path: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.batch_score import batch_score

    monkeypatch.delenv(KEY_ENV, raising=False)
    version = register_version(store)
    mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", version)
    marker = tmp_path / "pwned"
    tamper(stored(version, "artifacts/model.pt"), crafted_pickle(marker))
    (tmp_path / "in").mkdir()
    store.rows.head(5).to_parquet(tmp_path / "in" / "x.parquet")
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"register": {"model_name": NAME}}))

    state = batch_score(
        str(tmp_path / "in"), str(tmp_path / "out"), params_path=str(params), return_state=True
    )

    assert state.is_failed()
    assert f"{NAME} v{version}: artifact files differ" in state.message
    assert "model/artifacts/model.pt expected sha256" in state.message
    assert not (tmp_path / "out").exists() and not marker.exists()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )
    loads = [run for run in runs if run.name.startswith("load-model")]
    assert [run.run_count for run in loads] == [1]  # a refusal is not retried
