"""The pipeline flow: stage order, DVC output parsing, retries, summary, and end-to-end runs.

Real Prefect (the session's test harness), real DVC and git, real MLflow stores; no mocks.
The end-to-end tests (``slow``) run the whole pipeline twice: once through the flow, once
with ``dvc repro`` followed by a flow run that must execute no stage.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from prefect import flow

from flows.pipeline import (
    SUMMARY_KEY,
    describe_failure,
    order_stages,
    parse_stage_status,
    pipeline,
    read_stage_order,
    run_stage,
    where_to_look,
)
from flows.summary import NO_NEW_ROWS, read_reports, render_markdown, summarize_run
from stages.common.io import open_dataset
from tests.conftest import ROOT, TINY_PARAMS, deep_merge, dvc, make_pipeline_repo, write_params

STAGES = [
    "ingest",
    "validate",
    "features",
    "train",
    "ensemble",
    "evaluate",
    "export",
    "compress",
    "register",
]
OUTPUTS = [
    "data/raw",
    "data/validated",
    "data/quarantine",
    "data/features",
    "models",
    "ensemble",
    "compact",
    "reports/validation",
    "reports/eval",
    "reports/metrics.json",
    "reports/export.json",
    "reports/registration.json",
]

# --- stage order and DVC output ------------------------------------------------------------


def test_order_stages_puts_upstream_first_and_drops_dvc_files() -> None:
    dot = textwrap.dedent("""\
        strict digraph {
        "data/source.dvc";
        "register";
        "ingest";
        "train";
        "data/source.dvc" -> "ingest";
        "ingest" -> "train";
        "train" -> "register";
        }
        """)
    assert order_stages(dot, ["register", "train", "ingest"]) == ["ingest", "train", "register"]


def test_order_stages_rejects_a_cycle() -> None:
    dot = '"a" -> "b";\n"b" -> "a";\n'
    with pytest.raises(ValueError, match="cycle"):
        order_stages(dot, ["a", "b"])


@pytest.mark.slow
def test_read_stage_order_asks_dvc_for_the_project_graph(tmp_path: Path) -> None:
    repo = make_pipeline_repo(tmp_path / "repo")
    assert read_stage_order(repo) == STAGES


def test_parse_stage_status_reads_dvc_3_messages() -> None:
    assert parse_stage_status("train", ["Running stage 'train':", "> python -m ..."]) == "ran"
    assert (
        parse_stage_status(
            "train", ["Stage 'train' didn't change, skipping", "Data and pipelines are up to date."]
        )
        == "skipped"
    )
    cached = "Stage 'train' is cached - skipping run, checking out outputs"
    assert parse_stage_status("train", [cached]) == "restored from run cache"
    assert parse_stage_status("train", ["Running stage 'evaluate':"]) == "unknown"


def test_describe_failure_prefers_the_stage_message_over_dvc_noise() -> None:
    lines = [
        "Running stage 'validate':",
        "2026-01-01 10:00:00,000 INFO stages.validate.stage: checking data/raw",
        "2026-01-01 10:00:01,000 ERROR stages.common.cli: stage validate failed: validation failed",
        "data.parquet: column target failed expect_column_values_to_be_in_set",
        "ERROR: failed to reproduce 'validate': failed to run: python -m ..., exited with 1",
    ]
    assert describe_failure(lines) == (
        "validation failed\ndata.parquet: column target failed expect_column_values_to_be_in_set",
        True,
    )
    crash = [
        "Running stage 'train':",
        "Traceback (most recent call last):",
        "OSError: disk full",
        "ERROR: failed to reproduce 'train': exited with 1",
    ]
    message, deliberate = describe_failure(crash)
    assert not deliberate
    assert "OSError: disk full" in message and message.startswith("ERROR: failed to reproduce")


# --- retries: a crash is retried, a stage's refusal of bad input is not -----------------------

FLAKY = """\
from pathlib import Path
attempts = Path("flaky.attempts")
attempts.write_text(str(int(attempts.read_text()) + 1 if attempts.exists() else 1))
if attempts.read_text() == "1":
    raise OSError("the disk hiccupped")
