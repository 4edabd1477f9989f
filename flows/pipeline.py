"""The pipeline as a Prefect flow: one task per DVC stage of ``dvc.yaml``.

``dvc.yaml`` is the only definition of the stage graph. The flow asks DVC for the stage order
and each task runs ``dvc repro --single-item <stage>``, so DVC decides what changed and
``dvc.lock`` is shared with a plain ``dvc repro``: after either one, the other has nothing to
do. Then the flow pushes the data versions to the default DVC remote (after checking their
cache objects: a corrupt one is never uploaded) and publishes the
``pipeline-summary`` artifact (stages ran/skipped, test metrics, registered version, promotion
decision and why, MLflow run link), also when a stage fails, which fails the flow run.

One run per workspace at a time: the workspace's run lock (``stages.common.runlock``, shared
with ``make repro``) is taken before ingest: by ``main()`` before Prefect starts anything (a
second ``make run`` refuses in seconds, one line), else by the flow itself (a deployment). A
second run refuses at once, naming the holder's pid, command and start, unless told to wait
(``--wait``, the ``wait_s`` parameter; the scheduled deployment waits). The temporary Prefect
server this process starts never outlives it: a small watcher stops it when the run is killed
(the server is also recorded with the lock: the next run stops it if the watcher is gone too).
Before ingest, the MLflow tracking store is checked (``tracking.check_tracking_store``):
a server that is down or a store that cannot be written stops the run before any stage.

Run it from the project root (``make run`` does)::

    python -m flows.pipeline [--repo PATH] [--wait [--wait-timeout S]]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as current_flow_run

from flows.summary import (
    FAILED,
    NO_NEW_ROWS,
    RAN,
    RESTORED,
    SKIPPED,
    mlflow_ui_url,
    read_reports,
    render_markdown,
    summarize_run,
)
from stages.common import integrity, runlock
from stages.common.config import load_params
from stages.common.errors import PipelineError
from stages.common.tracking import FLOW_RUN_ENV, check_tracking_store, tracking_uri

SUMMARY_KEY = "pipeline-summary"
RAW_MANIFEST = "data/raw/manifest.json"  # ingest's record of what data/raw holds
RETRIES = {"ingest": 2, "register": 2}  # I/O and registry writes can fail transiently
RETRY_DELAY_S = 5
OUTPUT_TAIL = 15  # lines of output quoted when a stage crashes without its own message

# DVC 3.67's own words (dvc/stage/run.py, dvc/stage/__init__.py, dvc/stage/cache.py).
_DVC_STATUS = {
    RAN: "Running stage '{}':",
    SKIPPED: "Stage '{}' didn't change, skipping",
    RESTORED: "Stage '{}' is cached - skipping run, checking out outputs",
}
# DVC's advice after each stage, logged at DEBUG only: `make run` and the README cover it.
_DVC_HINTS = (
    "To track the changes with git",
    "git add ",
    "To enable auto staging",
    "dvc config core.autostage",
    "Use `dvc push` to send",
    "Generating lock file",
    "Updating lock file",
)
# What stages.common.cli.run_main logs when a stage refuses bad input or config.
_STAGE_FAILED = re.compile(r"stage (?P<stage>\S+) failed: (?P<message>.+)")
_LOG_RECORD = re.compile(r"^\d{4}[-/]\d{2}[-/]\d{2}[ T]")  # a line that starts a log record
_DOT_EDGE = re.compile(r'^"(?P<src>[^"]+)"\s*->\s*"(?P<dst>[^"]+)";?$')
# How the temporary Prefect API server started for this process shows in its command line
# (prefect/server/api/server.py, SubprocessASGIServer._run_uvicorn_command, Prefect 3.8).
PREFECT_SERVER_APP = "prefect.server.api.server:create_app"
_watched_servers: set[int] = set()  # the servers a watcher already stops with this process


class StageFailedError(RuntimeError):
    """A DVC stage exited non-zero.

    ``deliberate`` is True when the stage itself refused its input or config (it logged
    ``stage <name> failed: ...``): running it again cannot help, so it is not retried.
    """

    def __init__(self, stage: str, message: str, *, deliberate: bool) -> None:
        self.stage, self.deliberate = stage, deliberate
        super().__init__(f"stage {stage} failed: {message}")


def order_stages(dot: str, stages: Sequence[str]) -> list[str]:
    """``stages`` in the order DVC runs them, given ``dvc dag --dot`` output.

    A stable topological sort: upstream stages first, ties kept in the order of ``stages``
    (their order in ``dvc.yaml``). Graph nodes that are not stages (``.dvc`` files) are dropped.
    """
    upstream: dict[str, set[str]] = {stage: set() for stage in stages}
    for line in dot.splitlines():
        edge = _DOT_EDGE.match(line.strip())
        if edge and edge["src"] in upstream and edge["dst"] in upstream:
            upstream[edge["dst"]].add(edge["src"])
    ordered: list[str] = []
    while len(ordered) < len(upstream):
        ready = [
            stage for stage in upstream if stage not in ordered and upstream[stage] <= set(ordered)
        ]
        if not ready:
            raise ValueError(
                f"dvc.yaml: the stages {sorted(set(upstream) - set(ordered))} "
                "depend on each other in a cycle"
            )
        ordered.append(ready[0])
    return ordered


def read_stage_order(repo: Path) -> list[str]:
    """The stages of ``repo/dvc.yaml`` in the order DVC runs them (asks ``dvc dag``)."""
    spec = yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8")) or {}
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "dag", "--dot"],
        cwd=repo,
        env=stage_env(),
        capture_output=True,
        text=True,
        pass_fds=runlock.inherited_fds(),
    )
    if result.returncode != 0:
        raise RuntimeError(f"dvc dag failed: {result.stdout.strip()} {result.stderr.strip()}")
    return order_stages(result.stdout, list(spec.get("stages") or {}))


def parse_stage_status(stage: str, lines: Sequence[str]) -> str:
    """``ran``, ``skipped`` or ``restored from run cache``, from DVC's output for ``stage``."""
    for status, template in _DVC_STATUS.items():
        if template.format(stage) in lines:
            return status
    return "unknown"


