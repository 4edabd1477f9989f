"""Train: fit the model family ``train.model`` names with early stopping, log it all to MLflow.

The networks (mlp, transformer for tables, cnn for images, rnn for windows of a series) train
in ``loop.train_model`` and are saved as ``models/model.pt``; gbdt (scikit-learn's
HistGradientBoosting, ``gbdt.run_gbdt``) boosts on the same fitted preprocessor's tree view of
the rows (NaN kept, categories native), one history row per ``train.gbdt.rounds_per_epoch``
rounds, and is saved as ``models/model.skops``. Either way
the history CSV, the MLflow run and ``run.json`` look the same to the later stages.

``run`` reads top to bottom: config -> device/dtype/seed -> data -> model -> resume ->
optimizer + loop -> checkpoint. The loop (``loop.train_model``) is pure: tensors in, best
weights and history out; the MLflow run (``mlflow_run``), the resume checkpoints and the
outputs are ``run``'s job.

    python -m stages.train --features data/features --validation-report reports/validation \
        --out models --history reports/train/history.csv

With ``train.nproc`` > 1 (or several GPUs visible) the stage re-launches itself under torchrun
(DDP: one process per GPU, gloo on CPU); rank 0 alone talks to MLflow and writes outputs. A
killed run resumes from its last checkpoint in ``--resume-dir`` when started again.

With ``train.nnodes`` > 1 this machine (the main node, whose workspace DVC records) hosts
torchrun's c10d rendezvous at ``train.rdzv_endpoint`` and waits for the other machines, each
running ``python -m stages.train.node`` (``make train-node``) with the same checkout, params and
data; local rank 0 of this node alone writes (``distributed.DistInfo.is_main``).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from model.files import NETWORK_FILE, PREPROCESSOR_FILE
from model.nets import build_network, select_device
from model.preprocess import FittedPreprocessor, load_preprocessor
from stages.common import integrity, tracking
from stages.common.cli import build_parser, run_main
from stages.common.config import Params, TrainParams
from stages.common.errors import ConfigError
from stages.common.io import atomic_path, write_text
from stages.train import distributed
from stages.train.batches import StreamedTrainData, load_train_data
from stages.train.checkpoint import (
    GracefulStop,
    ResumeStore,
    TrainingInterrupted,
    hash_files,
    open_resume,
)
from stages.train.distributed import DistInfo, Rendezvous
from stages.train.gbdt import GbdtResult, run_gbdt
from stages.train.loop import TrainResult, seed_torch, train_model
from stages.train.mlflow_run import TrainingRun, history_csv, sequence_steps, training_run
from stages.train.training import resolve_precision

logger = logging.getLogger(__name__)

DEFAULT_RESUME_DIR = ".resume/train"  # outside every DVC output: `dvc repro` leaves it alone
RDZV_ID_ENV = "TRAIN_RDZV_ID"  # several nodes: the job id, when not derived from params + data


@dataclass(frozen=True)
class _Paths:
    features: Path
    validation_report: Path
    out: Path  # model.pt + run.json
    history: Path
    params_file: str | Path | None  # the params.yaml the params came from


def run(
    features_dir: str | Path,
    validation_report: str | Path,
    out_dir: str | Path,
    history_path: str | Path,
    params: Params,
    *,
    resume_dir: str | Path = DEFAULT_RESUME_DIR,
    resume: bool = True,
    params_file: str | Path | None = None,
) -> TrainResult | GbdtResult:
    """Train on ``features_dir``; write ``out_dir/model.pt`` (``model.skops`` for gbdt) +
    ``run.json`` and the history.

    Everything is logged to one MLflow run (params, config, per-epoch metrics, dataset inputs,
    the validation report). A failure ends that run FAILED and writes no output; SIGTERM ends
    it KILLED after a checkpoint. A re-run resumes from ``resume_dir`` (unless ``resume`` is
    False) and continues the same MLflow run. Under torchrun every rank calls this; only
    rank 0 logs and writes. ``params_file`` (the one ``params`` came from) and dvc.lock are
    logged under ``lineage/``, so that ``flows.reproduce`` can rebuild the run.
    """
    paths = _Paths(
        Path(features_dir), Path(validation_report), Path(out_dir), Path(history_path), params_file
    )
    if params.train.model == "gbdt":
        return run_gbdt(
            params,
            paths.features,
            paths.validation_report,
            paths.out,
            paths.history,
            params_file=paths.params_file,
        )
    dist = distributed.current()
    with GracefulStop() as stop:
        # config (the params arrive resolved; the preprocessor defines the inputs and classes)
        preprocessor = load_preprocessor(paths.features / PREPROCESSOR_FILE)
        # device / dtype / seed
        device = distributed.setup(dist, select_device(params.base.device))
        try:
            seed_torch(params.base.seed, device)
            resolve_precision(params.train.precision, device)  # a bad choice fails before I/O
            # data
            data, splits = load_train_data(paths.features, preprocessor, params.train, device)
            # model (rnn: the columns must split into equal steps; the error names them)
            sequence_steps(preprocessor, params.train)
            n_features, n_classes = preprocessor.n_features, len(preprocessor.classes)
            network = build_network(params.train, n_features, n_classes).to(device)
            # resume state
            streamed = isinstance(data, StreamedTrainData)
            store, ckpt = open_resume(
                resume_dir, params, paths.features, device, streamed, dist, resume
            )
            if params.train.nnodes > 1:
                # The other machines hold no resume checkpoint (the main node writes it), or
                # a stale one: every rank takes the main node's. Also checks one writer.
                ckpt = distributed.share_from_main(ckpt, dist, device)
            # optimizer + loop: every rank trains; the main rank alone logs and writes outputs
            fit = functools.partial(
                train_model,
                network,
                data,
                params.train,
                device,
                params.base.seed,
                dist=dist,
                store=store,
                resume=ckpt,
                stop=stop,
            )
            if not dist.is_main:
                return fit()
            logger.info(
                "training %s (%d features -> %d classes) on %s x%d, %d val rows",
                params.train.model,
                n_features,
                n_classes,
                device,
                dist.world_size,
                len(data.X_val),
            )
            return _train_tracked(
                fit, params, preprocessor, splits, ckpt, store, stop, paths, device, dist
            )
        finally:
            distributed.teardown(dist)


def _train_tracked(
    fit: Callable[..., TrainResult],
    params: Params,
    preprocessor: FittedPreprocessor,
    splits: dict[str, pd.DataFrame],
    ckpt: dict[str, Any] | None,
    store: ResumeStore,
    stop: GracefulStop,
    paths: _Paths,
    device: torch.device,
    dist: DistInfo,
) -> TrainResult:
    """Rank 0: the loop inside one MLflow run that never stays RUNNING, then the outputs."""
    # The params file as the stage read it (stages.common.cli.run_main took it): logged under
    # lineage/, and compared with the file before any output is written.
    snapshot = integrity.snapshot_for(paths.params_file) if paths.params_file is not None else None
    with training_run(
        params,
        ckpt,
        preprocessor=preprocessor,
        splits=splits,
        features_dir=paths.features,
        validation_report=paths.validation_report,
        params_file=paths.params_file,
        params_text=snapshot.text if snapshot is not None else None,
        device=device,
        world_size=dist.world_size,
    ) as mlrun:
        result = fit(on_epoch=mlrun.log_epoch, checkpoint_extra={"run_id": mlrun.run_id})
        if stop.requested:  # a signal during the last epoch's scoring: its checkpoint is saved
            raise TrainingInterrupted(
                f"training stopped by {stop.signal_name} after the last "
                "epoch; run the stage again to write the outputs"
            )
        # checkpoint + history (logged first, written last: a failure above writes nothing)
        history = history_csv(result.history)
        mlrun.log_results(result.best_epoch, result.best_val_loss, history, paths.validation_report)
        if snapshot is not None:  # params.yaml edited while training: no output, run FAILED
            snapshot.check_unchanged("train")
        _save_model(paths.out, final_checkpoint(result, params.train, preprocessor), mlrun)
        write_text(paths.history, history)
    store.clear()  # done: a new run with these params and data starts fresh
    logger.info(
        "best epoch %d (val_loss %.4f) of %d; wrote %s and %s",
        result.best_epoch,
        result.best_val_loss,
        len(result.history),
        paths.out / NETWORK_FILE,
        paths.history,
    )
    return result


def final_checkpoint(
    result: TrainResult, train: TrainParams, preprocessor: FittedPreprocessor
) -> dict[str, Any]:
    """What model.pt holds: the best weights and what rebuilding the network needs (also
    what ``stages.train.members`` saves for an ensemble member, so both load alike)."""
    return {
        "state_dict": result.state_dict,
        "train_params": train.model_dump(mode="json"),
        "n_features": preprocessor.n_features,
        "n_classes": len(preprocessor.classes),
        "epoch": result.best_epoch,
        "val_loss": result.best_val_loss,
    }


def _save_model(out_dir: Path, checkpoint: dict[str, Any], mlrun: TrainingRun) -> None:
    # One atomic swap of the whole folder: model.pt and run.json always belong together.
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        torch.save(checkpoint, tmp / NETWORK_FILE)
        tracking.save_run_info(tmp, mlrun.run_id, mlrun.experiment_id)


def job_id(params: Params, features_dir: str | Path) -> str:
    """The rendezvous id of a several-node training: ``TRAIN_RDZV_ID``, else a hash of the
    train params, seed, device and the features files, so that every node derives the same
    one, and a node with other params or data (no ``dvc pull``) cannot join the job."""
    if given := os.environ.get(RDZV_ID_ENV, "").strip():
        return given
    config = {
        "train": params.train.model_dump(mode="json"),
        "seed": params.base.seed,
        "device": params.base.device,
    }
    features = Path(features_dir)
    try:
        data = hash_files(
            [features / name for name in ("train.parquet", "val.parquet", PREPROCESSOR_FILE)]
        )
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{exc.filename}: the features this node trains on are missing: run `dvc pull` "
            "(or the pipeline up to the features stage) in this checkout first"
        ) from exc
    text = json.dumps(config, sort_keys=True) + data
    return "train-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def rendezvous_for(params: Params, features_dir: str | Path, *, main: bool) -> Rendezvous:
    """This node's place in the several-node job ``params.train`` describes.

    Raises:
        ConfigError: no endpoint, or (main node) an endpoint that is not this machine.
    """
    endpoint = params.train.rdzv_endpoint
    if endpoint is None:  # params validation already requires it with nnodes > 1
        raise ConfigError("train.rdzv_endpoint: unset; several nodes need host:port")
    if main:
        distributed.check_main_endpoint(endpoint)
    return Rendezvous(
        params.train.nnodes,
        endpoint,
        job_id(params, features_dir),
        main,
        distributed.join_timeout_s(),
    )


def build_train_parser() -> argparse.ArgumentParser:
    """The stage's options (``stages.train.node`` reads dvc.yaml's train cmd with it)."""
    parser = build_parser("train", "Train the network with early stopping; log to MLflow.")
    parser.add_argument("--features", required=True, help="features folder (features stage)")
    parser.add_argument(
        "--validation-report",
        required=True,
        help="validation report folder, logged to MLflow under validation/",
    )
    parser.add_argument(
        "--out", required=True, help="model folder: model.pt (or model.skops) + run.json"
    )
    parser.add_argument("--history", required=True, help="per-epoch history CSV")
    parser.add_argument(
        "--resume-dir",
        default=DEFAULT_RESUME_DIR,
        help="resume checkpoints (kept out of DVC outputs; removed on success)",
    )
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="discard this training's resume checkpoint and start over",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stages.train --features DIR --validation-report DIR --out DIR --history F``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_train_parser()

    def body(args: argparse.Namespace, params: Params) -> None:
        nproc = distributed.resolve_nproc(params.train.nproc, params.base.device)
        if not distributed.current().enabled:
            if params.train.nnodes > 1:  # this is the main node: host the job, wait for all
                rdzv = rendezvous_for(params, args.features, main=True)
                distributed.launch_torchrun(nproc, "stages.train", argv, rdzv)
                return
            if nproc > 1:
                distributed.launch_torchrun(nproc, "stages.train", argv)
                return
        run(
            args.features,
            args.validation_report,
            args.out,
            args.history,
            params,
            resume_dir=args.resume_dir,
            resume=not args.no_resume,
            params_file=args.params,
        )

    return run_main("train", parser, body, argv)