Path("flaky.txt").write_text("ok")
"""
REFUSES = """\
from pathlib import Path
from stages.common.cli import build_parser, run_main
from stages.common.errors import DataError
attempts = Path("refuses.attempts")
attempts.write_text(str(int(attempts.read_text()) + 1 if attempts.exists() else 1))
def body(args, params):
    raise DataError("label 7 is not allowed", file="x.csv", column="target", rule="labels")
raise SystemExit(run_main("refuses", build_parser("refuses", "test"), body, []))
"""


@flow
def _run_one_stage(stage: str, repo: str) -> str:
    return run_stage.with_options(retries=2, retry_delay_seconds=0)(stage, repo)


@pytest.mark.slow
def test_run_stage_retries_crashes_but_not_refusals(
    prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the refusing stage uses the real stage CLI
    (tmp_path / "flaky.py").write_text(FLAKY)
    (tmp_path / "refuses.py").write_text(REFUSES)
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    stages = {
        "flaky": {"cmd": "python flaky.py", "outs": ["flaky.txt"]},
        "refuses": {"cmd": "python refuses.py", "outs": ["refuses.txt"]},
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    dvc(tmp_path, "init", "--no-scm", "-q")

    assert _run_one_stage("flaky", str(tmp_path)) == "ran"
    assert (tmp_path / "flaky.attempts").read_text() == "2"

    state = _run_one_stage("refuses", str(tmp_path), return_state=True)
    assert state.is_failed()
    assert "stage refuses failed: label 7 is not allowed" in state.message
    assert "column=target" in state.message
    assert (tmp_path / "refuses.attempts").read_text() == "1"


# --- the summary ---------------------------------------------------------------------------

METRICS = {"accuracy": 0.97368, "f1_macro": 0.9717, "roc_auc_macro": 0.9954, "log_loss": 0.0812}
REGISTRATION = {
    "model_name": "classifier",
    "version": "3",
    "run_id": "abc",
    "decision": "challenger",
    "reason": "f1_macro 0.9717 < champion 0.9800",
    "metrics": METRICS,
    "champion_metrics": {"f1_macro": 0.98},
    "previous_champion_version": "2",
}
RUN = {"run_id": "abc", "experiment_id": "1"}


def test_summary_markdown_shows_stages_metrics_decision_and_link() -> None:
    statuses = dict.fromkeys(STAGES, "ran") | {"ingest": "skipped"}
    reports = {"metrics": METRICS, "registration": REGISTRATION, "run": RUN}
    summary = summarize_run(STAGES, statuses, reports, "http://127.0.0.1:5000", "fr-1")
    assert summary["status"] == "completed"
    assert summary["model"]["version"] == "3" and summary["model"]["decision"] == "challenger"
    assert summary["mlflow_run_url"] == "http://127.0.0.1:5000/#/experiments/1/runs/abc"

    markdown = render_markdown(summary)
    assert "| ingest | skipped |" in markdown and "| register | ran |" in markdown
    assert "| accuracy | 0.9737 |" in markdown
    assert "`classifier` version **3**" in markdown
    assert "**challenger**: f1_macro 0.9717 < champion 0.9800" in markdown
    assert "Previous champion: version 2" in markdown
    assert "(http://127.0.0.1:5000/#/experiments/1/runs/abc)" in markdown


def test_summary_of_a_failed_run_ignores_reports_of_stages_that_did_not_finish(
    tmp_path: Path,
) -> None:
    for path, content in [
        ("reports/metrics.json", METRICS),
        ("models/run.json", RUN),
        ("reports/registration.json", REGISTRATION),
    ]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(json.dumps(content))  # left by an earlier run
    statuses = {"ingest": "ran", "validate": "failed"}
    reports = read_reports(tmp_path, statuses)
    assert reports == {"metrics": None, "registration": None, "run": None}

    summary = summarize_run(
        STAGES,
        statuses,
        reports,
        "http://127.0.0.1:5000",
        error="stage validate failed: bad label [column=target]",
    )
    markdown = render_markdown(summary)
    assert summary["status"] == "failed" and summary["stages"]["train"] == "not run"
    assert "stage validate failed: bad label [column=target]" in markdown
    assert "| validate | failed |" in markdown and "| register | not run |" in markdown
    assert "0.9737" not in markdown and "version **3**" not in markdown


# --- end to end ----------------------------------------------------------------------------


def _mlflow_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _read_summary_artifact(flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[SUMMARY_KEY]))
        )
    mine = [a for a in artifacts if str(a.flow_run_id) == flow_run_id]
    assert mine, f"no {SUMMARY_KEY} artifact for flow run {flow_run_id}"
    return mine[0].data


@pytest.mark.slow
def test_flow_runs_every_stage_then_dvc_has_nothing_to_do(
    prefect_api: str, pipeline_repo: Path, mlflow_uri: str
) -> None:
    reason = "feature drift (as the monitor's retraining event would say)"
    state = pipeline(repo=str(pipeline_repo), reason=reason, return_state=True)

    assert state.is_completed(), state.message
    summary = state.result()
    flow_run_id = str(state.state_details.flow_run_id)
    assert summary["stages"] == dict.fromkeys(STAGES, "ran")
    # DVC agrees: nothing left to reproduce, and the data versions reached the remote.
    # (ingest always asks its source again, so DVC lists it as always changed)
    assert json.loads(dvc(pipeline_repo, "status", "--json").stdout) == {
        "ingest": ["always changed"]
    }
    assert any(p.is_file() for p in (pipeline_repo / ".dvcstore").rglob("*"))
    assert "in sync" in dvc(pipeline_repo, "status", "--cloud").stdout
    # MLflow: a champion, trained in a run tagged with this flow run.
    client = _mlflow_client(mlflow_uri)
    champion = client.get_model_version_by_alias("classifier", "champion")
    tags = client.get_run(champion.run_id).data.tags
    assert tags["prefect.flow_run_id"] == flow_run_id and tags["pipeline.reason"] == reason
    assert summary["model"]["version"] == champion.version
    assert summary["model"]["decision"] == "promoted"
    # The summary artifact tells the same story.
    markdown = _read_summary_artifact(flow_run_id)
    assert "| register | ran |" in markdown and f"version **{champion.version}**" in markdown
    assert f"Triggered by: {reason}" in markdown
    assert f"/runs/{champion.run_id})" in markdown


@pytest.fixture(scope="module")
def reproduced_repo(tmp_path_factory: pytest.TempPathFactory):
    """A pipeline repo after a plain ``dvc repro`` (no Prefect), with its own MLflow store."""
    root = tmp_path_factory.mktemp("reproduced")
    (root / "mlflow").mkdir()
    uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        repo = make_pipeline_repo(root / "repo")
        dvc(repo, "repro")
        yield repo, uri


def _mtimes(repo: Path) -> dict[str, int]:
    files = [p for out in OUTPUTS for p in [repo / out, *(repo / out).rglob("*")] if p.is_file()]
    return {str(p.relative_to(repo)): p.stat().st_mtime_ns for p in files}


@pytest.mark.stack  # out of make test's 20 minutes (issue 14); .ci/run runs it
@pytest.mark.slow
def test_flow_after_dvc_repro_runs_no_stage(prefect_api: str, reproduced_repo) -> None:
    repo, uri = reproduced_repo
    client = _mlflow_client(uri)
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    runs_before = len(client.search_runs(experiment_ids))
    mtimes_before = _mtimes(repo)

    state = pipeline(repo=str(repo), return_state=True)

    assert state.is_completed(), state.message
    summary = state.result()
    # ingest always asks the source again; the same rows leave data/raw untouched
    assert summary["stages"] == dict.fromkeys(STAGES, "skipped") | {"ingest": "ran"}
    assert len(client.search_runs(experiment_ids)) == runs_before
    assert _mtimes(repo) == mtimes_before
    # the run's page is written; a run that changed nothing logs no page run to MLflow
    assert summary["page"] == {"path": str(repo / "reports/index.html"), "mlflow_url": None}
    # Nothing ran, yet the summary reports the current model and metrics.
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert summary["metrics"] == metrics
    assert (
        summary["model"]["version"]
        == client.get_model_version_by_alias("classifier", "champion").version
    )


@pytest.mark.slow
def test_bad_label_fails_the_flow_at_validate_and_changes_nothing(
    prefect_api: str, reproduced
) -> None:
    repo, uri = reproduced.repo, reproduced.uri  # a private copy of the session's dvc repro
    bad = open_dataset(repo / "data/raw").to_table().to_pandas()
    bad.loc[bad.index[:10], "target"] = 7  # not a label (0, 1); more rows than may be quarantined
    bad.to_csv(repo / "data/source/bad.csv", index=False)
    write_params(repo, deep_merge(TINY_PARAMS, {"ingest": {"source": "data/source/bad.csv"}}))
    client = _mlflow_client(uri)
    champion_before = client.get_model_version_by_alias("classifier", "champion").version
    validated_before = (repo / "data/validated/data.parquet").read_bytes()

    state = pipeline(repo=str(repo), return_state=True)

    assert state.is_failed()
    assert "stage validate failed" in state.message
    assert "column=target" in state.message and "rule=label" in state.message
    assert client.get_model_version_by_alias("classifier", "champion").version == champion_before
    assert (repo / "data/validated/data.parquet").read_bytes() == validated_before
    markdown = _read_summary_artifact(str(state.state_details.flow_run_id))
    assert "| ingest | ran |" in markdown and "| validate | failed |" in markdown
    assert "| train | not run |" in markdown and "stage validate failed" in markdown


@pytest.mark.slow
@pytest.mark.stack
def test_incremental_run_without_new_rows_skips_training_and_says_so(
    prefect_api: str, tmp_path: Path, mlflow_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame.columns = [str(c).replace(" ", "_") for c in frame.columns]
    frame.insert(0, "row_id", range(len(frame)))  # the watermark: an increasing id
    repo = make_pipeline_repo(
        tmp_path / "repo",
        {
            "ingest": {"source": "data/source/rows.csv", "watermark": "row_id"},
            "validate": {"suite_path": "suites/rows.json"},
            "features": {"drop_columns": ["row_id"]},
        },
    )
    frame.iloc[:400].to_csv(repo / "data/source/rows.csv", index=False)
    for args in (
        ["stages.ingest", "--out", "data/raw"],  # the README's steps for own data
        ["stages.validate", "suite", "--snapshot", "data/raw", "--out", "suites/rows.json"],
    ):
        subprocess.run([sys.executable, "-m", *args], cwd=repo, check=True, capture_output=True)
    assert pipeline(repo=str(repo), return_state=True).is_completed()
    frame.to_csv(repo / "data/source/rows.csv", index=False)  # 169 newer rows arrive
    second = pipeline(repo=str(repo), return_state=True)
    assert second.is_completed(), second.message
    assert second.result()["stages"]["train"] == "ran"
    assert json.loads((repo / "data/raw/manifest.json").read_text())["rows"] == len(frame)
    client = _mlflow_client(mlflow_uri)
    runs = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))

    third = pipeline(repo=str(repo), return_state=True)  # nothing new in the source

    assert third.is_completed(), third.message
    assert third.result()["stages"] == {"ingest": "ran"} | dict.fromkeys(STAGES[1:], NO_NEW_ROWS)
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == runs
    assert "no new rows since the last run" in caplog.text


@pytest.mark.parametrize(
    ("register", "said"),
    [
        ("ran", "classifier version 3: promoted (better)"),
        (
            "skipped",
            "classifier version 3: unchanged, nothing registered in this run; recorded "
            "earlier: promoted (better)",
        ),
    ],
)
def test_the_summary_says_when_the_model_is_from_an_earlier_run(register: str, said: str) -> None:
    # A run that skipped register must not read like a fresh promotion.
    model = {"model_name": "classifier", "version": 3, "decision": "promoted", "reason": "better"}
    summary = {"stages": {"ingest": "ran", "register": register}, "model": model}

    assert f"  Model:      {said}" in where_to_look(ROOT, summary)
