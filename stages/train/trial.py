"""One tuning trial in its own process: ask the study, train as the stage does, tell.

    python -m stages.train.trial --study NAME --storage URL --features data/features \
        --parent-run-id ID --tracking-uri URI [--model FAMILY] [--trial-index N] \
        [--trials N] [--threads N] [--params params.yaml]

Reads params.yaml, asks the study (``stages.train.tuning``) for values, sets them on
``train`` (``tune.max_epochs`` caps the epochs) and trains with the stage's own code: the torch
families with ``loop.train_model`` on ``build_network``, gbdt with ``gbdt.fit_gbdt_splits``. Each
epoch's val loss goes to ``trial.report``; a trial the pruner stops is told PRUNED. Only the
train and val splits are read, never test. The trial's MLflow run is a child of the study's
run (tag ``mlflow.parentRunId``), with the values, the per-epoch curve and the state. The last
stdout line is ``TRIAL_RESULT {json}``: number, state, value (the flow reads it).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from model.files import PREPROCESSOR_FILE
from stages.common.cli import build_parser, run_main
from stages.common.config import Params, TrainParams
from stages.common.errors import PipelineError
from stages.common.io import read_parquet
from stages.train import tune_liveness, tuning

logger = logging.getLogger(__name__)

RESULT_PREFIX = "TRIAL_RESULT "
STATE_TAG = "optuna.state"  # COMPLETE | PRUNED | FAIL on the trial's MLflow run
EpochHook = Callable[[dict[str, float]], None]


class TrialStopped(PipelineError):
    """SIGTERM/SIGINT (the flow was stopped): the trial is told FAIL, its run KILLED."""


@dataclass(frozen=True)
class TrialSetup:
    """Where the trial's study and runs live, and how it runs (the command line)."""

    study: str
    storage: str
    features: Path
    parent_run_id: str
    tracking_uri: str
    model: str | None = None
    trial_index: int = 0  # offsets the sampler's seed (tuning.make_sampler)
    trials: int = 20
    threads: int | None = None


# --- training with the stage's code --------------------------------------------------------


def fit(train: TrainParams, features: Path, params: Params, on_epoch: EpochHook) -> float:
    """Train ``train.model`` on the train split, scored on val; return the best val loss.

    The data is read as the stage reads it (gbdt: the preprocessor's tree view of the rows;
    a network: on the device when it fits or as ``train.data_on_device`` says, else streamed
    from Parquet), the test split never.
    """
    from model.preprocess import load_preprocessor

    preprocessor = load_preprocessor(features / PREPROCESSOR_FILE)
    if train.model == "gbdt":
        from stages.train.gbdt import fit_gbdt_splits

        splits = {name: read_parquet(features / f"{name}.parquet") for name in ("train", "val")}
        result = fit_gbdt_splits(splits, preprocessor, train, params.base.seed, on_epoch)
        return float(result.best_val_loss)
    return _fit_network(train, features, preprocessor, params, on_epoch)


def _fit_network(
    train: TrainParams, features: Path, preprocessor: Any, params: Params, hook: EpochHook
) -> float:
    from model.nets import build_network, select_device
    from stages.train.batches import load_train_data
    from stages.train.loop import seed_torch, train_model

    device = select_device(params.base.device)
    seed_torch(params.base.seed, device)  # the stage's seed: the best trial trains the same
    data, _ = load_train_data(features, preprocessor, train, device, with_test=False)
    network = build_network(train, preprocessor.n_features, len(preprocessor.classes))
    result = train_model(network.to(device), data, train, device, params.base.seed, on_epoch=hook)
    return float(result.best_val_loss)


# --- the trial -----------------------------------------------------------------------------


