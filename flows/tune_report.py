"""``make tune``'s record: the study's MLflow run (one per study, its trials' runs nested under
it, the tracking URI always passed explicitly: no global MLflow state in the flow process) and
the summary (what ran, the best trial, what changed in params.yaml), printed and kept as the
Prefect artifact ``tune-summary``."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

from stages.common.redact import redact_url
from stages.train import tune_liveness, tuning


def end_dead_trials(plan: dict, study: Any) -> list[int]:
    """Mark the trials a killed run left RUNNING FAIL, their MLflow runs KILLED."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(plan["tracking_uri"])
    failed = tune_liveness.fail_dead_trials(study)
    for trial in failed:
        if run_id := trial.user_attrs.get(tuning.RUN_ATTR):
            try:
                client.set_tag(run_id, "optuna.state", "FAIL")
                client.set_terminated(run_id, "KILLED")
            except MlflowException:  # another tracking store
                pass
    return [trial.number for trial in failed]


def parent_run(plan: dict, study: Any) -> str:
    """The study's MLflow run: the one recorded on the study (resumed), else a new one."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(plan["tracking_uri"])
    tags = {
        "optuna.study": plan["study"],
        "optuna.storage": redact_url(plan["storage"]),
        "tune.family": plan["family"],
        "tune.sampler": plan["sampler"],
        "tune.pruner": plan["pruner"],
        "tune.target_trials": str(plan["target"]),
    }
    if run_id := study.user_attrs.get(tuning.PARENT_RUN_ATTR):
        try:
            client.update_run(run_id, status="RUNNING")
            for key, value in tags.items():
                client.set_tag(run_id, key, value)
            return run_id
        except MlflowException:  # another tracking store, or the run was deleted
            pass
    run = client.create_run(_experiment_id(plan), run_name=f"tune {plan['study']}", tags=tags)
    study.set_user_attr(tuning.PARENT_RUN_ATTR, run.info.run_id)
    return run.info.run_id


def _experiment_id(plan: dict) -> str:
    """The tune experiment in the plan's store (URI passed explicitly: no global MLflow state);
    a sqlite store keeps its artifacts beside the database, as ``tracking.configure_mlflow``."""
    from mlflow import MlflowClient

    client = MlflowClient(plan["tracking_uri"])
    if experiment := client.get_experiment_by_name(plan["experiment"]):
        return experiment.experiment_id
    artifacts = None
    if plan["tracking_uri"].startswith("sqlite:///"):
        db = Path(plan["tracking_uri"].removeprefix("sqlite:///")).resolve()
        artifacts = (db.parent / "artifacts").as_uri()
        # WAL (a property of the file): parallel trials write while the UI reads
        with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
    return client.create_experiment(plan["experiment"], artifact_location=artifacts)


def finish_parent(plan: dict, run_id: str, study: Any, failed: bool) -> None:
    """The study's run ends FINISHED (FAILED when ``failed``) with its trial counts and best."""
    from mlflow import MlflowClient

    client = MlflowClient(plan["tracking_uri"])
    counts = tuning.count_states(study)
    metrics = {f"trials_{k.lower()}": float(v) for k, v in counts.items()}
    if best := tuning.best_trial(study):
        metrics["best_val_loss"] = float(best.value)
        client.set_tag(run_id, "best.trial", str(best.number))
        for key, value in best.user_attrs.get(tuning.VALUES_ATTR, {}).items():
            client.set_tag(run_id, f"best.{key}", json.dumps(value))
    for key, value in metrics.items():
        client.log_metric(run_id, key, value, step=tuning.finished_trials(study))
    client.set_terminated(run_id, "FAILED" if failed else "FINISHED")


def summarize(
    plan: dict,
    study: Any,
    *,
    results: list[dict],
    rerun: list[int],
    changed: dict,
    parent_run_id: str,
    error: str | None,
    note: str | None,
    new_study: bool,
    previous: tuple[str, list[str]] | None,
    started: float,
) -> dict[str, Any]:
    """What ``make tune`` did, for ``render`` (JSON-able: the flow returns it)."""
    best = tuning.best_trial(study)
    experiment = _experiment_of(plan, parent_run_id)
    return {
        "study": plan["study"],
        "family": plan["family"],
        "target": plan["target"],
        "ran_now": len(results),
        "ran_now_states": {
            s: sum(r["state"] == s for r in results) for s in ("COMPLETE", "PRUNED", "FAIL")
        },
        "study_states": tuning.count_states(study),
        # tune.executor dask: {worker address: trials it ran} (empty with threads)
        "workers": dict(Counter(r["worker"] for r in results if r.get("worker"))),
        "marked_failed_from_killed_run": rerun,
        "best_trial": best.number if best else None,
        "best_val_loss": best.value if best else None,
        "best_values": best.user_attrs.get(tuning.VALUES_ATTR) if best else None,
        "best_is_baseline": bool(best and best.user_attrs.get("baseline")),
        "params_changed": changed,
        "mlflow_run": f"http://127.0.0.1:{plan['ui_port']}/#/experiments/{experiment}/runs/{parent_run_id}",
        "wall_s": round(time.monotonic() - started, 1),
        "error": error,
        "note": note,
        "new_study": new_study,
        "previous_study": previous,
    }


def _experiment_of(plan: dict, run_id: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient(plan["tracking_uri"]).get_run(run_id).info.experiment_id


def render(summary: dict[str, Any], markdown: bool = False) -> str:
    """The summary as text (printed) or Markdown (the Prefect artifact)."""
    best = (
        f"trial {summary['best_trial']}, val_loss {summary['best_val_loss']:.4f}"
        + (" (params.yaml's own values: no trial beat them)" if summary["best_is_baseline"] else "")
        if summary["best_trial"] is not None
        else "none (no trial completed)"
    )
    changed = summary["params_changed"]
    previous = summary.get("previous_study")
    lines = [
        f"Study {summary['study']} ({summary['family']}): {summary['study_states']} "
        f"(target {summary['target']} finished)",
        *(["A new study" + (f": {', '.join(previous[1]) or 'its settings'} differ from study "
                            f"{previous[0]}, whose trials do not count here" if previous else "")]
          if summary.get("new_study") else []),
        f"This run: {summary['ran_now']} trial(s) {summary['ran_now_states']}"
        + (f"; trials {summary['marked_failed_from_killed_run']} of a killed run marked FAIL"
           if summary["marked_failed_from_killed_run"] else ""),
        *([f"Dask workers: {len(summary['workers'])} ("
           + ", ".join(f"{w}: {n} trial(s)" for w, n in summary["workers"].items()) + ")"]
          if summary.get("workers") else []),
        f"Best: {best} {json.dumps(summary['best_values']) if summary['best_values'] else ''}",
        (f"params.yaml: {summary['note']}" if summary.get("note") else "params.yaml train: "
         + (", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()) or "unchanged")),
        f"MLflow: {summary['mlflow_run']} (make ui)",
        f"Wall time: {summary['wall_s']} s"
        + (f"; FAILED: {summary['error']}" if summary["error"] else ""),
    ]  # fmt: skip
    return "\n".join(f"- {line}" for line in lines) if markdown else "\n".join(lines)
