"""``make tune``: an Optuna search over ``train`` params as a Prefect flow; the best goes back
into ``params.yaml``.

    python -m flows.tune [--repo .] [--trials N] [--parallel K] [--model FAMILY] [--wait]

The study (``stages.train.tuning``) is one per dataset and model family and lives in
``tune.storage``: ``--trials N`` is the number of finished (complete or pruned) trials the
study should hold, so a run that was killed resumes where it stopped (its RUNNING trials are
marked FAIL and run again) and a second ``make tune`` on the same data runs nothing new. Each
trial is a Prefect task that runs ``python -m stages.train.trial`` in its own process,
``--parallel`` (``tune.parallel``) at a time. The study has one MLflow run (experiment
``<mlflow.experiment>-tune``) and each trial a child run under it. Then the best trial's values
(and ``train.model``) are written into ``params.yaml``, comments kept; ``make run`` trains it.

The workspace's run lock is held throughout, as ``make run`` holds it: the two never overlap,
and the trials of a killed run are gone before the next one starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from flows.pipeline import (
    PREFECT_PORT,
    command_line,
    describe_failure,
    log_lines,
    prefect_servers,
    stage_env,
    use_prefect_api,
)
from stages.common import runlock, tracking
from stages.common.config import TrainParams, load_params
from stages.common.errors import ConfigError, PipelineError
from stages.common.redact import redact_url
from stages.train import tuning
from stages.train.trial import RESULT_PREFIX

SUMMARY_KEY = "tune-summary"
MAX_ROUNDS = 3  # failed trials are run again, in up to this many rounds in all
logger = logging.getLogger("flows.tune")


# --- before Prefect: what to tune, checked --------------------------------------------------


def plan_study(repo: Path, trials: int | None, parallel: int | None, model: str | None) -> dict:
    """Everything the flow needs, checked before anything starts (a plain dict for Prefect).

    Raises:
        PipelineError: bad params, no features yet, an empty or non-grid space, a store down.
    """
    params_file = repo / "params.yaml"
    params_text = params_file.read_text(encoding="utf-8") if params_file.is_file() else None
    params = load_params(params_file)
    family = model or params.train.model
    try:  # the family's own settings must hold (rnn needs sequence_length, cnn image_shape)
        TrainParams.model_validate({**params.train.model_dump(), "model": family})
    except ValueError as exc:
        raise ConfigError(f"params.yaml: train.model {family}: {exc}") from exc
    space = params.tune.space.get(family)
    if not space:
        raise ConfigError(f"params.yaml: tune.space.{family}: no ranges to search for {family}")
    target = trials or params.tune.trials
    if params.tune.sampler == "grid":
        target = min(target, tuning.grid_size(space))  # each grid point once
    tracking.check_tracking_store(params.mlflow, repo)
    uri = tracking.tracking_uri(params.mlflow)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{(repo / uri.removeprefix('sqlite:///')).resolve()}"
    parallel = parallel or params.tune.parallel
    return {
        "repo": str(repo.resolve()),
        "params_text": params_text,
        "family": family,
        "study": tuning.study_name(params.ingest.source, family, repo / "data/features"),
        "storage": tuning.resolve_storage(params.tune.storage, repo),
        "target": target,
        "parallel": parallel,
        "threads": max(1, (os.cpu_count() or 1) // parallel),
        "sampler": params.tune.sampler,
        "pruner": params.tune.pruner,
        "max_epochs": min(params.train.max_epochs, params.tune.max_epochs or 10**9),
        "seed": params.base.seed,
        "tracking_uri": uri,
        "experiment": f"{params.mlflow.experiment}-tune",
        "ui_port": params.mlflow.ui_port,
    }


# --- the flow --------------------------------------------------------------------------------


@task(cache_policy=NO_CACHE, task_run_name="trial-{index}")
def run_trial(plan: dict, parent_run_id: str, index: int) -> dict[str, Any]:
    """One trial: ``python -m stages.train.trial`` in its own process.

    Raises:
        RuntimeError: the trial failed (its own message: a bad value combination, a crash).
    """
    log = get_run_logger()
    command = [
        sys.executable, "-m", "stages.train.trial",
        "--params", "params.yaml", "--features", "data/features",
        "--study", plan["study"], "--storage", plan["storage"],
        "--parent-run-id", parent_run_id, "--tracking-uri", plan["tracking_uri"],
        "--model", plan["family"], "--trial-index", str(index),
        "--trials", str(plan["target"]), "--threads", str(plan["threads"]),
    ]  # fmt: skip
    lines: list[str] = []
    with subprocess.Popen(
        command,
        cwd=plan["repo"],
        env=stage_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        pass_fds=runlock.inherited_fds(),  # the next run waits for a trial a kill left behind
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if not line.startswith(RESULT_PREFIX):
                log_lines([lines[-1]], log)
    results = [
        json.loads(x.removeprefix(RESULT_PREFIX)) for x in lines if x.startswith(RESULT_PREFIX)
    ]
    if proc.returncode != 0 or not results:
        raise RuntimeError(f"trial failed: {describe_failure(lines)[0]}")
    log.info("trial %(number)d: %(state)s (val_loss %(value)s)", results[-1])
    return results[-1]


def _end_dead_trials(plan: dict, study: Any) -> list[int]:
    """Mark the trials a killed run left RUNNING FAIL, their MLflow runs KILLED."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(plan["tracking_uri"])
    failed = tuning.fail_dead_trials(study)
    for trial in failed:
        if run_id := trial.user_attrs.get(tuning.RUN_ATTR):
            try:
                client.set_tag(run_id, "optuna.state", "FAIL")
                client.set_terminated(run_id, "KILLED")
            except MlflowException:  # another tracking store
                pass
    return [trial.number for trial in failed]


