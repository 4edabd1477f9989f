"""``make tune``: an Optuna search over ``train`` params as a Prefect flow; the best goes back
into ``params.yaml``.

    python -m flows.tune [--repo .] [--trials N] [--parallel K] [--model FAMILY] [--wait]

The study (``stages.train.tuning``) is one per dataset and model family and lives in
``tune.storage``: ``--trials N`` is the number of finished (complete or pruned) trials the
study should hold, so a run that was killed resumes where it stopped (its RUNNING trials are
marked FAIL and run again) and a second ``make tune`` on the same data runs nothing new. Each
trial is a Prefect task that runs ``python -m stages.train.trial`` in its own process,
``--parallel`` (``tune.parallel``) at a time: threads of this process, or with ``tune.executor:
dask`` the workers of a Dask cluster (``flows.tune_dask``). The study has one MLflow run
(experiment ``<mlflow.experiment>-tune``) and each trial a child run under it. Then the best
trial's values are written into ``params.yaml``, comments kept; ``make run`` trains it.
``--model X`` other than ``train.model`` tunes X and prints its best without writing (the values
it shares with the current family, lr or dropout, would change that family's training);
``--switch`` writes ``model: X`` with them.

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

from flows import tune_dask
from flows.pipeline import (
    PREFECT_PORT,
    command_line,
    describe_failure,
    log_lines,
    prefect_servers,
    stage_env,
    use_prefect_api,
)
from flows.tune_report import end_dead_trials, finish_parent, parent_run, render, summarize
from stages.common import runlock, tracking
from stages.common.config import TrainParams, load_params
from stages.common.errors import ConfigError, PipelineError
from stages.train import tune_space, tune_write, tuning
from stages.train.trial import RESULT_PREFIX

SUMMARY_KEY = "tune-summary"
MAX_ROUNDS = 3  # failed trials are run again, in up to this many rounds in all
logger = logging.getLogger("flows.tune")


# --- before Prefect: what to tune, checked --------------------------------------------------


def plan_study(
    repo: Path,
    trials: int | None,
    parallel: int | None,
    model: str | None,
    switch: bool = False,
) -> dict:
    """Everything the flow needs, checked before anything starts (a plain dict for Prefect).

    Raises:
        PipelineError: bad params, no features yet, an empty space, a continuous range for the
            grid, a store down.
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
    if params.tune.sampler == "grid":  # checked here, not at load: it must not block make run
        continuous = [f"tune.space.{family}.{k}" for k, r in space.items() if not r.discrete]
        if continuous:
            raise ConfigError(
                f"params.yaml: tune.sampler grid needs choices, a step or integer: true; "
                f"{', '.join(continuous)} is a continuous range (or use tune.sampler tpe)"
            )
        target = min(target, tune_space.grid_size(space))  # each grid point once
    tracking.check_tracking_store(params.mlflow, repo)
    uri = tracking.tracking_uri(params.mlflow)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{(repo / uri.removeprefix('sqlite:///')).resolve()}"
    parallel = parallel or params.tune.parallel
    settings = tuning.study_settings(params, family)
    executor, address = params.tune.executor, params.tune.dask_address
    if executor == "dask":  # before resolve_storage creates the sqlite folder
        configured = os.environ.get(tuning.STORAGE_ENV) or params.tune.storage
        tune_dask.check_cluster(address, configured, uri)
    elif address:  # not at load: it must not block make run
        raise ConfigError(
            f"params.yaml: tune.dask_address {address} is set, but tune.executor is threads: "
            "set tune.executor: dask to run the trials on that cluster (or dask_address: null)"
        )
    return {
        "repo": str(repo.resolve()),
        "params_text": params_text,
        "family": family,
        "current_model": params.train.model,
        "switch": switch,
        "settings": settings,
        "study": tuning.study_name(params.ingest.source, family, repo / "data/features", settings),
        "storage": tuning.resolve_storage(params.tune.storage, repo),
        "target": target,
        "parallel": parallel,
        "executor": executor,
        "dask_address": address if executor == "dask" else None,
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
    """One trial: ``python -m stages.train.trial`` in its own process (started from a Dask
    worker with ``tune.executor: dask``: the result names it).

    Raises:
        RuntimeError: the trial failed (its own message: a bad value combination, a crash), or
            a Dask worker lacks the project at ``plan["repo"]``.
    """
    log = get_run_logger()
    worker = tune_dask.worker_name()
    if not Path(plan["repo"]).is_dir():
        raise RuntimeError(
            f"trial not started: {plan['repo']} is not on Dask worker {worker} "
            f"({os.uname().nodename}); workers need the project checked out at the same path"
        )
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
    where = f" on {worker}" if worker else ""
    log.info(
        "trial %d: %s (val_loss %s)%s",
        *(results[-1][k] for k in ("number", "state", "value")),
        where,
    )
    return {**results[-1], "worker": worker} if worker else results[-1]


def _run_rounds(plan: dict, study: Any, space: dict, parent_run_id: str) -> list[dict]:
    """Trials until the study holds ``target`` finished ones; failed trials run again (the
    grid: on their own points)."""
    log = get_run_logger()
    results: list[dict] = []
    for _ in range(MAX_ROUNDS):
        remaining = plan["target"] - tuning.finished_trials(study)
        if remaining <= 0:
            break
        if plan["sampler"] == "grid":
            tune_space.queue_grid_points(study, space, plan["seed"], remaining)
        first = tuning.started_trials(study)  # offsets each trial's sampler seed
        log.info("running %d trial(s), %d at a time", remaining, plan["parallel"])
        futures = [run_trial.submit(plan, parent_run_id, first + i) for i in range(remaining)]
        if plan["executor"] == "dask":  # a worker's death fails its trial, no hang
            done = tune_dask.collect(futures, log)
        else:
            wait(futures)
            done = [f.result(raise_on_failure=False) for f in futures]
        results += [r if isinstance(r, dict) else {"state": "FAIL", "error": str(r)} for r in done]
        end_dead_trials(plan, study)  # a trial whose process died (its worker) left RUNNING
        if all(isinstance(r, BaseException) for r in done):
            break  # every trial failed: another round would fail the same way
    return results


def _train(plan: dict) -> TrainParams:
    train = load_params(Path(plan["repo"]) / "params.yaml").train
    return train.model_copy(update={"model": plan["family"]})


def conclude(plan: dict, study: Any) -> tuple[dict[str, list[Any]], str | None, str | None]:
    """After the trials: the best values into params.yaml, when they belong there.

    Returns ``(changes, error, note)``: ``changes`` ``{key: [old, new]}``; ``error`` when the
    target was not reached, or it was and params.yaml could not be written (edited meanwhile);
    ``note`` when nothing was written by design (``--model`` another family, no ``--switch``).
    """
    finished, target = tuning.finished_trials(study), plan["target"]
    if finished < target:
        return {}, f"tuning did not reach its target: {finished} of {target} trials finished", None
    best = tuning.best_trial(study)
    if best is None:
        return {}, None, "unchanged: no trial completed (all pruned)"
    family, current = plan["family"], plan["current_model"]
    if family != current and not plan["switch"]:
        return (
            {},
            None,
            (
                f"unchanged: tuned {family}, but train.model is {current} (the shared values would "
                f"change its training); --switch writes model: {family} and the best values"
            ),
        )
    values = best.user_attrs.get(tuning.VALUES_ATTR, {})
    try:
        changes = tune_write.write_back(
            Path(plan["repo"]) / "params.yaml", family, values, plan["params_text"]
        )
    except PipelineError as exc:
        return (
            {},
            (
                f"tuning reached its target ({finished} trials finished), but params.yaml was "
                f"not written: {exc}"
            ),
            None,
        )
    return {key: [old, new] for key, (old, new) in changes.items()}, None, None


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
    previous = None
    if new_study := tuning.SETTINGS_ATTR not in study.user_attrs:
        study.set_user_attr(tuning.SETTINGS_ATTR, plan["settings"])
        previous = tuning.previous_study(storage, plan["study"], plan["settings"])
    if plan["sampler"] != "grid" and tune_space.enqueue_current(study, _train(plan), space):
        get_run_logger().info("trial 0 trains params.yaml's current values: the baseline")
    rerun = end_dead_trials(plan, study)
    parent_run_id = parent_run(plan, study)
    results: list[dict] = []
    try:
        results = _run_rounds(plan, study, space, parent_run_id)
    finally:
        short = tuning.finished_trials(study) < plan["target"]
        finish_parent(plan, parent_run_id, study, failed=short)
    changed, error, note = conclude(plan, study)
    summary = summarize(
        plan,
        study,
        results=results,
        rerun=rerun,
        changed=changed,
        parent_run_id=parent_run_id,
        error=error,
        note=note,
        new_study=new_study,
        previous=previous,
        started=started,
    )
    create_markdown_artifact(
        markdown=render(summary, markdown=True), key=SUMMARY_KEY, description="Tuning"
    )
    if error:
        raise PipelineError(f"{error}; see the trials' logs")
    return summary


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
    parser.add_argument(
        "--switch",
        action="store_true",
        help="with --model another family: write train.model and its best values",
    )
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
            update_features(repo)
            plan = plan_study(repo, args.trials, args.parallel, args.model, args.switch)
        except PipelineError as exc:
            print(f"Tuning not started: {exc}", file=sys.stderr)
            return 1
        use_prefect_api(args.prefect_port, held)
        if plan["executor"] == "dask":
            tune_dask.prepare_workers(plan, held)
        runner = (
            tune_dask.task_runner(plan)
            if plan["executor"] == "dask"
            else ThreadPoolTaskRunner(max_workers=plan["parallel"])
        )
        try:
            summary = tune.with_options(task_runner=runner)(plan)
        except Exception as exc:  # the flow run is Failed; Prefect logged the details
            print(f"\nTuning failed: {exc}", file=sys.stderr)
            return 1
    print("\n" + render(summary))
    return 0


def update_features(repo: Path) -> None:
    """In a project (``dvc.yaml``), bring ``data/features`` up to date first: ``dvc repro
    features`` runs what changed up to the splits (ingest asks the source again), so a study
    never tunes on stale or missing splits. It is the same stage graph ``make run`` runs.

    Raises:
        PipelineError: a stage up to features failed (its output's tail is in the message).
    """
    if not (repo / "dvc.yaml").is_file():
        return
    logger.info("bringing data/features up to date: dvc repro features")
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "features"],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        raise PipelineError("dvc repro features failed:\n" + "\n".join(tail))


def _setup_logging() -> None:
    for name in (
        "flows.tune",
        "flows.pipeline",
        "stages.train.tuning",
        "stages.train.tune_liveness",
    ):
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
