"""What a pipeline run produced, as a dict and as the Markdown of the Prefect artifact.

Only the reports of stages that finished in this run are read, so a failed run never shows
the metrics or model of an earlier run as if they were its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from model.metrics import MEMBER_PREFIX, STRONG_PREFIX  # evaluate: the strong baseline, members
from stages.common.config import load_params
from stages.common.errors import PipelineError
from stages.common.tracking import run_url

# The stage statuses a run can report (DVC's words where DVC decides).
RAN, SKIPPED, RESTORED = "ran", "skipped", "restored from run cache"
FAILED, NOT_RUN = "failed", "not run"
NO_NEW_ROWS = "skipped: no new rows"  # incremental ingestion found nothing newer
FINISHED = (RAN, SKIPPED, RESTORED, NO_NEW_ROWS)

# report -> (the stage that writes it, its path): the data contracts between the stages.
REPORTS = {
    "metrics": ("evaluate", "reports/metrics.json"),
    "registration": ("register", "reports/registration.json"),
    "run": ("train", "models/run.json"),
}
METRIC_DIGITS = 4


def read_reports(repo: Path, statuses: dict[str, str]) -> dict[str, dict | None]:
    """The JSON reports written by stages that finished in this run (None otherwise)."""
    reports: dict[str, dict | None] = {}
    for name, (stage, path) in REPORTS.items():
        reports[name] = _read_json(repo / path) if statuses.get(stage) in FINISHED else None
    return reports


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _tracking_server() -> bool:
    """Whether runs go to an MLflow server (it serves the UI), not the local store."""
    return os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://"))


def mlflow_ui_url(repo: Path) -> str:
    """The MLflow UI: the tracking server itself when ``MLFLOW_TRACKING_URI`` is one (the stack,
    a team's server), else the local UI (``make ui``) on ``params.yaml`` ``mlflow.ui_port``."""
    if _tracking_server():
        return os.environ["MLFLOW_TRACKING_URI"].rstrip("/")
    try:
        port = load_params(repo / "params.yaml").mlflow.ui_port
    except PipelineError:
        port = 5000  # the stages report the bad params; the link just uses the default
    return f"http://127.0.0.1:{port}"


def summarize_run(
    stages: list[str],
    statuses: dict[str, str],
    reports: dict[str, dict | None],
    ui_url: str,
    flow_run_id: str | None = None,
    error: str | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    """The run in one small dict: stage statuses, test metrics, the registered model, links.

    Args:
        stages: every stage of the graph, in run order.
        statuses: what happened to the stages that were reached (see ``FINISHED``, ``FAILED``).
        reports: ``read_reports`` output: ``metrics``, ``registration`` and ``run`` dicts.
        ui_url: base URL of the MLflow UI.
        flow_run_id: the Prefect flow run.
        error: why the run failed, or None.
        reason: why the run was started (the monitor's retraining reason), or None.
    """
    registration = reports.get("registration")
    run = reports.get("run")
    model = None
    if registration:
        keys = ("model_name", "version", "decision", "reason", "previous_champion_version")
        model = {key: registration.get(key) for key in keys}
        model["compact"] = registration.get("compact")
    link = None
    if run and run.get("run_id") and run.get("experiment_id") is not None:
        link = run_url(ui_url, str(run["experiment_id"]), str(run["run_id"]))
    return {
        "status": "failed" if error else "completed",
        "flow_run_id": flow_run_id,
        "reason": reason,
        "stages": {stage: statuses.get(stage, NOT_RUN) for stage in stages},
        "metrics": reports.get("metrics"),
        "versus_gbdt": versus_gbdt(reports.get("metrics")),
        "members": ensemble_members(reports.get("metrics")),
        "model": model,
        "mlflow_run_url": link,
        "error": error,
    }


def versus_gbdt(metrics: dict[str, Any] | None) -> dict[str, dict[str, float]] | None:
    """``{metric: {"model": v, "gbdt": v}}``: the model against evaluate's strong baseline
    on the same test split (None when evaluate did not finish or reported none)."""
    if not metrics:
        return None
    pairs = {
        name.removeprefix(STRONG_PREFIX): {
            "model": metrics.get(name.removeprefix(STRONG_PREFIX)),
            "gbdt": value,
        }
        for name, value in metrics.items()
        if name.startswith(STRONG_PREFIX)
    }
    return {name: pair for name, pair in pairs.items() if pair["model"] is not None} or None


def ensemble_members(metrics: dict[str, Any] | None) -> dict[str, dict[str, float]] | None:
    """``{member: {metric: v}}`` from evaluate's ``member_<name>_<metric>`` keys: each ensemble
    member on the ensemble's test split (None: the judged model is no ensemble)."""
    if not metrics:
        return None
    names = [k for k in metrics if not k.startswith((MEMBER_PREFIX, "baseline_", STRONG_PREFIX))]
    members: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if key.startswith(MEMBER_PREFIX):
            for metric in names:
                if key.endswith(f"_{metric}"):
                    member = key.removeprefix(MEMBER_PREFIX).removesuffix(f"_{metric}")
                    members.setdefault(member, {})[metric] = value
    return members or None


def render_markdown(summary: dict[str, Any]) -> str:
    """The summary as Markdown: a stage table, metrics, registry decision, MLflow link."""
    lines = ["# Pipeline run", ""]
    if summary.get("error"):
        lines += ["**Failed:**", "", "```", summary["error"].strip(), "```", ""]
    else:
        lines += ["**Completed.**", ""]
    if reason := summary.get("reason"):
        lines += [f"Triggered by: {_one_line(reason)}", ""]
    lines += ["| Stage | Result |", "|---|---|"]
    lines += [f"| {stage} | {status} |" for stage, status in summary["stages"].items()]
    lines += ["", "## Test metrics", ""]
    if metrics := summary.get("metrics"):
        lines += ["| Metric | Value |", "|---|---|"]
        lines += [
            f"| {name} | {_format_value(value)} |"
            for name, value in metrics.items()
            if not name.startswith((STRONG_PREFIX, MEMBER_PREFIX))
        ]
    else:
        lines.append("Not available: the evaluate stage did not finish in this run.")
    if versus := summary.get("versus_gbdt"):
        lines += ["", "## Model vs gbdt on the same test split", ""]
        lines += [
            "A strong baseline: HistGradientBoosting with scikit-learn's defaults on the same "
            "train rows (a reference; the gate compares with logistic regression).",
            "",
            "| Metric | Model | gbdt |",
            "|---|---|---|",
        ]
        lines += [
            f"| {name} | {_format_value(pair['model'])} | {_format_value(pair['gbdt'])} |"
            for name, pair in versus.items()
        ]
    if members := summary.get("members"):
        shown = [
            m for m in ("f1_macro", "accuracy", "log_loss") if m in next(iter(members.values()))
        ]
        lines += ["", "## Ensemble members on the same test split", ""]
        lines += ["| Member | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
        lines += [
            f"| {name} | " + " | ".join(_format_value(scores.get(m)) for m in shown) + " |"
            for name, scores in members.items()
        ]
    lines += ["", "## Model registry", ""]
    lines += _model_lines(summary.get("model"))
    lines += ["", "## MLflow", ""]
    link = summary.get("mlflow_run_url")
    lines.append(
        f"[Training run]({link})" + ("" if _tracking_server() else " (start the UI with `make ui`)")
        if link
        else "Not available: the train stage did not finish in this run."
    )
    if page := summary.get("page"):  # flows.page.publish_page: reports/index.html
        where = f"`{page['path']}`: the run on one page that opens offline"
        if page.get("mlflow_url"):
            where += f" ([in MLflow]({page['mlflow_url']}))"
        lines += ["", "## Page", "", where]
    return "\n".join(lines) + "\n"


def _model_lines(model: dict | None) -> list[str]:
    if not model:
        return ["Not available: the register stage did not finish in this run."]
    previous = model.get("previous_champion_version")
    return [
        f"- Model: `{model.get('model_name')}` version **{model.get('version')}**",
        f"- Decision: **{model.get('decision')}**: {_one_line(str(model.get('reason')))}",
        f"- Previous champion: {'version ' + str(previous) if previous is not None else 'none'}",
        *_compact_lines(model.get("compact")),
    ]


def _compact_lines(compact: dict | None) -> list[str]:
    # register's record of the compact model (compress stage's best passing candidate)
    if not compact:
        return []
    version = compact.get("version")
    what = f"version **{version}** ({compact.get('method')}), " if version is not None else ""
    return [
        f"- Compact model: {what}{compact.get('status')}: {_one_line(str(compact.get('reason')))}"
    ]


def _format_value(value: Any) -> str:
    return f"{value:.{METRIC_DIGITS}f}" if isinstance(value, float) else str(value)


def _one_line(text: str) -> str:
    # Table cells and list items must stay on one line; pipes would split a table cell.
    return " ".join(text.split()).replace("|", "\\|")
