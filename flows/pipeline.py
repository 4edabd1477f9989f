"""The pipeline as a Prefect flow: one task per DVC stage of ``dvc.yaml``.

``dvc.yaml`` is the only definition of the stage graph. The flow asks DVC for the stage order
and each task runs ``dvc repro --single-item <stage>``, so DVC decides what changed and
``dvc.lock`` is shared with a plain ``dvc repro``: after either one, the other has nothing to
do. Then the flow pushes the data versions to the default DVC remote, or the one its
``dvc_remote`` parameter names (the stack's deployment: ``stack``), after checking their
cache objects (a corrupt one is never uploaded), and publishes the
``pipeline-summary`` artifact (stages ran/skipped, test metrics, registered version, promotion
decision and why, MLflow run link), also when a stage fails, which fails the flow run.
A run that the monitor asked for (its retraining event fires the trigger of the pipeline's
deployments, ``flows/events.py``) carries the monitor's words in its ``reason`` parameter:
the summary says "Triggered by" them and the stages tag their MLflow runs ``pipeline.reason``.

One run per workspace at a time: the workspace's run lock (``stages.common.runlock``, shared
with ``make repro``) is taken before ingest: by ``main()`` before Prefect starts anything (a
second ``make run`` refuses in seconds, one line), else by the flow itself (a deployment). A
second run refuses at once, naming the holder's pid, command and start, unless told to wait
(``--wait``, the ``wait_s`` parameter; the scheduled deployment waits). The temporary Prefect
server this process starts never outlives it: a small watcher stops it when the run is killed
(the server is also recorded with the lock: the next run stops it if the watcher is gone too).
Before ingest, the MLflow tracking store is checked (``tracking.check_tracking_store``):
a server that is down or a store that cannot be written stops the run before any stage.

Nothing changed, no flow run: under the lock, before importing Prefect, ``main()`` runs ingest
(``dvc repro --single-item ingest``, as the flow's first task would) and one ``dvc status``.
When every other stage is up to date and the last flow run's ``dvc push`` had this
``dvc.lock``, it prints the summary and exits (about 3 s instead of 14 s); otherwise the flow
runs and records that ingest run as its ``ingest`` task instead of running it again
(``--always-flow``: always a flow run, ingest inside it). A scheduled deployment runs the flow
itself: always a flow run.

The Prefect API: ``PREFECT_API_URL`` when set, else a persistent local server answering on
127.0.0.1:4200 (``make prefect``, or the one ``make schedule`` starts), else Prefect's
temporary server for this process. The flow and its tasks are in ``flows/pipeline_flow.py``
(imported on first use: ``from flows.pipeline import pipeline`` works).

Run it from the project root (``make run`` does)::

    python -m flows.pipeline [--repo PATH] [--wait [--wait-timeout S]] [--always-flow]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from flows.summary import (
    NO_NEW_ROWS,
    RAN,
    RESTORED,
    SKIPPED,
    mlflow_ui_url,
    read_reports,
    summarize_run,
)
from stages.common import runlock
from stages.common.config import load_params
from stages.common.errors import PipelineError
from stages.common.tracking import (
    FLOW_RUN_ENV,
    REASON_ENV,
    check_tracking_store,
    tracking_uri,
)

SUMMARY_KEY = "pipeline-summary"
RAW_MANIFEST = "data/raw/manifest.json"  # ingest's record of what data/raw holds
INGEST = "ingest"  # always changed (it asks the source for new rows): run first, by main()
RETRIES = {INGEST: 2, "register": 2}  # I/O and registry writes can fail transiently
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
# A persistent local Prefect server (`make prefect`, `make schedule`): used when one answers.
PREFECT_PORT = 4200
PUSHED = ".dvc/tmp/pipeline-pushed.json"  # what dvc.lock and remote config the last push had
# The flow and its tasks (flows/pipeline_flow.py): Prefect is imported on their first use.
_FLOW_NAMES = frozenset(
    {"pipeline", "run_stage", "record_stage", "push_data", "publish_summary", "run_pipeline"}
)
logger = logging.getLogger("flows.pipeline")


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


def stage_env(flow_run_id: str | None = None, reason: str | None = None) -> dict[str, str]:
    """The environment of DVC and the stages it runs.

    This interpreter's directory goes first on PATH, so ``python`` in ``dvc.yaml`` commands is
    this virtualenv; the flow-run id and the run's reason (the monitor's, when its event
    triggered the run) let the stages tag their MLflow runs with them (metadata only: no DVC
    hash depends on the environment).
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"  # stage logs reach the Prefect log as they happen
    env.pop(FLOW_RUN_ENV, None)
    env.pop(REASON_ENV, None)
    if flow_run_id:
        env[FLOW_RUN_ENV] = flow_run_id
    if reason:
        env[REASON_ENV] = reason
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
                log_lines([line], logger)
    return proc.returncode, lines