def describe_failure(lines: Sequence[str]) -> tuple[str, bool]:
    """Why a stage failed, and whether the stage said so itself (a deliberate refusal).

    The stage's own ``stage <name> failed: <message>`` lines when there are any; otherwise
    (a crash) DVC's error and the last lines of output, which hold the traceback.
    """
    own = []
    for index, line in enumerate(lines):
        if match := _STAGE_FAILED.search(line):
            own.append(match["message"])
            # A multi-line message goes on until the next log record or DVC's own error.
            for following in lines[index + 1 : index + 1 + OUTPUT_TAIL]:
                if following.startswith("ERROR") or _LOG_RECORD.match(following):
                    break
                own.append(following)
    if own:
        return "\n".join(own), True
    dvc_errors = [line for line in lines if line.startswith("ERROR")]
    tail = [line for line in lines[-OUTPUT_TAIL:] if line not in dvc_errors]
    return "\n".join([*dvc_errors, *tail]) or "exited without output", False


def stage_env(flow_run_id: str | None = None) -> dict[str, str]:
    """The environment of DVC and the stages it runs.

    This interpreter's directory goes first on PATH, so ``python`` in ``dvc.yaml`` commands is
    this virtualenv; the flow-run id lets the stages tag their MLflow runs with it.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"  # stage logs reach the Prefect log as they happen
    env.pop(FLOW_RUN_ENV, None)
    if flow_run_id:
        env[FLOW_RUN_ENV] = flow_run_id
    return env


def run_dvc(
    args: Sequence[str],
    repo: Path,
    env: dict[str, str],
    logger: logging.Logger | logging.LoggerAdapter,
) -> tuple[int, list[str]]:
    """Run ``dvc <args>`` in ``repo``, logging each output line as it comes.

    Returns:
        The exit code and the output lines (stdout and stderr, interleaved).
    """
    lines: list[str] = []
    # The run lock's workers lock goes with it: a new run waits for a dvc of a killed one.
    with subprocess.Popen(
        [sys.executable, "-m", "dvc", *args],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        pass_fds=runlock.inherited_fds(),
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            # A progress bar redraws itself with \r: keep only its last state.
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n").split("\r")[-1].rstrip()
            if line:
                lines.append(line)
                logger.log(_line_level(line), line)
    return proc.returncode, lines


def _line_level(line: str) -> int:
    if line.strip().startswith(_DVC_HINTS):
        return logging.DEBUG
    if re.search(r"\bERROR\b", line):
        return logging.ERROR
    return logging.WARNING if re.search(r"\bWARNING\b", line) else logging.INFO


def _retry_unless_deliberate(task: Any, task_run: Any, state: Any) -> bool:
    # Retry crashes (I/O, a locked store); a stage refusing bad input would only fail again.
    return not (isinstance(state.data, StageFailedError) and state.data.deliberate)


@task(cache_policy=NO_CACHE, retry_condition_fn=_retry_unless_deliberate)
def run_stage(stage: str, repo: str, flow_run_id: str | None = None) -> str:
    """Run one DVC stage with ``dvc repro --single-item``; DVC skips it if nothing changed.

    Returns:
        ``ran``, ``skipped`` or ``restored from run cache``.

    Raises:
        StageFailedError: the stage exited non-zero; the message is the stage's own.
    """
    logger = get_run_logger()
    code, lines = run_dvc(
        ["repro", "--single-item", stage], Path(repo), stage_env(flow_run_id), logger
    )
    if code != 0:
        message, deliberate = describe_failure(lines)
        raise StageFailedError(stage, message, deliberate=deliberate)
    status = parse_stage_status(stage, lines)
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
def push_data(repo: str) -> None:
    """Push this run's data versions to the default DVC remote.

    Raises:
        IntegrityError: a cache object about to be pushed is corrupt; nothing was uploaded.
    """
    integrity.check_before_push(repo)  # never upload a corrupt object under its good name
    code, lines = run_dvc(["push"], Path(repo), stage_env(), get_run_logger())
    if code != 0:
        raise RuntimeError("dvc push failed: " + "\n".join(lines[-OUTPUT_TAIL:]))


def publish_summary(
    repo: Path,
    stages: list[str],
    statuses: dict[str, str],
    flow_run_id: str | None,
    error: str | None = None,
) -> dict[str, Any]:
    """Publish the ``pipeline-summary`` Markdown artifact; return the summary dict."""
    reports = read_reports(repo, statuses)
    summary = summarize_run(stages, statuses, reports, mlflow_ui_url(repo), flow_run_id, error)
    create_markdown_artifact(
        markdown=render_markdown(summary),
        key=SUMMARY_KEY,
        description="Stages, test metrics, registered model, MLflow run",
    )
    return summary


@flow(
    name="pipeline",
    description="ingest -> validate -> features -> train -> evaluate -> export -> "
    "register, as the DVC stages of dvc.yaml; then dvc push and a summary artifact.",
)
def pipeline(repo: str = ".", wait_s: float = 0.0) -> dict[str, Any]:
    """Hold the workspace's run lock, then run the stages; see ``run_pipeline``.

    When this process holds the lock already (``main()`` took it before Prefect started), the
    flow runs under it: a second ``flock`` from the same process would conflict with the first.

    Args:
        repo: the project checkout holding ``dvc.yaml`` and ``params.yaml``.
        wait_s: how long to wait for another run holding the workspace (0: refuse at once).

    Raises:
        runlock.RunLockBusy: another run holds the workspace (names its pid and start).
    """
    command = f"{_command_line()} (Prefect flow run {current_flow_run.name})"
    if runlock.held_here(repo):  # main() took it before Prefect started, and checked MLflow
        _note_run(repo, command)
        return run_pipeline(repo, check_store=False)
    with runlock.run_lock(repo, wait_s=wait_s, command=command):
        _note_run(repo, command)
        return run_pipeline(repo)


def _command_line() -> str:
    """How this process was started: ``python -m flows.pipeline --repo .``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    start = ["-m", spec.name] if spec is not None and spec.name else sys.argv[:1]
    return " ".join([Path(sys.executable).name, *start, *sys.argv[1:]])


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


