"""The monitor -> retraining wiring: the pipeline's deployment (``make schedule``'s, built by
``flows.schedule.pipeline_deployment``) carries ``flows.events.retrain_trigger``; a retraining
event for its model makes the real Prefect server (the test harness runs its triggers and
actions services) create one flow run of it whose ``reason`` parameter is the event's reason,
and an event for another model creates none.

Nothing executes the run (no runner serves the deployment here): the whole pipeline run is
``tests/flows/test_pipeline.py``'s; that the reason reaches the summary and the stages is
checked below without Prefect.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from pathlib import Path

from flows.events import emit_retrain
from flows.pipeline import stage_env
from flows.schedule import pipeline_deployment
from flows.summary import render_markdown, summarize_run
from stages.common.config import load_params
from stages.common.tracking import REASON_ENV, REASON_TAG, lineage_tags
from tests.conftest import ROOT

TRIGGER_TIMEOUT_S = 60  # the server's triggers service reads the event stream as it comes


def _params(deployment: str, model_name: str):
    params = load_params(ROOT / "params.yaml")
    return dataclasses.replace(
        params,
        schedule=params.schedule.model_copy(update={"deployment": deployment}),
        register=params.register.model_copy(update={"model_name": model_name}),
    )


def _runs_of(client, deployment_id) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    )


def test_a_retrain_event_runs_the_pipeline_deployment_with_its_reason(
    prefect_api: str, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client

    suffix = uuid.uuid4().hex[:8]  # the harness is shared by the session's tests
    model, other = f"retrain-{suffix}", f"other-{suffix}"
    deployment = pipeline_deployment(tmp_path, _params(f"retrain-{suffix}", model))
    deployment_id = deployment.apply()
    reason = "drift: 4 of 6 features drifted (share 0.67 > 0.3): mean radius, mean texture, ..."
    runs: list = []
    with get_client(sync_client=True) as client:
        try:
            [automation] = client.read_resource_related_automations(
                f"prefect.deployment.{deployment_id}"
            )
            assert automation.enabled

            emit_retrain(other, "another model drifted", {"drift_share": 1.0})  # ignored
            emit_retrain(model, reason, {"drift_share": 0.67, "model_version": "3"})

            deadline = time.monotonic() + TRIGGER_TIMEOUT_S
            while not (runs := _runs_of(client, deployment_id)):
                assert time.monotonic() < deadline, "the retrain event started no flow run"
                time.sleep(0.5)
            time.sleep(2)  # a second run (from the other model's event) would show by now
            [run] = _runs_of(client, deployment_id)
            assert run.parameters["reason"] == reason
            # the deployment's own parameters stay: the checkout, the bounded wait for the lock
            assert run.parameters["repo"] == str(tmp_path)
            assert run.state.is_scheduled()  # for the runner of `make schedule` to pick up
        finally:
            for run in runs:
                client.delete_flow_run(run.id)
            client.delete_deployment(deployment_id)


def test_the_reason_reaches_the_summary_and_the_stages_mlflow_tags(
    tmp_path: Path, monkeypatch
) -> None:
    reason = "PSI 0.31 of the predicted probabilities > 0.2 | and a pipe"
    summary = summarize_run(["ingest"], {"ingest": "ran"}, {}, "http://x", reason=reason)
    markdown = render_markdown(summary)
    assert "Triggered by: PSI 0.31 of the predicted probabilities > 0.2 \\| and a pipe" in markdown
    assert "Triggered by" not in render_markdown(summarize_run([], {}, {}, "http://x"))

    env = stage_env("flow-1", reason)
    assert env[REASON_ENV] == reason
    monkeypatch.setenv(REASON_ENV, "stale, from the shell")
    assert REASON_ENV not in stage_env("flow-2")  # never inherited by a run without one

    monkeypatch.setenv(REASON_ENV, reason)
    assert lineage_tags(tmp_path)[REASON_TAG] == reason