def log_lines(lines: Sequence[str], logger: logging.Logger | logging.LoggerAdapter) -> None:
    """Log DVC output lines: errors as errors, DVC's git/push advice at DEBUG."""
    for line in lines:
        logger.log(_line_level(line), line)


def _line_level(line: str) -> int:
    if line.strip().startswith(_DVC_HINTS):
        return logging.DEBUG
    if re.search(r"\bERROR\b", line):
        return logging.ERROR
    return logging.WARNING if re.search(r"\bWARNING\b", line) else logging.INFO


def command_line() -> str:
    """How this process was started: ``python -m flows.pipeline --repo .``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    start = ["-m", spec.name] if spec is not None and spec.name else sys.argv[:1]
    return " ".join([Path(sys.executable).name, *start, *sys.argv[1:]])


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


def read_manifest(repo: Path) -> str | None:
    """The text of ingest's ``data/raw/manifest.json`` (None before the first ingest)."""
    try:
        return (repo / RAW_MANIFEST).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def only_ingest_changed(repo: Path) -> bool:
    """Whether ``dvc status`` finds every stage but ingest (which always runs) up to date."""
    changed = changed_stages(repo)
    return changed is not None and changed <= {INGEST}


def changed_stages(repo: Path) -> set[str] | None:
    """The stages ``dvc status`` finds changed (ingest always is); None if it failed."""
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
        return None
    return set(changed) if result.returncode == 0 and isinstance(changed, dict) else None


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


def note_push(repo: Path, remote: str | None = None) -> None:
    """Record that ``dvc push`` to ``remote`` (None: the default remote) succeeded for this
    ``dvc.lock`` and remote configuration."""
    path = _pushed_file(repo, remote)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_push_state(repo)), encoding="utf-8")


