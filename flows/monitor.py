"""The monitor (``make monitor``; on params ``monitor.cron`` under ``make schedule`` and the
stack): the service's prediction log since the last check against the watched model's training
data; retraining asked for when a threshold is crossed.

    python -m flows.monitor --repo .

One check: read the log's part files flushed since the watermark (``<monitor.state_dir>/
state.json``); keep the rows of the watched version, ``<register.model_name>@<monitor.alias>``
in the MLflow registry (loaded as the service loads it); with fewer than ``monitor.min_rows`` of
them nothing is decided ("waiting") and the watermark stays, so the next check sees the grown
window. Otherwise ``monitoring.check`` compares them with the version's training reference
(``monitoring.reference``: the features stage's train split it was trained on) and decides:
"retrain" when any threshold of params ``monitor`` is crossed, else "ok". The watermark then
moves on. On "retrain" the flow emits ``flows.events.RETRAIN_EVENT`` with the reasons; the
pipeline deployment's trigger (``flows.events.retrain_trigger``) starts a pipeline run with
them as its ``reason``.

Written, relative to ``--repo``:

* ``reports/monitor/<UTC stamp>/report.json`` (everything the check found: per-column drift
  tests, PSI per class, quality, performance by day, the service's figures, the reference used)
  and ``drift.html`` (Evidently's report, self-contained), for each decided check;
* ``reports/monitor/history.jsonl``: one JSON object per check (waiting ones too), every key
  always present (null when unknown). This is the page's drift-over-time source; keep it
  stable:

  ``checked_at`` (ISO UTC), ``window_start``/``window_end`` (ISO UTC of the first/last row of
  the watched version considered, null when none), ``rows``, ``model_name``,
  ``model_version``, ``alias``, ``drift_share``, ``drifted_columns`` (list), ``psi`` (the
  largest over the ``proba_<label>`` columns), ``bad_row_share``, ``accuracy``,
  ``accuracy_source`` ("labels" | "estimated"), ``accuracy_baseline``, ``f1_macro``,
  ``decision`` ("retrain" | "ok" | "waiting"), ``reasons`` (sentences), ``report_dir``
  (null when waiting), ``service`` (available, url, requests, errors, client_errors,
  error_share, latency_p50_s/p95_s/p99_s, error), ``event_emitted``.

* an MLflow run in experiment ``monitoring`` (metrics, the report folder, tags ``decision``,
  ``reason``, the model and version) for each decided check.

Exit code 0 for ok, waiting and retrain (asking for retraining is no failure); 2 with a message
naming the file or setting and the fix for bad input (no log, no watched version, unreadable
labels or reference); 1 for anything else.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.events import emit_retrain
from model.files import atomic_path
from monitoring import check, performance, reference, service, window
from serving.model import LoadedModel, ModelLoadError, load_model
from stages.common import tracking
from stages.common.config import Params, load_params
from stages.common.errors import PipelineError

EXPERIMENT = "monitoring"
REPORTS = "reports/monitor"
HISTORY = f"{REPORTS}/history.jsonl"
STATE = "state.json"
TEST_METRIC = "test_accuracy"  # the evaluate stage's, on the version's run


class MonitorInputError(PipelineError):
    """Bad input: no log, no watched version, unreadable labels or reference."""


def _read_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise MonitorInputError(
            f"{path}: not JSON ({exc}); delete it to check the whole log again"
        ) from exc


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def _open_watched(params: Params) -> LoadedModel:
    import mlflow

    tracking.apply_http_limits(params.mlflow)
    mlflow.set_tracking_uri(tracking.tracking_uri(params.mlflow))
    uri = f"models:/{params.register.model_name}@{params.monitor.alias}"
    try:
        return load_model(uri, "pyfunc", params.register.signing_key_env)
    except ModelLoadError as exc:
        raise MonitorInputError(
            f"no watched model: {exc} (register a model first, e.g. `make run`, or set params "
            "monitor.alias / register.model_name)"
        ) from exc


def _test_accuracy(model: LoadedModel) -> float | None:
    from mlflow import MlflowClient

    if not model.run_id:
        return None
    return MlflowClient().get_run(model.run_id).data.metrics.get(TEST_METRIC)


def _history_line(
    checked_at: str, model: LoadedModel | None, params: Params, rows: int, **found: Any
) -> dict[str, Any]:
    line = {
        "checked_at": checked_at,
        "window_start": None,
        "window_end": None,
        "rows": rows,
        "model_name": params.register.model_name,
        "model_version": model.version if model else None,
        "alias": params.monitor.alias,
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


def _append_history(repo: Path, line: dict[str, Any]) -> None:
    path = repo / HISTORY
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:  # one short line: an append is whole
        out.write(json.dumps(line, default=str) + "\n")


def _log_to_mlflow(params: Params, line: dict[str, Any], report_dir: Path) -> str:
    import mlflow

    tracking.configure_mlflow(params.mlflow.model_copy(update={"experiment": EXPERIMENT}))
    metrics = {
        key: float(line[key])
        for key in ("rows", "drift_share", "psi", "bad_row_share", "accuracy", "f1_macro")
        if line[key] is not None
    }
    with mlflow.start_run(run_name=f"monitor {line['model_name']} v{line['model_version']}") as run:
        mlflow.log_metrics(metrics)
        mlflow.set_tags(
            {
                "decision": line["decision"],
                "reason": "; ".join(line["reasons"]) or "no threshold crossed",
                "model_name": line["model_name"],
                "model_version": str(line["model_version"]),
                "accuracy_source": str(line["accuracy_source"]),
            }
        )
        mlflow.log_artifacts(str(report_dir), artifact_path="monitor")
    return run.info.run_id


def _checks(
    repo: Path, params: Params, model: LoadedModel, rows: Any, ref_path: str | None, labels: str
) -> tuple[check.CheckResult, reference.ReferenceSource]:
    mp = params.monitor
    source = (
        reference.ReferenceSource(Path(ref_path), None, f"{ref_path} (given)", False)
        if ref_path
        else reference.locate_reference(repo, dict(model.tags))
    )
    kinds = reference.feature_kinds(
        dict(model.contract) if model.contract else None,
        [(c.name, c.kind) for c in model.spec.columns],
    )
    try:
        ref = check.prepare_reference(
            source.train, source.test, list(model.spec.names), kinds,
            mp.reference_rows, params.base.seed, model.predict,
        )  # fmt: skip
    except (OSError, KeyError) as exc:
        raise MonitorInputError(
            f"reference {source.train}: {exc} (run the pipeline's features stage, or pass "
            "--reference with the train split the model was trained on)"
        ) from exc
    try:
        truth = performance.read_labels(labels if "://" in labels else repo / labels)
    except performance.LabelsError as exc:
        raise MonitorInputError(str(exc)) from exc
    thresholds = check.Thresholds(
        mp.drift_share, mp.psi_threshold, mp.psi_bins, mp.max_bad_row_share, mp.max_accuracy_drop
    )
    baselines = check.Baselines(_test_accuracy(model), ref.estimated_test_accuracy)
    contract = dict(model.contract) if model.contract else None
    result = check.run_checks(
        rows, ref.rows, ref.proba, kinds, contract, truth, thresholds, baselines
    )
    return result, source


@flow(name="monitor", description="Drift, quality and performance of the served model.")
def monitor(
    repo: str = ".",
    params_path: str = "params.yaml",
    reference_path: str | None = None,
    labels: str | None = None,
    metrics_url: str | None = None,
) -> dict[str, Any]:
    """One check (module doc). Returns its history line.

    Args:
        repo: the project folder (params, log, reports and state are relative to it).
        params_path: params file, relative to ``repo``.
        reference_path: the training split to compare with instead of the version's own.
        labels: ground truth instead of params ``monitor.labels``.
        metrics_url: the service's ``/metrics`` instead of params ``monitor.metrics_url``.
    """
    logger = get_run_logger()
    root = Path(repo)
    params = load_params(root / params_path)
    mp = params.monitor
    state_path = root / mp.state_dir / STATE
    state = _read_state(state_path)
    since = dt.datetime.fromisoformat(state["watermark"]) if state.get("watermark") else None
    try:
        log = window.read_log(root / mp.log_dir, since, state.get("seen"))
    except FileNotFoundError as exc:
        raise MonitorInputError(
            f"{exc}: the service writes it when params serve.sample_rate > 0 (params "
            "monitor.log_dir names it; it must match serve.log_dir)"
        ) from exc
    model = _open_watched(params)
    rows = window.watched_rows(log.rows, params.register.model_name, model.version)
    now = dt.datetime.now(dt.UTC)
    start, end = window.window_bounds(rows)
    bounds = {"window_start": start, "window_end": end}
    if len(rows) < mp.min_rows:
        line = _history_line(now.isoformat(), model, params, len(rows), **bounds)
        _append_history(root, line)
        logger.info(
            "waiting: %d row(s) of v%s since the last check, %d needed (monitor.min_rows)",
            len(rows), model.version, mp.min_rows,
        )  # fmt: skip
        return line
    result, source = _checks(root, params, model, rows, reference_path, labels or mp.labels)
    figures = service.read_service(metrics_url or mp.metrics_url)
    report_dir = root / REPORTS / now.strftime("%Y%m%dT%H%M%SZ")
    line = _history_line(
        now.isoformat(), model, params, len(rows), **bounds,
        drift_share=result.drift.share, drifted_columns=result.drift.drifted,
        psi=result.psi.value, bad_row_share=result.quality.bad_row_share,
        accuracy=result.performance.accuracy, accuracy_source=result.performance.source,
        accuracy_baseline=result.accuracy_baseline, f1_macro=result.performance.f1_macro,
        decision=result.decision, reasons=result.reasons,
        report_dir=report_dir.relative_to(root).as_posix(), service=figures.to_dict(),
    )  # fmt: skip
    report = {**line, **result.to_dict(), "reference": source.note, "files": log.files}
    _write_text(report_dir / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    _write_text(report_dir / "drift.html", result.drift.html())
    if result.decision == "retrain":
        payload = {k: line[k] for k in ("model_version", "drift_share", "psi", "report_dir")}
        line["event_emitted"] = (
            emit_retrain(params.register.model_name, "; ".join(result.reasons), payload) is not None
        )
    run_id = _log_to_mlflow(params, line, report_dir)
    _append_history(root, line)
    seen = {"watermark": log.watermark.isoformat() if log.watermark else None, "seen": log.seen}
    _write_text(state_path, json.dumps({**seen, "checked_at": line["checked_at"]}) + "\n")
    logger.info("%s (MLflow run %s): %s", result.decision, run_id, result.reasons or "-")
    return line


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
        lines.append(
            "  retraining event "
            + ("emitted" if line["event_emitted"] else "NOT emitted (no Prefect API configured)")
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """One check; exit 0 (ok, waiting, retrain), 2 on bad input, 1 on another failure."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.monitor",
        description="Check the prediction log for drift, bad rows and lost accuracy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--repo", default=".", help="project folder")
    parser.add_argument("--params", default="params.yaml", help="params file (in --repo)")
    parser.add_argument("--reference", help="training split to compare with (Parquet)")
    parser.add_argument("--labels", help="ground truth (params monitor.labels)")
    parser.add_argument("--metrics-url", help="the service's /metrics (monitor.metrics_url)")
    args = parser.parse_args(argv)
    from prefect.settings import PREFECT_API_URL

    persistent_api = bool(PREFECT_API_URL.value())
    try:
        line = monitor(args.repo, args.params, args.reference, args.labels, args.metrics_url)
    except MonitorInputError as exc:
        print(f"\nMonitor: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the flow run is Failed and Prefect logged the details
        print(f"\nMonitor failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("\n" + render(line))
    if line["event_emitted"] and not persistent_api:
        print(
            "  note: no PREFECT_API_URL, so the event went to this run's temporary Prefect server,"
            " where no deployment listens; under `make schedule` or `make up` (or with"
            " PREFECT_API_URL set) the pipeline deployment's trigger starts the retraining"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
