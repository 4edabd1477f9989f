"""``make run`` before Prefect starts: nothing changed means no flow run; a persistent local
Prefect API is used when one answers.

Real processes (``python -m flows.pipeline``), real DVC, MLflow and a real Prefect server (the
session's test harness, found by its port as ``make prefect``'s server would be); no mocks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from flows.pipeline import PUSHED, SUMMARY_KEY, note_push, pushed_already
from tests.conftest import TINY_PARAMS, Reproduced, deep_merge, dvc, write_params

PY = sys.executable
TEMPORARY_SERVER = "Starting temporary server"  # Prefect's words when it starts its own


def _make_run(repo: Path, api_url: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m flows.pipeline`` with PREFECT_API_URL unset, as ``make run`` runs it, told
    the port of the harness's server (``--prefect-port``, 4200 for ``make prefect``)."""
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    port = str(urlsplit(api_url).port)
    return subprocess.run(
        [PY, "-m", "flows.pipeline", "--repo", str(repo), "--prefect-port", port, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _flow_runs() -> dict[str, object]:
    """The harness server's flow runs by id (this session's flow tests add theirs too)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {str(run.id): run for run in client.read_flow_runs()}


def _task_runs(flow_run_id: str) -> list[object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


def _summary_markdown(flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[SUMMARY_KEY]))
        )
    mine = [a for a in artifacts if str(a.flow_run_id) == flow_run_id]
    assert mine, f"no {SUMMARY_KEY} artifact for flow run {flow_run_id}"
    return mine[0].data


def _ingest_runs(output: str) -> set[str]:
    # ingest's own log line, with its own timestamp: replayed in the flow's log, still one run
    return {
        line[line.index("stages.ingest.stage: ingested") - 24 :]
        for line in output.splitlines()
        if "stages.ingest.stage: ingested" in line
    }


def _mtimes(repo: Path) -> dict[str, int]:
    outs = ("data", "models", "reports")
    return {str(p): p.stat().st_mtime_ns for out in outs for p in (repo / out).rglob("*")}


@pytest.mark.stack  # out of make test's 20 minutes (issue 14); .ci/run runs it
@pytest.mark.slow
def test_make_run_uses_the_local_prefect_server_then_starts_no_flow_when_nothing_changed(
    prefect_api: str, reproduced: Reproduced
) -> None:
    repo = reproduced.repo
    # One changed param: register runs; ingest, run before Prefect, is recorded, not rerun.
    write_params(repo, deep_merge(TINY_PARAMS, {"register": {"max_latency_ms": 300}}))
    runs_before = set(_flow_runs())

    first = _make_run(repo, prefect_api)

    output = first.stdout + first.stderr
    assert first.returncode == 0, output[-3000:]
    assert f"Prefect API: the local server at {prefect_api}" in output
    assert TEMPORARY_SERVER not in output
    assert len(_ingest_runs(output)) == 1, output
    (flow_run_id,) = set(_flow_runs()) - runs_before  # recorded on the persistent server
    tasks = {run.name.rsplit("-", 1)[0]: run for run in _task_runs(flow_run_id)}
    assert tasks["ingest"].state.is_completed() and tasks["register"].state.is_completed()
    markdown = _summary_markdown(flow_run_id)
    assert "| ingest | ran |" in markdown and "| register | ran |" in markdown
    assert "| train | skipped |" in markdown
    assert (repo / PUSHED).is_file()  # the flow's push is noted
    assert "in sync" in dvc(repo, "status", "--cloud").stdout

    # Nothing changed since: ingest runs, dvc status says up to date, no Prefect at all.
    mtimes = _mtimes(repo)
    runs_before = set(_flow_runs())

    second = _make_run(repo, prefect_api)

    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-3000:]
    assert "Nothing changed: ingest ran" in second.stdout and "no Prefect flow run" in output
    assert "Pipeline completed: 1 ran, " in second.stdout and "Model:      classifier" in output
    assert "Prefect API" not in output and TEMPORARY_SERVER not in output
    assert len(_ingest_runs(output)) == 1
    assert set(_flow_runs()) == runs_before
    assert {k: v for k, v in _mtimes(repo).items() if "data/raw" not in k} == {
        k: v for k, v in mtimes.items() if "data/raw" not in k
    }

    # --always-flow: a flow run anyway, ingest inside it.
    third = _make_run(repo, prefect_api, "--always-flow")

    output = third.stdout + third.stderr
    assert third.returncode == 0, output[-3000:]
    assert "ran before the flow started" not in output
    (flow_run_id,) = set(_flow_runs()) - runs_before
    assert "| ingest | ran |" in _summary_markdown(flow_run_id)


@pytest.mark.slow
def test_an_ingest_refusal_before_prefect_fails_the_flow_run_without_retrying(
    prefect_api: str, reproduced: Reproduced
) -> None:
    repo = reproduced.repo
    write_params(repo, deep_merge(TINY_PARAMS, {"ingest": {"source": "data/source/gone.csv"}}))
    runs_before = set(_flow_runs())

    run = _make_run(repo, prefect_api)

    output = run.stdout + run.stderr
    assert run.returncode == 1, output[-3000:]
    assert "Pipeline failed: stage ingest failed" in run.stderr
    assert output.count("> python -m stages.ingest") == 2  # run once, replayed in the flow log
    (flow_run_id,) = set(_flow_runs()) - runs_before
    assert _flow_runs()[flow_run_id].state.is_failed()
    markdown = _summary_markdown(flow_run_id)
    assert "| ingest | failed |" in markdown and "gone.csv" in markdown


def test_a_push_is_noted_for_this_dvc_lock_and_remote(tmp_path: Path) -> None:
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("[core]\n    remote = local\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    assert not pushed_already(tmp_path)

    note_push(tmp_path)

    assert pushed_already(tmp_path)
    assert json.loads((tmp_path / PUSHED).read_text())["dvc.lock"]
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # a stage ran since
    assert not pushed_already(tmp_path)
    note_push(tmp_path)
    (tmp_path / ".dvc" / "config.local").write_text("[remote]\n")  # another remote
    assert not pushed_already(tmp_path)