def _parent_run(plan: dict, study: Any) -> str:
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
    settings = load_params(Path(plan["repo"]) / "params.yaml").mlflow
    os.environ["MLFLOW_TRACKING_URI"] = plan["tracking_uri"]  # configure_mlflow reads it
    experiment_id = tracking.configure_mlflow(
        settings.model_copy(update={"experiment": plan["experiment"]})
    )
    run = client.create_run(experiment_id, run_name=f"tune {plan['study']}", tags=tags)
    study.set_user_attr(tuning.PARENT_RUN_ATTR, run.info.run_id)
    return run.info.run_id


def _finish_parent(plan: dict, run_id: str, study: Any, failed: bool) -> None:
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


def _run_rounds(plan: dict, study: Any, parent_run_id: str) -> list[dict]:
    """Trials until the study holds ``target`` finished ones; failed trials run again."""
    log = get_run_logger()
    results: list[dict] = []
    for _ in range(MAX_ROUNDS):
        remaining = plan["target"] - tuning.finished_trials(study)
        if remaining <= 0:
            break
        first = tuning.started_trials(study)  # offsets each trial's sampler seed
        log.info("running %d trial(s), %d at a time", remaining, plan["parallel"])
        futures = [run_trial.submit(plan, parent_run_id, first + i) for i in range(remaining)]
        wait(futures)
        done = [f.result(raise_on_failure=False) for f in futures]
        results += [r if isinstance(r, dict) else {"state": "FAIL", "error": str(r)} for r in done]
        if all(isinstance(r, BaseException) for r in done):
            break  # every trial failed: another round would fail the same way
    return results


def _train(plan: dict) -> TrainParams:
    train = load_params(Path(plan["repo"]) / "params.yaml").train
    return train.model_copy(update={"model": plan["family"]})


def _write_back(plan: dict, study: Any) -> dict[str, list[Any]]:
    best = tuning.best_trial(study)
    if best is None:
        return {}
    params_file = Path(plan["repo"]) / "params.yaml"
    values = best.user_attrs.get(tuning.VALUES_ATTR, {})
    changes = tuning.write_back(params_file, plan["family"], values, plan["params_text"])
    return {key: [old, new] for key, (old, new) in changes.items()}


@flow(name="tune")
def tune(plan: dict) -> dict[str, Any]:
    """Run the study to its target, write the best values back, publish the summary."""
    started = time.monotonic()
    servers = prefect_servers()  # a temporary Prefect server must not outlive a killed run
    runlock.update_holder(plan["repo"], helpers=servers)
    runlock.stop_helpers_with_me(servers)
    tuning.quiet_optuna()
    storage = tuning.open_storage(plan["storage"])
    space = load_params(Path(plan["repo"]) / "params.yaml").tune.space[plan["family"]]
    study = tuning.open_study(
        plan["study"],
        storage,
        tuning.make_sampler(plan["sampler"], space, plan["seed"]),
        tuning.make_pruner(plan["pruner"], plan["max_epochs"], plan["target"]),
    )
    if plan["sampler"] != "grid" and tuning.enqueue_current(study, _train(plan), space):
        get_run_logger().info("trial 0 trains params.yaml's current values: the baseline")
    rerun = _end_dead_trials(plan, study)
    parent_run_id = _parent_run(plan, study)
    results, error, changed = [], None, {}
    try:
        results = _run_rounds(plan, study, parent_run_id)
        if tuning.finished_trials(study) < plan["target"]:
            error = f"{tuning.finished_trials(study)} of {plan['target']} trials finished"
        else:
            try:
                changed = _write_back(plan, study)
            except PipelineError as exc:  # params.yaml edited meanwhile: the values printed
                error = str(exc)
    finally:
        _finish_parent(plan, parent_run_id, study, failed=error is not None)
    summary = _summarize(plan, study, results, rerun, changed, parent_run_id, error, started)
    create_markdown_artifact(
        markdown=render(summary, markdown=True), key=SUMMARY_KEY, description="Tuning"
    )
    if error:
        raise PipelineError(f"tuning did not reach its target: {error}; see the trials' logs")
    return summary