def prefect_servers() -> list[list[Any]]:
    """``[pid, create time, what]`` of the temporary Prefect API servers this process started."""
    import psutil

    found = []
    for child in psutil.Process().children():
        try:
            if PREFECT_SERVER_APP in child.cmdline():
                found.append([child.pid, child.create_time(), "temporary Prefect server"])
        except psutil.Error:
            continue
    return found


def preflight(repo: Path) -> None:
    """Refuse before any stage when the MLflow tracking store cannot be used.

    Raises:
        PipelineError: one line naming the store and the fix.
    """
    try:
        params = load_params(repo / "params.yaml")
    except PipelineError:
        return  # a missing or bad params.yaml: the stages say so, naming the field
    check_tracking_store(params.mlflow, repo)


def run_pipeline(repo: str, check_store: bool = True) -> dict[str, Any]:
    """Run the DVC stages of ``repo`` in order, push the data, publish the summary.

    Call it inside the ``pipeline`` flow, holding the run lock. ``check_store``: check the
    MLflow tracking store first (``main()`` did it already, before Prefect started).

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
        stages = read_stage_order(root)
        logger.info("stages, in dvc.yaml's order: %s", " -> ".join(stages))
        incremental = load_params(root / "params.yaml").ingest.watermark is not None
        manifest_before = read_manifest(root)
        for stage in stages:
            if (
                incremental
                and stage != "ingest"
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
            stage_task = run_stage.with_options(
                name=stage, retries=RETRIES.get(stage, 0), retry_delay_seconds=RETRY_DELAY_S
            )
            statuses[stage] = stage_task(stage, str(root), flow_run_id)
        push_data(str(root))
    except Exception as exc:
        try:
            publish_summary(root, stages, statuses, flow_run_id, error=str(exc))
        except Exception:  # never hide the stage's error behind a reporting one
            logger.exception("could not publish the run summary")
        raise
    return publish_summary(root, stages, statuses, flow_run_id)


def read_manifest(repo: Path) -> str | None:
    """The text of ingest's ``data/raw/manifest.json`` (None before the first ingest)."""
    try:
        return (repo / RAW_MANIFEST).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def only_ingest_changed(repo: Path) -> bool:
    """Whether ``dvc status`` finds every stage but ingest (which always runs) up to date."""
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"],
        cwd=repo,
        env=stage_env(),
        capture_output=True,
        text=True,
        pass_fds=runlock.inherited_fds(),
    )
    try:
        changed = json.loads(result.stdout or "{}")
    except ValueError:
        return False
    return result.returncode == 0 and set(changed) <= {"ingest"}