def _flat(prefix: str, value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        return {
            k: v for key, item in value.items() for k, v in _flat(f"{prefix}.{key}", item).items()
        }
    return {prefix: str(value)}


def _child_run(setup: TrialSetup, number: int, train: TrainParams, values: dict) -> str:
    """The trial's MLflow run under the study's, described with its params."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient(tracking_uri=setup.tracking_uri)
    parent = client.get_run(setup.parent_run_id)
    run = client.create_run(
        parent.info.experiment_id,
        run_name=f"trial {number}",
        tags={
            "mlflow.parentRunId": setup.parent_run_id,
            "optuna.study": setup.study,
            "optuna.trial": str(number),
        },
    )
    flat = {**_flat("train", train.model_dump(mode="json")), **_flat("tuned", values)}
    client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in flat.items()])
    return run.info.run_id


def _on_epoch(trial: optuna.Trial, metrics: Any) -> EpochHook:
    def hook(row: dict[str, float]) -> None:
        epoch = int(row["epoch"])
        metrics.add({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
        trial.report(float(row["val_loss"]), epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch} (val_loss {row['val_loss']:.4f})")

    return hook


def run_trial(setup: TrialSetup, params: Params) -> dict[str, Any]:
    """Ask, train, tell; return ``{"number", "state", "value"}``.

    Raises:
        PipelineError: the trial failed (told FAIL first, its MLflow run FAILED or KILLED).
    """
    import mlflow

    from stages.common.tracking import MetricBuffer

    family = setup.model or params.train.model
    space = params.tune.space.get(family) or {}
    cap = params.tune.max_epochs
    storage = tuning.open_storage(setup.storage)
    study = optuna.load_study(
        study_name=setup.study,
        storage=storage,
        sampler=tuning.make_sampler(
            params.tune.sampler, space, params.base.seed, setup.trial_index
        ),
        pruner=tuning.make_pruner(
            params.tune.pruner, min(params.train.max_epochs, cap or 10**9), setup.trials
        ),
    )
    trial = tuning.ask(study, setup.storage)
    trial.set_user_attr(tuning.PROCESS_ATTR, tune_liveness.process_identity())
    heartbeat = tune_liveness.start_heartbeat(storage, trial._trial_id)
    mlflow.set_tracking_uri(setup.tracking_uri)  # MetricBuffer logs through the global client
    client, run_id, state = mlflow.MlflowClient(setup.tracking_uri), None, TrialState.FAIL
    try:
        base = params.train.model_copy(update={"model": family})
        train, values = tuning.apply_values(base, tuning.suggest(trial, space), cap)
        trial.set_user_attr(tuning.VALUES_ATTR, values)
        run_id = _child_run(setup, trial.number, train, values)
        trial.set_user_attr(tuning.RUN_ATTR, run_id)  # a killed trial's run is ended later
        metrics = MetricBuffer(run_id, every_s=2.0)
        logger.info("trial %d: %s", trial.number, json.dumps(values))
        try:
            value = fit(train, setup.features, params, _on_epoch(trial, metrics))
        finally:
            metrics.flush()
        study.tell(trial, value)
        state = TrialState.COMPLETE
        client.log_metric(run_id, "best_val_loss", value)
        return {"number": trial.number, "state": state.name, "value": value}
    except optuna.TrialPruned as exc:
        study.tell(trial, state=TrialState.PRUNED)
        state = TrialState.PRUNED
        logger.info("trial %d: %s", trial.number, exc)
        return {"number": trial.number, "state": state.name, "value": None}
    except BaseException as exc:
        trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}"[:2000])
        study.tell(trial, state=TrialState.FAIL)
        if isinstance(exc, PipelineError):
            raise PipelineError(f"trial {trial.number}: {exc}") from exc
        raise
    finally:
        heartbeat.set()
        if run_id is not None:
            client.set_tag(run_id, STATE_TAG, state.name)
            status = {TrialState.FAIL: "FAILED"}.get(state, "FINISHED")
            if state == TrialState.FAIL and isinstance(sys.exc_info()[1], TrialStopped):
                status = "KILLED"
            client.set_terminated(run_id, status)


def _stop_on_signals() -> None:
    def stop(signum: int, _frame: Any) -> None:
        raise TrialStopped(f"stopped by {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stages.train.trial --study NAME --storage URL ...`` (see the module doc)."""
    parser = build_parser("train.trial", "One tuning trial: ask the study, train, tell.")
    parser.add_argument("--study", required=True, help="Optuna study name")
    parser.add_argument("--storage", required=True, help="Optuna storage URL")
    parser.add_argument("--features", default="data/features", help="features folder")
    parser.add_argument("--parent-run-id", required=True, help="the study's MLflow run")
    parser.add_argument("--tracking-uri", required=True, help="MLflow tracking URI")
    parser.add_argument("--model", help="family to tune (default: train.model)")
    parser.add_argument(
        "--trial-index", type=int, default=0, help="offsets the sampler's seed per trial"
    )
    parser.add_argument("--trials", type=int, default=20, help="the study's target trial count")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")

    def body(args: argparse.Namespace, params: Params) -> None:
        _stop_on_signals()
        tuning.quiet_optuna()
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        setup = TrialSetup(
            args.study,
            args.storage,
            Path(args.features),
            args.parent_run_id,
            args.tracking_uri,
            args.model,
            args.trial_index,
            args.trials,
            args.threads,
        )
        result = run_trial(setup, params)
        sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")  # the flow reads it
        sys.stdout.flush()

    return run_main("train.trial", parser, body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