def _summarize(
    plan: dict,
    study: Any,
    results: list[dict],
    rerun: list[int],
    changed: dict,
    parent_run_id: str,
    error: str | None,
    started: float,
) -> dict[str, Any]:
    best = tuning.best_trial(study)
    experiment = study_experiment_id(plan, parent_run_id)
    return {
        "study": plan["study"],
        "family": plan["family"],
        "target": plan["target"],
        "ran_now": len(results),
        "ran_now_states": {
            s: sum(r["state"] == s for r in results) for s in ("COMPLETE", "PRUNED", "FAIL")
        },
        "study_states": tuning.count_states(study),
        "marked_failed_from_killed_run": rerun,
        "best_trial": best.number if best else None,
        "best_val_loss": best.value if best else None,
        "best_values": best.user_attrs.get(tuning.VALUES_ATTR) if best else None,
        "best_is_baseline": bool(best and best.user_attrs.get("baseline")),
        "params_changed": changed,
        "mlflow_run": f"http://127.0.0.1:{plan['ui_port']}/#/experiments/{experiment}/runs/{parent_run_id}",
        "wall_s": round(time.monotonic() - started, 1),
        "error": error,
    }


def study_experiment_id(plan: dict, run_id: str) -> str:
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
    lines = [
        f"Study {summary['study']} ({summary['family']}): {summary['study_states']} "
        f"(target {summary['target']} finished)",
        f"This run: {summary['ran_now']} trial(s) {summary['ran_now_states']}"
        + (f"; trials {summary['marked_failed_from_killed_run']} of a killed run marked FAIL"
           if summary["marked_failed_from_killed_run"] else ""),
        f"Best: {best} {json.dumps(summary['best_values']) if summary['best_values'] else ''}",
        "params.yaml train: "
        + (", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()) or "unchanged"),
        f"MLflow: {summary['mlflow_run']} (make ui)",
        f"Wall time: {summary['wall_s']} s"
        + (f"; FAILED: {summary['error']}" if summary["error"] else ""),
    ]  # fmt: skip
    return "\n".join(f"- {line}" for line in lines) if markdown else "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Tune, then print the summary; exit 1 when tuning could not start or failed."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.tune",
        description="Optuna search over params.yaml train values (tune section); writes the "
        "best trial's values back into params.yaml.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--repo", default=".", help="project checkout (params.yaml, data/)")
    parser.add_argument("--trials", type=int, help="finished trials the study should hold")
    parser.add_argument("--parallel", type=int, help="trials at a time (default tune.parallel)")
    parser.add_argument("--model", help="family to tune (default train.model)")
    parser.add_argument("--prefect-port", type=int, default=PREFECT_PORT, help=argparse.SUPPRESS)
    runlock.add_wait_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("trials", "parallel"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    _setup_logging()
    repo = Path(args.repo)
    with ExitStack() as held:
        try:
            wait_s = args.wait_timeout if args.wait else 0.0
            held.enter_context(runlock.run_lock(repo, wait_s=wait_s, command=command_line()))
            plan = plan_study(repo, args.trials, args.parallel, args.model)
        except PipelineError as exc:
            print(f"Tuning not started: {exc}", file=sys.stderr)
            return 1
        use_prefect_api(args.prefect_port, held)
        runner = ThreadPoolTaskRunner(max_workers=plan["parallel"])
        try:
            summary = tune.with_options(task_runner=runner)(plan)
        except Exception as exc:  # the flow run is Failed; Prefect logged the details
            print(f"\nTuning failed: {exc}", file=sys.stderr)
            return 1
    print("\n" + render(summary))
    return 0


def _setup_logging() -> None:
    for name in ("flows.tune", "flows.pipeline", "stages.train.tuning"):
        log = logging.getLogger(name)
        if not log.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(
                logging.Formatter(
                    "%(asctime)s | %(levelname)-7s | %(name)s - %(message)s", "%H:%M:%S"
                )
            )
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            log.propagate = False


if __name__ == "__main__":
    raise SystemExit(main())
