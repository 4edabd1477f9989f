"""``make page``: write ``reports/index.html`` (``pages``) from the files the last run left, and
log it to MLflow (experiment ``pages``, one run per page written) so the run summary can link it.

This module gathers what ``pages`` cannot know by itself (``pages`` imports none of our code):
where the reports are, the stage results (the flow's, or ``dvc status`` for ``make page``), the
champion's evaluation files from its MLflow training run, and the monitor's thresholds from
``params.yaml``. The pipeline flow calls ``publish_page`` at the end of each run, failed or not.

Run it from the project root::

    python -m flows.page [--repo PATH] [--out reports/index.html] [--no-mlflow]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flows.mlflow_store import experiment_id, store_uri
from flows.pipeline import INGEST, _dvc_yaml_stages, changed_stages
from flows.summary import FINISHED, RAN, RESTORED, mlflow_ui_url
from pages.index import ModelFiles, Other, PageInputs, RunStatus, write_page
from stages.common.config import Params, load_params
from stages.common.errors import PipelineError
from stages.common.tracking import apply_http_limits, run_url

PAGE = "reports/index.html"
EXPERIMENT = "pages"  # one MLflow run per page written; its artifact is the page
# Where the stages write (dvc.yaml outs) and the monitor appends (flows/monitor.py).
FILES = {
    "registration": "reports/registration.json",
    "metrics": "reports/metrics.json",
    "confusion": "reports/eval/confusion.json",
    "roc": "reports/eval/roc.json",
    "pr": "reports/eval/pr.json",
    "history": "reports/train/history.csv",
    "validation_summary": "reports/validation/summary.json",
    "validation_result": "reports/validation/result.json",
    "quarantine_summary": "data/quarantine/summary.json",
    "quarantine_rows": "data/quarantine/rows.parquet",
    "monitor_history": "reports/monitor/history.jsonl",
}
# The same files in the train stage's MLflow run (evaluate logs eval/, train its history).
RUN_ARTIFACTS = {
    "metrics": "eval/metrics.json",
    "confusion": "eval/confusion.json",
    "roc": "eval/roc.json",
    "pr": "eval/pr.json",
    "history": "train/history.csv",
}
LINKS = {  # the other reports, linked from the page when they exist
    "Data Docs": "reports/validation/docs/index.html",
    "DVC plots": "reports/plots/index.html",
}
# The stage that writes each file: a flow run shows only the files of stages that finished in
# it, so a failed run never shows an earlier run's results as its own (as flows.summary).
WRITER = {
    "registration": "register",
    "metrics": "evaluate",
    "confusion": "evaluate",
    "roc": "evaluate",
    "pr": "evaluate",
    "history": "train",
    "validation_summary": "validate",
    "validation_result": "validate",
    "quarantine_summary": "validate",
    "quarantine_rows": "validate",
}
PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
THRESHOLDS = ("drift_share", "psi_threshold", "max_bad_row_share")
logger = logging.getLogger(__name__)


def page_inputs(
    repo: Path,
    params: Params | None,
    run: RunStatus | None,
    other: Other | None,
    finished: set[str] | None = None,
) -> PageInputs:
    """What the page shows: the files under ``repo``, the run, the model set beside ours.

    ``finished``: the stages that finished in the run shown; the files of the others are left
    out (None: every file, as ``make page`` shows the workspace).
    """
    path: dict[str, Path | None] = {
        name: None if finished is not None and WRITER.get(name, "") not in finished else repo / rel
        for name, rel in FILES.items()
    }
    monitor = params.monitor if params else None
    return PageInputs(
        root=repo,
        registration=path["registration"],
        model=ModelFiles(**{name: path[name] for name in RUN_ARTIFACTS}),
        validation_summary=path["validation_summary"],
        validation_result=path["validation_result"],
        quarantine_summary=path["quarantine_summary"],
        quarantine_rows=path["quarantine_rows"],
        monitor_history=path["monitor_history"],
        run=run,
        other=other,
        compare_metric=params.register.compare_metric if params else None,
        thresholds={name: getattr(monitor, name) for name in THRESHOLDS} if monitor else {},
        links={name: repo / rel for name, rel in LINKS.items()},
        generated_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        title=f"{params.register.model_name}: pipeline report" if params else "Pipeline report",
    )


def run_from_summary(summary: dict[str, Any]) -> tuple[RunStatus, set[str]]:
    """The stage results of a flow run (``flows.summary.summarize_run`` output), and the
    stages that finished in it."""
    flow_run = summary.get("flow_run_id")
    stages = dict(summary.get("stages") or {})
    finished = {stage for stage, result in stages.items() if result in FINISHED}
    return RunStatus(
        stages=stages,
        source=f"Prefect flow run {flow_run}" if flow_run else "the pipeline command",
        failed=summary.get("status") == "failed",
        error=summary.get("error"),
    ), finished


def run_from_dvc(repo: Path) -> RunStatus | None:
    """The stages as ``dvc status`` finds them now: up to date, or changed since they ran."""

    stages = _dvc_yaml_stages(repo)
    changed = changed_stages(repo)
    if not stages or changed is None:
        return None
    return RunStatus(
        stages={s: "changed" if s in changed else "up to date" for s in stages},
        source="dvc status when the page was written (make page): no flow run recorded here",
    )


def other_model(
    params: Params, registration: dict[str, Any] | None, uri: str, dest: Path
) -> Other | None:
    """The model set beside this run's: the champion, or the one a promoted model replaced,
    with its evaluation files downloaded from its MLflow run (store ``uri``) into ``dest``."""
    import mlflow

    name = params.register.model_name
    client = mlflow.MlflowClient(uri)
    promoted = (registration or {}).get("decision") == "promoted"
    version = (registration or {}).get("previous_champion_version")
    try:
        if registration is None:  # no registration this run: the registry's champion
            version = client.get_model_version_by_alias(name, params.register.alias).version
        if version is None:
            return None
        mv = client.get_model_version(name, str(version))
    except mlflow.exceptions.MlflowException as exc:
        logger.info("no champion to compare with: %s", exc)
        return None
    role = "previous champion" if promoted else "champion"
    if not mv.run_id:
        return Other(str(version), role, None, f"v{version} has no MLflow run: no plots of it")
    files = {}
    for key, artifact in RUN_ARTIFACTS.items():  # a copy each: local files, or a server's
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=mv.run_id,
                artifact_path=artifact,
                dst_path=str(dest / key),
                tracking_uri=uri,
            )
            files[key] = Path(local)
        except (mlflow.exceptions.MlflowException, OSError):
            files[key] = None
    note = "" if any(files.values()) else f"v{version}'s run {mv.run_id} holds no evaluation files"
    return Other(str(version), role, ModelFiles(**files), note)


def log_page(repo: Path, page: Path, uri: str, tags: dict[str, str]) -> str:
    """Log ``page`` as the artifact of a new run in experiment ``pages`` of the store at
    ``uri``; returns the run's MLflow UI link.

    The client API, not ``mlflow.start_run``: no active experiment or run is left set in this
    process (the flow's, or a test's) nor ``MLFLOW_EXPERIMENT_ID`` in its environment.
    """
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = experiment_id(client, EXPERIMENT, uri)
    run = client.create_run(experiment, tags=tags, run_name=page.name)
    try:
        client.log_artifact(run.info.run_id, str(page))
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id)
    return run_url(mlflow_ui_url(repo), experiment, run.info.run_id)


def make_page(
    repo: Path,
    run: RunStatus | None,
    finished: set[str] | None = None,
    out: Path | None = None,
    log: bool = True,
) -> dict[str, Any]:
    """Write the page (and log it to MLflow unless ``log`` is False); see ``page_inputs``.

    Returns:
        ``{"path": the page, "mlflow_url": its MLflow run or None}``.
    """
    repo = Path(repo).resolve()
    out = out or repo / PAGE
    try:
        params: Params | None = load_params(repo / "params.yaml")
    except PipelineError as exc:
        logger.warning("the page goes without params.yaml's settings: %s", exc)
        params = None
    registration = _read_json(repo / FILES["registration"])
    if finished is not None and "register" not in finished:
        registration = None
    if params is None:
        write_page(page_inputs(repo, params, run, None, finished), out)
        return {"path": str(out), "mlflow_url": None}
    url = None
    with _mlflow_store(repo, params) as uri, tempfile.TemporaryDirectory(prefix="page-") as tmp:
        other = other_model(params, registration, uri, Path(tmp))
        write_page(page_inputs(repo, params, run, other, finished), out)
        if log:
            shown = out.relative_to(repo).as_posix() if out.is_relative_to(repo) else str(out)
            tags = {"page.path": shown}
            if registration:
                tags["model.version"] = str(registration.get("version"))
            url = log_page(repo, out, uri, tags)
    return {"path": str(out), "mlflow_url": url}


@contextmanager
def _mlflow_store(repo: Path, params: Params) -> Iterator[str]:
    """The project's MLflow store URI, MLflow's progress bars off meanwhile (one per
    download: noise in the log). A relative ``sqlite:///`` store is taken from ``repo`` (the
    stages run there; the flow process may not)."""
    uri = store_uri(repo, params.mlflow)
    saved = os.environ.get(PROGRESS_BAR_ENV)
    os.environ[PROGRESS_BAR_ENV] = "false"
    try:
        apply_http_limits(params.mlflow)
        yield uri
    finally:
        if saved is None:
            os.environ.pop(PROGRESS_BAR_ENV, None)
        else:
            os.environ[PROGRESS_BAR_ENV] = saved


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def changed_anything(summary: dict[str, Any]) -> bool:
    """Whether a flow run failed or ran a stage besides ingest (which always runs): only then
    is its page logged to MLflow, so a run that changed nothing adds no run to the store."""
    stages = summary.get("stages") or {}
    ran = any(result in (RAN, RESTORED) for stage, result in stages.items() if stage != INGEST)
    return ran or summary.get("status") == "failed"


def publish_page(repo: Path, summary: dict[str, Any]) -> dict[str, Any] | None:
    """The pipeline flow's call at the end of a run, failed or not: write the page, and log
    it to MLflow when the run changed anything (``changed_anything``).

    Never raises: a page that cannot be written is logged, and the run's own result stands.
    """
    try:
        run, finished = run_from_summary(summary)
        return make_page(Path(repo), run, finished, log=changed_anything(summary))
    except Exception:  # the page is a report: it must not fail (or hide the error of) a run
        logger.exception("could not write or log %s", PAGE)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Write the page; print where it is and its MLflow run. Exit 1 when it cannot be written."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.page",
        description="Write reports/index.html: the stages, champion vs challenger, the data "
        "gate, the quarantine, training curves and drift over time, on one offline page; and "
        "log it to MLflow (experiment pages).",
    )
    parser.add_argument("--repo", default=".", help="project checkout holding params.yaml")
    parser.add_argument("--out", default=None, help=f"where to write the page (default {PAGE})")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log it to MLflow")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    repo = Path(args.repo).resolve()
    try:
        out = Path(args.out).resolve() if args.out else None
        result = make_page(repo, run_from_dvc(repo), out=out, log=not args.no_mlflow)
    except (PipelineError, OSError) as exc:
        logger.error("page not written: %s", exc)
        return 1
    print(f"Page:   {result['path']}")  # noqa: T201 - the command's answer
    if result["mlflow_url"]:
        print(f"MLflow: {result['mlflow_url']} (make ui)")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