def pushed_already(repo: Path, remote: str | None = None) -> bool:
    """Whether the last successful ``dvc push`` to ``remote`` (None: the default remote) by a
    flow run had this ``dvc.lock`` and remote configuration: the data versions it names are on
    that remote then."""
    try:
        noted = json.loads(_pushed_file(repo, remote).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return noted == _push_state(repo)


def _pushed_file(repo: Path, remote: str | None) -> Path:
    # One record per remote: a push to the stack's remote says nothing of the default one.
    if not remote:
        return repo / PUSHED
    return repo / PUSHED.replace(".json", "-" + re.sub(r"[^A-Za-z0-9_.-]", "_", remote) + ".json")


def _push_state(repo: Path) -> dict[str, str | None]:
    def digest(name: str) -> str | None:
        try:
            return hashlib.sha256((repo / name).read_bytes()).hexdigest()
        except FileNotFoundError:
            return None

    return {name: digest(name) for name in ("dvc.lock", ".dvc/config", ".dvc/config.local")}


def run_ingest_first(repo: Path) -> dict[str, Any] | None:
    """Run ingest as the flow's first task would (``dvc repro --single-item ingest``).

    Returns:
        What the flow needs to record it instead of running it again (``stage``, exit
        ``code``, DVC ``output``, ``manifest_before``); None when ``dvc.yaml`` has no ingest
        stage, or it crashed (the flow then runs it, with its retries).
    """
    if INGEST not in _dvc_yaml_stages(repo):
        return None
    manifest_before = read_manifest(repo)
    logger.info("stage %s: asking the source for new rows before starting Prefect", INGEST)
    code, lines = run_dvc(["repro", "--single-item", INGEST], repo, stage_env(), logger)
    prerun = {"stage": INGEST, "code": code, "output": lines, "manifest_before": manifest_before}
    if code != 0 and not describe_failure(lines)[1]:
        logger.warning("stage %s crashed; the flow runs it again, with retries", INGEST)
        return None
    return prerun


def _dvc_yaml_stages(repo: Path) -> list[str]:
    try:
        spec = yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return []  # the flow's `dvc dag` says what is wrong
    return list(spec.get("stages") or {}) if isinstance(spec, dict) else []


def summarize_unchanged(repo: Path, prerun: dict[str, Any]) -> dict[str, Any] | None:
    """The run's summary when nothing but ingest would run, else None (the flow must run).

    Nothing would run when ingest succeeded, ``dvc status`` finds every other stage up to
    date, and the last ``dvc push`` of a flow run had this ``dvc.lock`` (nothing to push).
    """
    if prerun["code"] != 0 or not pushed_already(repo):  # the cheap checks first
        return None
    changed = changed_stages(repo)
    if changed is None or not changed <= {INGEST}:
        return None
    stages = _dvc_yaml_stages(repo)
    try:
        params = load_params(repo / "params.yaml")
    except PipelineError:
        return None  # the flow's stages say what is wrong, naming the field
    new_rows = params.ingest.watermark is None or read_manifest(repo) != prerun["manifest_before"]
    statuses = dict.fromkeys(stages, SKIPPED if new_rows else NO_NEW_ROWS)
    statuses[INGEST] = parse_stage_status(INGEST, prerun["output"])
    reports = read_reports(repo.resolve(), statuses)
    return summarize_run(stages, statuses, reports, mlflow_ui_url(repo))


def use_prefect_api(port: int, stack: ExitStack) -> None:
    """Point this process at a persistent local Prefect server when one answers.

    ``PREFECT_API_URL`` (environment or Prefect profile) wins; else a server answering on
    127.0.0.1:``port`` (``make prefect``, ``make schedule``) is used while ``stack`` is open,
    so the run shows in its UI and no temporary server starts; else Prefect starts its
    temporary one. One line says which.
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if url := get_current_settings().api.url:
        logger.info("Prefect API: %s (PREFECT_API_URL)", url)
        return
    url = f"http://127.0.0.1:{port}/api"
    if not is_api_healthy(url):
        logger.info(
            "Prefect API: a temporary server (none answers on %s; `make prefect` keeps one)", url
        )
        return
    logger.info("Prefect API: the local server at %s", url)
    stack.enter_context(temporary_settings(updates={PREFECT_API_URL: url}))


def is_api_healthy(api_url: str, timeout_s: float = 2) -> bool:
    """Whether a Prefect API answers its health check at ``api_url``."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout_s) as answer:
            return answer.status == 200
    except OSError:
        return False


def _setup_logging() -> None:
    # The command's own lines before Prefect starts (Prefect's console format).
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s.%(msecs)03d | %(levelname)-7s | %(name)s - %(message)s",
                datefmt="%H:%M:%S",
            )
        )
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the pipeline once and print where to look; exit code 1 if it failed.

    Before Prefect starts: the run lock, the MLflow check, then ingest (which always runs) and
    one ``dvc status``. When nothing else would run and nothing is left to push, it prints the
    summary and exits without a Prefect flow run (``--always-flow`` records one anyway); else
    the flow runs the rest, recording ingest's run as its first task.
    """
    parser = argparse.ArgumentParser(
        prog="python -m flows.pipeline",
        description="Run the whole pipeline once as a Prefect flow: the DVC stages of dvc.yaml "
        "(unchanged ones are skipped), dvc push, and a summary artifact. When ingest finds "
        "the same rows and every other stage is up to date, no flow run is started.",
        epilog="To run it on a schedule instead: python -m flows.schedule",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--repo", default=".", help="project checkout holding dvc.yaml and params.yaml"
    )
    runlock.add_wait_arguments(parser)
    parser.add_argument(
        "--always-flow",
        action="store_true",
        help="start a Prefect flow run (and its summary artifact) also when nothing changed",
    )
    parser.add_argument(
        "--prefect-port",
        type=int,
        default=PREFECT_PORT,
        help="port of a persistent local Prefect server to use when PREFECT_API_URL is unset",
    )
    args = parser.parse_args(argv)
    wait_s = args.wait_timeout if args.wait else 0.0
    repo = Path(args.repo)
    _setup_logging()
    # The lock and the MLflow check come before Prefect starts its server and a flow run: a
    # busy workspace or a dead tracking server is refused in seconds, as one line.
    with ExitStack() as held:
        try:
            held.enter_context(runlock.run_lock(args.repo, wait_s=wait_s, command=command_line()))
            preflight(repo)
        except PipelineError as exc:  # nothing ran: no pointers to results
            print(f"Pipeline not started: {exc}", file=sys.stderr)
            return 1
        prerun = None if args.always_flow else run_ingest_first(repo)
        if prerun and (summary := summarize_unchanged(repo, prerun)):
            print(
                f"\nNothing changed: {INGEST} {summary['stages'][INGEST]} and left data/raw as "
                "it was, every other stage is up to date (dvc status), the data versions are "
                "pushed: no Prefect flow run started (--always-flow records one).\n"
                f"{where_to_look(repo, summary)}"
            )
            return 0
        use_prefect_api(args.prefect_port, held)
        from flows.pipeline_flow import pipeline

        try:
            summary = pipeline(repo=args.repo, wait_s=wait_s, prerun=prerun)
        except Exception as exc:  # the flow run is Failed and Prefect logged the details
            print(f"\nPipeline failed: {exc}\n{where_to_look(repo, None)}", file=sys.stderr)
            return 1
    print(f"\n{where_to_look(repo, summary)}")
    return 0


def __getattr__(name: str) -> Any:
    # The flow and its tasks: `from flows.pipeline import pipeline` imports Prefect then.
    if name in _FLOW_NAMES:
        from flows import pipeline_flow

        return getattr(pipeline_flow, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    # One copy of this module: flows.pipeline_flow imports it by its name.
    from flows.pipeline import main as _main

    raise SystemExit(_main())
