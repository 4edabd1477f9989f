"""What a monitor check leaves behind (``flows/monitor.py``): its history line, report folder,
state and MLflow run, written in an order that never asks for retraining twice; the cooldown
on retraining events; the old report folders pruned; the check for the terminal.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flows.mlflow_store import experiment_id
from model.files import atomic_path
from stages.common.errors import PipelineError

EXPERIMENT = "monitoring"
REPORTS = "reports/monitor"
HISTORY = f"{REPORTS}/history.jsonl"
REPORT = "report.json"
DRIFT_HTML = "drift.html"
STATE = "state.json"
STAMP = "%Y%m%dT%H%M%SZ"  # a report folder's name: the check's UTC time
_STAMP = re.compile(r"^\d{8}T\d{6}Z$")
HELD = "retraining event held back"  # the reason's opening when the cooldown holds one
METRICS = ("rows", "drift_share", "psi", "bad_row_share", "accuracy", "f1_macro")
logger = logging.getLogger(__name__)


class MonitorInputError(PipelineError):
    """Bad input: no log, no watched version, unreadable labels or reference."""


def read_state(path: Path) -> dict[str, Any]:
    """The last check's state (``{}`` before the first)."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise MonitorInputError(
            f"{path}: not JSON ({exc}); delete it to check the whole log again"
        ) from exc