def where_to_look(repo: Path, summary: dict[str, Any] | None) -> str:
    """Where the results of a run are: model, MLflow UI, reports, the Prefect artifact."""
    try:
        params = load_params(repo / "params.yaml")
    except PipelineError as exc:
        return f"  (no pointers: {exc})"
    lines = []
    if summary:
        counts = Counter(summary["stages"].values())
        lines.append(
            "Pipeline completed: " + ", ".join(f"{n} {what}" for what, n in counts.items())
        )
        if model := summary.get("model"):
            earlier = (
                ""
                if summary["stages"].get("register") == RAN
                else "unchanged, nothing registered in this run; recorded earlier: "
            )
            lines.append(
                f"  Model:      {model['model_name']} version {model['version']}: "
                f"{earlier}{model['decision']} ({model['reason']})"
            )
    ui_port = params.mlflow.ui_port
    link = (summary or {}).get("mlflow_run_url") or f"http://127.0.0.1:{ui_port}"
    home = os.environ.get("PREFECT_HOME")
    server = tracking_uri(params.mlflow)
    ui_hint = f"make ui, then open {link}"
    if server.startswith(("http://", "https://")):  # the tracking server serves its own UI
        ui_hint = f"open {server}"
    lines += [
        f"  Registry:   models:/{params.register.model_name}@{params.register.alias} "
        f"in {tracking_uri(params.mlflow)}",
        f"  MLflow UI:  {ui_hint}",
        "  Metrics:    reports/metrics.json (dvc metrics show), plots in reports/eval/ "
        "(dvc plots show)",
        "  Validation: reports/validation/summary.json, Data Docs in "
        "reports/validation/docs/index.html",
        f"  Prefect:    {'PREFECT_HOME=' + home + ' ' if home else ''}"
        f"prefect artifact inspect {SUMMARY_KEY}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the pipeline flow once and print where to look; exit code 1 if it failed."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.pipeline",
        description="Run the whole pipeline once as a Prefect flow: the DVC stages of dvc.yaml "
        "(unchanged ones are skipped), dvc push, and a summary artifact.",
        epilog="To run it on a schedule instead: python -m flows.schedule",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--repo", default=".", help="project checkout holding dvc.yaml and params.yaml"
    )
    parser.add_argument(
        "--wait",
        action="store_true",
        help="wait for a run that holds the workspace instead of refusing",
    )
    parser.add_argument(
        "--wait-timeout",
        type=float,
        default=runlock.DEFAULT_WAIT_S,
        help="seconds --wait waits at most",
    )
    args = parser.parse_args(argv)
    wait_s = args.wait_timeout if args.wait else 0.0
    # The lock and the MLflow check come before Prefect starts its server and a flow run: a
    # busy workspace or a dead tracking server is refused in seconds, as one line.
    with ExitStack() as held:
        try:
            held.enter_context(runlock.run_lock(args.repo, wait_s=wait_s, command=_command_line()))
            preflight(Path(args.repo))
        except PipelineError as exc:  # nothing ran: no pointers to results
            print(f"Pipeline not started: {exc}", file=sys.stderr)
            return 1
        try:
            summary = pipeline(repo=args.repo, wait_s=wait_s)
        except Exception as exc:  # the flow run is Failed and Prefect logged the details
            print(
                f"\nPipeline failed: {exc}\n{where_to_look(Path(args.repo), None)}", file=sys.stderr
            )
            return 1
    print(f"\n{where_to_look(Path(args.repo), summary)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
