"""The Prefect side of ``flows.pipeline``: the ``pipeline`` flow, its tasks and the summary.

Kept apart from the command (``python -m flows.pipeline``, ``flows/pipeline.py``) so that the
command decides "nothing changed" without importing Prefect (about 2.5 s). ``flows.pipeline``
re-exports these names (``from flows.pipeline import pipeline`` imports this module).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as current_flow_run

from flows.page import publish_page
from flows.pipeline import (
    INGEST,
    OUTPUT_TAIL,
    RETRIES,
    RETRY_DELAY_S,
    SUMMARY_KEY,
    StageFailedError,
    command_line,
    describe_failure,
    log_lines,
    note_push,
    only_ingest_changed,
    parse_stage_status,
    prefect_servers,
    preflight,
    read_manifest,
    read_stage_order,
    run_dvc,
    stage_env,
)
from flows.summary import (
    FAILED,
    NO_NEW_ROWS,
    mlflow_ui_url,
    read_reports,
    render_markdown,
    summarize_run,
)
from stages.common import integrity, runlock
from stages.common.config import load_params
from stages.common.errors import PipelineError

_watched_servers: set[int] = set()  # the servers a watcher already stops with this process


def _retry_unless_deliberate(task: Any, task_run: Any, state: Any) -> bool:
    # Retry crashes (I/O, a locked store); a stage refusing bad input would only fail again.
    return not (isinstance(state.data, StageFailedError) and state.data.deliberate)


@task(cache_policy=NO_CACHE, retry_condition_fn=_retry_unless_deliberate)
def run_stage(
    stage: str, repo: str, flow_run_id: str | None = None, reason: str | None = None
) -> str:
    """Run one DVC stage with ``dvc repro --single-item``; DVC skips it if nothing changed.

    Returns:
        ``ran``, ``skipped`` or ``restored from run cache``.

    Raises:
        StageFailedError: the stage exited non-zero; the message is the stage's own.
    """
    logger = get_run_logger()
    code, lines = run_dvc(
        ["repro", "--single-item", stage], Path(repo), stage_env(flow_run_id, reason), logger
    )
    if code != 0:
        message, deliberate = describe_failure(lines)
        raise StageFailedError(stage, message, deliberate=deliberate)
    status = parse_stage_status(stage, lines)
    logger.info("stage %s: %s", stage, status)
    return status


@task(cache_policy=NO_CACHE)
def record_stage(prerun: dict[str, Any]) -> str:
    """The stage ``python -m flows.pipeline`` ran before this flow started (ingest, to see
    whether anything changed): its DVC output goes to this task's log, its result is the
    task's result, so the run shows the stage once, as it happened.

    Raises:
        StageFailedError: the stage refused its input or config (not retried).
    """
    logger = get_run_logger()
    stage = prerun["stage"]
    logger.info("stage %s ran before the flow started (`make run` checks for changes first)", stage)
    log_lines(prerun["output"], logger)
    if prerun["code"] != 0:
        message, deliberate = describe_failure(prerun["output"])
        raise StageFailedError(stage, message, deliberate=deliberate)
    status = parse_stage_status(stage, prerun["output"])
    logger.info("stage %s: %s", stage, status)
    return status


def _retry_unless_refused(task: Any, task_run: Any, state: Any) -> bool:
    # A refused push (a corrupt cache object) would only be refused again.
    return not isinstance(state.data, PipelineError)


@task(
    name="dvc-push",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=RETRY_DELAY_S,
    retry_condition_fn=_retry_unless_refused,
)
def push_data(repo: str, remote: str | None = None) -> None:
    """Push this run's data versions to the DVC remote named ``remote`` (None: the default).

    Raises:
        IntegrityError: a cache object about to be pushed is corrupt; nothing was uploaded.
    """
    integrity.check_before_push(repo)  # never upload a corrupt object under its good name
    args = ["push", "-r", remote] if remote else ["push"]
    code, lines = run_dvc(args, Path(repo), stage_env(), get_run_logger())
    if code != 0:
        where = f"the DVC remote {remote!r}" if remote else "the default DVC remote"
        raise RuntimeError(f"dvc push to {where} failed: " + "\n".join(lines[-OUTPUT_TAIL:]))
    note_push(Path(repo), remote)  # the next `make run` with nothing changed need not push again


def publish_summary(
    repo: Path,
    stages: list[str],
    statuses: dict[str, str],
    flow_run_id: str | None,
    error: str | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    """Write the run's page (``flows.page``), publish the ``pipeline-summary`` Markdown artifact
    linking it; return the summary dict."""
    reports = read_reports(repo, statuses)
    summary = summarize_run(
        stages, statuses, reports, mlflow_ui_url(repo), flow_run_id, error, reason=reason
    )
    summary["page"] = publish_page(repo, summary)  # reports/index.html; never raises
    create_markdown_artifact(
        markdown=render_markdown(summary),
        key=SUMMARY_KEY,
        description="Stages, test metrics, registered model, MLflow run",
    )
    return summary


@flow(
    name="pipeline",
    description="The DVC stages of dvc.yaml in DVC's order (ingest -> validate -> features "
    "-> train -> ... -> register); then dvc push and a summary artifact.",
)
def pipeline(
    repo: str = ".",
    wait_s: float = 0.0,
    prerun: dict[str, Any] | None = None,
    dvc_remote: str | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    """Hold the workspace's run lock, then run the stages; see ``run_pipeline``.

    When this process holds the lock already (``main()`` took it before Prefect started), the
    flow runs under it: a second ``flock`` from the same process would conflict with the first.

    Args:
        repo: the project checkout holding ``dvc.yaml`` and ``params.yaml``.
        wait_s: how long to wait for another run holding the workspace (0: refuse at once).
        prerun: set by ``main()`` only, under the lock it holds: the stage it ran before
            starting the flow (``stage``, exit ``code``, DVC ``output``, the ingest manifest
            before it, ``manifest_before``); the flow records it instead of running it again.
        dvc_remote: the DVC remote the data versions are pushed to (``dvc push -r``); None:
            the default one. The stack's deployment (``flows.remote``) sets ``stack``.
        reason: why this run was started, when something asked for it: the monitor's
            retraining event sets it through the deployments' trigger (``flows/events.py``).
            Recorded in the flow run's parameters, the summary ("Triggered by") and the
            ``pipeline.reason`` tag of the stages' MLflow runs; it changes nothing that runs.

    Raises:
        runlock.RunLockBusy: another run holds the workspace (names its pid and start).
    """
    command = f"{command_line()} (Prefect flow run {current_flow_run.name})"
    if runlock.held_here(repo):  # main() took it before Prefect started, and checked MLflow
        _note_run(repo, command)
        return run_pipeline(
            repo, check_store=False, prerun=prerun, dvc_remote=dvc_remote, reason=reason
        )
    with runlock.run_lock(repo, wait_s=wait_s, command=command):
        _note_run(repo, command)
        # a prerun without the lock held would be stale
        return run_pipeline(repo, dvc_remote=dvc_remote, reason=reason)


def _note_run(repo: str, command: str) -> None:
    """Record the flow run and this process's temporary Prefect server with the run lock.

    The server must not outlive this process: a watcher stops it once this process ends, a
    ``kill -9`` included (else Prefect's own atexit does); should the watcher be gone too, the
    next run that takes the workspace over stops it (``runlock.stop_helpers``).
    """
    servers = prefect_servers()
    runlock.update_holder(repo, command=command, helpers=servers)
    if servers and not _watched_servers.issuperset(pid for pid, *_ in servers):
        runlock.stop_helpers_with_me(servers)
        _watched_servers.update(pid for pid, *_ in servers)


def run_pipeline(
    repo: str,
    check_store: bool = True,
    prerun: dict[str, Any] | None = None,
    dvc_remote: str | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    """Run the DVC stages of ``repo`` in order, push the data, publish the summary.

    Call it inside the ``pipeline`` flow, holding the run lock. ``check_store``: check the
    MLflow tracking store first (``main()`` did it already, before Prefect started).
    ``prerun``: the stage ``main()`` ran already (see ``pipeline``), recorded, not run again.
    ``dvc_remote``: the DVC remote to push to (None: the default one). ``reason``: why the
    run was started (see ``pipeline``), passed to the stages and the summary.

    Returns:
        The run summary (``flows.summary.summarize_run``): stage statuses, metrics, model.
    """
    root = Path(repo).resolve()
    logger = get_run_logger()
    flow_run_id = current_flow_run.id
    stages: list[str] = []
    statuses: dict[str, str] = {}
    try:
        if check_store:
            preflight(root)
        if reason:
            logger.info("triggered by: %s", reason)
        stages = read_stage_order(root)
        logger.info("stages, in dvc.yaml's order: %s", " -> ".join(stages))
        incremental = load_params(root / "params.yaml").ingest.watermark is not None
        manifest_before = prerun["manifest_before"] if prerun else read_manifest(root)
        for stage in stages:
            if (
                incremental
                and stage != INGEST
                and read_manifest(root) == manifest_before
                and only_ingest_changed(root)
            ):
                logger.info(
                    "no new rows since the last run (ingest.watermark): data/raw is "
                    "unchanged, so %s and the stages after it are skipped",
                    stage,
                )
                statuses.update(dict.fromkeys(stages[stages.index(stage) :], NO_NEW_ROWS))
                break
            statuses[stage] = FAILED  # until it returns
            if prerun and stage == prerun["stage"]:
                statuses[stage] = record_stage.with_options(name=stage)(prerun)
                continue
            stage_task = run_stage.with_options(
                name=stage, retries=RETRIES.get(stage, 0), retry_delay_seconds=RETRY_DELAY_S
            )
            statuses[stage] = stage_task(stage, str(root), flow_run_id, reason)
        push_data(str(root), dvc_remote)
    except Exception as exc:
        try:
            publish_summary(root, stages, statuses, flow_run_id, error=str(exc), reason=reason)
        except Exception:  # never hide the stage's error behind a reporting one
            logger.exception("could not publish the run summary")
        raise
    return publish_summary(root, stages, statuses, flow_run_id, reason=reason)