def write_text(path: Path, text: str) -> None:
    """Write ``text`` whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def history_line(
    checked_at: str, version: str | None, model_name: str, alias: str, rows: int, **found: Any
) -> dict[str, Any]:
    """A history line (``flows/monitor.py``'s doc), every key present: ``found`` over nulls."""
    line = {
        "checked_at": checked_at,
        "window_start": None,
        "window_end": None,
        "rows": rows,
        "model_name": model_name,
        "model_version": version,
        "alias": alias,
        "drift_share": None,
        "drifted_columns": [],
        "psi": None,
        "bad_row_share": None,
        "accuracy": None,
        "accuracy_source": None,
        "accuracy_baseline": None,
        "f1_macro": None,
        "decision": "waiting",
        "reasons": [],
        "report_dir": None,
        "service": None,
        "event_emitted": False,
    }
    line.update(found)
    return line


def append_history(repo: Path, line: dict[str, Any]) -> None:
    """One line at the end of ``reports/monitor/history.jsonl``."""
    path = repo / HISTORY
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:  # one short line: an append is whole
        out.write(json.dumps(line, default=str) + "\n")


def held_back(
    last_event: dict[str, Any] | None, version: str | None, now: dt.datetime, cooldown_h: float
) -> str | None:
    """The reason a retraining event for ``version`` is not sent now (one was sent for it less
    than ``cooldown_h`` hours ago: a run on unchanged data retrains nothing), else None."""
    if not last_event or str(last_event.get("version")) != str(version) or cooldown_h <= 0:
        return None
    sent = dt.datetime.fromisoformat(last_event["at"])
    if now - sent >= dt.timedelta(hours=cooldown_h):
        return None
    return (
        f"{HELD}: one was sent for v{version} at {sent.isoformat(timespec='seconds')}, less "
        f"than params monitor.cooldown_h ({cooldown_h:g} h) ago; the next may go at "
        f"{(sent + dt.timedelta(hours=cooldown_h)).isoformat(timespec='seconds')}"
    )


def log_to_mlflow(uri: str, line: dict[str, Any], report_dir: Path) -> str:
    """A run in experiment ``monitoring`` of the store at ``uri``: the check's figures, its
    decision and reasons as tags, report.json (and drift.html on "retrain") as artifacts.

    The client API: no tracking URI, experiment or run is left set in this process.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(uri)
    experiment = experiment_id(client, EXPERIMENT, uri)
    tags = {
        "decision": line["decision"],
        "reason": "; ".join(line["reasons"]) or "no threshold crossed",
        "model_name": line["model_name"],
        "model_version": str(line["model_version"]),
        "accuracy_source": str(line["accuracy_source"]),
    }
    run = client.create_run(
        experiment, tags=tags, run_name=f"monitor {line['model_name']} v{line['model_version']}"
    )
    run_id = run.info.run_id
    now_ms = int(time.time() * 1000)
    try:
        metrics = [Metric(k, float(line[k]), now_ms, 0) for k in METRICS if line[k] is not None]
        client.log_batch(run_id, metrics=metrics)
        client.log_artifact(run_id, str(report_dir / REPORT), "monitor")
        if line["decision"] == "retrain":  # ~5 MB each: only for the checks that asked
            client.log_artifact(run_id, str(report_dir / DRIFT_HTML), "monitor")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id)
    return run_id


def prune_reports(folder: Path, keep: int) -> list[str]:
    """Remove the report folders of ``folder`` but the newest ``keep``; returns those removed."""
    stamps = sorted(p.name for p in folder.iterdir() if p.is_dir() and _STAMP.match(p.name))
    gone = stamps[: max(len(stamps) - keep, 0)]
    for name in gone:
        shutil.rmtree(folder / name, ignore_errors=True)
    return gone


def commit_check(
    repo: Path,
    uri: str,
    line: dict[str, Any],
    report: dict[str, Any],
    html: str,
    state: tuple[Path, dict[str, Any]],
    emit: Callable[[], bool] | None,
    keep_reports: int,
) -> str:
    """Record a decided check, then ask for retraining (``emit``; None: not asked).

    The report folder, the MLflow run and the state (the watermark moves on) come first: if
    one fails, nothing was sent, and the next check reads the same rows and decides again. A
    failed send is logged and leaves the event unsent, safer than sending it twice. The history
    line then says whether it went; the state keeps the event (``last_event``) for the cooldown.

    Returns:
        The MLflow run's id.
    """
    report_dir = repo / line["report_dir"]
    write_text(report_dir / REPORT, json.dumps(report, indent=2, default=str) + "\n")
    write_text(report_dir / DRIFT_HTML, html)
    run_id = log_to_mlflow(uri, line, report_dir)
    state_path, new_state = state
    write_text(state_path, json.dumps(new_state) + "\n")
    if emit is not None:
        try:
            line["event_emitted"] = report["event_emitted"] = bool(emit())
        except Exception:  # noqa: BLE001 - the check stands; the event is only not sent
            logger.exception("the retraining event could not be sent")
    append_history(repo, line)
    if line["event_emitted"]:
        write_text(report_dir / REPORT, json.dumps(report, indent=2, default=str) + "\n")
        sent = {"version": line["model_version"], "at": line["checked_at"]}
        write_text(state_path, json.dumps({**new_state, "last_event": sent}) + "\n")
    gone = prune_reports(repo / REPORTS, keep_reports)
    if gone:
        logger.info("removed %d old report folder(s) (params monitor.keep_reports)", len(gone))
    return run_id


def render(line: dict[str, Any]) -> str:
    """The check as a few lines for the terminal."""
    head = (
        f"{line['decision'].upper()}: {line['model_name']} v{line['model_version']}, "
        f"{line['rows']} logged row(s)"
    )
    if line["decision"] == "waiting":
        return head + " (fewer than params monitor.min_rows: the next check sees more)"
    service_line = line["service"] or {}
    figures = [
        f"drift share {line['drift_share']:.2f} {line['drifted_columns'] or ''}".rstrip(),
        f"PSI {line['psi']:.3f}",
        f"bad rows {line['bad_row_share']:.1%}",
        f"accuracy ({line['accuracy_source']}) "
        + (f"{line['accuracy']:.3f}" if line["accuracy"] is not None else "n/a"),
        "service: "
        + (
            f"{service_line['requests']:.0f} requests, {service_line['errors']:.0f} errors"
            if service_line.get("available")
            else f"unavailable ({service_line.get('error')})"
        ),
    ]
    lines = [head, *("  " + f for f in figures), f"  report: {line['report_dir']}"]
    lines += [f"  reason: {r}" for r in line["reasons"]]
    if line["decision"] == "retrain":
        held = any(r.startswith(HELD) for r in line["reasons"])
        lines.append(
            "  retraining event "
            + (
                "sent to Prefect's events client"
                if line["event_emitted"]
                else "NOT sent (the cooldown holds it)"
                if held
                else "NOT sent (no Prefect API configured, or the send failed: see the log)"
            )
        )
    return "\n".join(lines)
