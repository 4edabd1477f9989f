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
"retrain" when any threshold of params ``monitor`` is crossed, else "ok". Labels are joined with
the version's rows of the last ``monitor.labels_days`` days, not only the window's, so labels
that come after their rows' check still count (``monitoring.late_labels``).

The check is recorded first (report folder, MLflow run, state: the watermark moves on), and
only then, on "retrain", ``flows.events.RETRAIN_EVENT`` is sent to Prefect's events client
with the reasons (``flows.monitor_record.commit_check``): a failure before leaves nothing sent,
so the next check decides again instead of asking twice. The pipeline deployment's trigger
(``flows.events.retrain_trigger``) starts a pipeline run with them as its ``reason``. Within
``monitor.cooldown_h`` of an event for the same watched version no other is sent (a run on
unchanged data retrains nothing): the decision stays "retrain", with a reason saying so.

Written, relative to ``--repo``:

* ``reports/monitor/<UTC stamp>/report.json`` (everything the check found: per-column drift
  tests, PSI per class, quality, performance by day, the service's figures, the reference used)
  and ``drift.html`` (Evidently's report, self-contained, ~5 MB), for each decided check; the
  newest ``monitor.keep_reports`` folders are kept, older ones removed;
* ``reports/monitor/history.jsonl``: one JSON object per check (waiting ones too, and every
  one ever made), every key always present (null when unknown). This is the page's
  drift-over-time source; keep it stable:

  ``checked_at`` (ISO UTC), ``window_start``/``window_end`` (ISO UTC of the first/last row of
  the watched version considered, null when none), ``rows``, ``model_name``,
  ``model_version``, ``alias``, ``drift_share``, ``drifted_columns`` (list), ``psi`` (the
  largest over the ``proba_<label>`` columns), ``bad_row_share``, ``accuracy``,
  ``accuracy_source`` ("labels" | "estimated"), ``accuracy_baseline``, ``f1_macro``,
  ``decision`` ("retrain" | "ok" | "waiting"), ``reasons`` (sentences), ``report_dir``
  (null when waiting), ``service`` (available, url, requests, errors, client_errors,
  error_share, latency_p50_s/p95_s/p99_s, error), ``event_emitted`` (the retraining event
  was sent to Prefect's events client; its delivery is asynchronous).

* ``<monitor.state_dir>/state.json``: ``watermark``, ``seen``, ``checked_at`` and
  ``last_event`` (``{version, at}`` of the last event sent: the cooldown's).
* an MLflow run in experiment ``monitoring`` of the project's store (a relative sqlite store
  taken from ``--repo``) for each decided check: metrics, tags ``decision``, ``reason``, the
  model and version, artifact ``monitor/report.json`` (and ``monitor/drift.html`` on
  "retrain").

Exit code 0 for ok, waiting and retrain (asking for retraining is no failure); 2 with a message
naming the file or setting and the fix for bad input (no log, no watched version, unreadable
labels or reference); 1 for anything else.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.events import emit_retrain
from flows.mlflow_store import store_uri
from flows.monitor_record import (
    HISTORY,
    REPORTS,
    STAMP,
    STATE,
    MonitorInputError,
    append_history,
    commit_check,
    held_back,
    history_line,
    read_state,
    render,
)
from monitoring import check, late_labels, performance, reference, service, window
from serving.model import LoadedModel, ModelLoadError, load_model
from stages.common import tracking
from stages.common.config import Params, load_params

__all__ = ["HISTORY", "MonitorInputError", "main", "monitor", "render"]
TEST_METRIC = "test_accuracy"  # the evaluate stage's, on the version's run


@contextmanager
def _tracking_at(uri: str) -> Iterator[None]:
    # serving.model.load_model resolves the alias with MLflow's process-wide tracking URI:
    # set it for the load only, and put back what the process had (a test's, the user's).
    import mlflow

    before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def _open_watched(params: Params, uri: str) -> LoadedModel:
    tracking.apply_http_limits(params.mlflow)
    name = f"models:/{params.register.model_name}@{params.monitor.alias}"
    try:
        with _tracking_at(uri):
            return load_model(name, "pyfunc", params.register.signing_key_env)
    except ModelLoadError as exc:
        raise MonitorInputError(
            f"no watched model: {exc} (register a model first, e.g. `make run`, or set params "
            "monitor.alias / register.model_name)"
        ) from exc


def _test_accuracy(model: LoadedModel, uri: str) -> float | None:
    from mlflow import MlflowClient

    if not model.run_id:
        return None
    return MlflowClient(uri).get_run(model.run_id).data.metrics.get(TEST_METRIC)


def _checks(
    repo: Path, params: Params, model: LoadedModel, rows: Any, opts: dict[str, Any]
) -> tuple[check.CheckResult, reference.ReferenceSource]:
    mp, ref_path, labels = params.monitor, opts["reference"], opts["labels"]
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
    baselines = check.Baselines(_test_accuracy(model, opts["uri"]), ref.estimated_test_accuracy)
    contract = dict(model.contract) if model.contract else None
    # the window's rows without labels (its performance: the estimate); labels are joined with
    # the last monitor.labels_days of the log instead, so labels that come late still count
    result = check.run_checks(
        rows, ref.rows, ref.proba, kinds, contract, None, thresholds, baselines
    )
    if truth is not None:
        live = late_labels.late_performance(
            repo / mp.log_dir, params.register.model_name, model.version, truth,
            opts["now"], mp.labels_days,
        )  # fmt: skip
        result = late_labels.with_performance(result, live, baselines, thresholds)
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
    state = read_state(state_path)
    since = dt.datetime.fromisoformat(state["watermark"]) if state.get("watermark") else None
    try:
        log = window.read_log(root / mp.log_dir, since, state.get("seen"))
    except FileNotFoundError as exc:
        raise MonitorInputError(
            f"{exc}: the service writes it when params serve.sample_rate > 0 (params "
            "monitor.log_dir names it; it must match serve.log_dir)"
        ) from exc
    uri = store_uri(root, params.mlflow)
    model = _open_watched(params, uri)
    name = params.register.model_name
    rows = window.watched_rows(log.rows, name, model.version)
    now = dt.datetime.now(dt.UTC)
    start, end = window.window_bounds(rows)
    found = {"window_start": start, "window_end": end}
    drawn = len(check.sampled_rows(rows))  # the statistics use the sample draw's rows only
    if drawn < mp.min_rows:
        line = history_line(now.isoformat(), model.version, name, mp.alias, len(rows), **found)
        append_history(root, line)
        logger.info(
            "waiting: %d sampled row(s) of v%s since the last check, %d needed (monitor.min_rows)",
            drawn, model.version, mp.min_rows,
        )  # fmt: skip
        return line
    opts = {"reference": reference_path, "labels": labels or mp.labels, "uri": uri, "now": now}
    result, source = _checks(root, params, model, rows, opts)
    figures = service.read_service(metrics_url or mp.metrics_url)
    report_dir = root / REPORTS / now.strftime(STAMP)
    held = held_back(state.get("last_event"), model.version, now, mp.cooldown_h)
    asks = result.decision == "retrain"
    line = history_line(
        now.isoformat(), model.version, name, mp.alias, len(rows), **found,
        drift_share=result.drift.share, drifted_columns=result.drift.drifted,
        psi=result.psi.value, bad_row_share=result.quality.bad_row_share,
        accuracy=result.performance.accuracy, accuracy_source=result.performance.source,
        accuracy_baseline=result.accuracy_baseline, f1_macro=result.performance.f1_macro,
        decision=result.decision, reasons=[*result.reasons, *([held] if asks and held else [])],
        report_dir=report_dir.relative_to(root).as_posix(), service=figures.to_dict(),
    )  # fmt: skip
    report = {**line, **result.to_dict(), "reasons": line["reasons"]}
    report |= {"reference": source.note, "files": log.files}
    payload = {k: line[k] for k in ("model_version", "drift_share", "psi", "report_dir")}

    def emit() -> bool:
        return emit_retrain(name, "; ".join(result.reasons), payload) is not None

    new_state = {
        "watermark": log.watermark.isoformat() if log.watermark else None,
        "seen": log.seen,
        "checked_at": line["checked_at"],
        "last_event": state.get("last_event"),
    }
    run_id = commit_check(
        root, uri, line, report, result.drift.html(), (state_path, new_state),
        emit if asks and not held else None, mp.keep_reports,
    )  # fmt: skip
    logger.info("%s (MLflow run %s): %s", result.decision, run_id, line["reasons"] or "-")
    return line


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
