"""Join a several-node training from another machine: ``python -m stages.train.node``
(``make train-node``).

With ``train.nnodes`` > 1 the train stage runs on one machine (the main node: DVC runs it
there and records its workspace) and waits at ``train.rdzv_endpoint`` for the others. On each
other machine, in the same checkout with the same ``params.yaml`` and data (``dvc pull``), this
command starts the same torchrun job: the arguments are dvc.yaml's train ``cmd``, the job id is
derived from the params and data as the main node derives it. Its ranks train but write
nothing (no model, report, MLflow run or checkpoint: the main node's local rank 0 does), and it
exits when the job ends, with the job's outcome.

    python -m stages.train.node [--params params.yaml] [--dvc-file dvc.yaml]

It is not a DVC stage (it runs by hand, beside ``dvc repro`` on the main node), so nothing in
dvc.yaml runs or depends on it.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from stages.common.config import load_params
from stages.common.errors import ConfigError, PipelineError
from stages.train import distributed
from stages.train.stage import build_train_parser, rendezvous_for

logger = logging.getLogger(__name__)

STAGE_MODULE = "stages.train"


def stage_argv(dvc_file: str | Path) -> list[str]:
    """The train stage's arguments as dvc.yaml's ``stages.train.cmd`` gives them.

    Raises:
        ConfigError: no such file, no train stage, or a cmd that does not run the stage.
    """
    path = Path(dvc_file)
    try:
        cmd = yaml.safe_load(path.read_text())["stages"]["train"]["cmd"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{path}: no stages.train.cmd to read the train stage's arguments from ({exc}); "
            "run this in the project's checkout (or pass --dvc-file)"
        ) from exc
    words = shlex.split(" ".join(cmd) if isinstance(cmd, list) else str(cmd))
    if words[1:3] != ["-m", STAGE_MODULE]:
        raise ConfigError(
            f"{path}: stages.train.cmd {cmd!r} does not run `python -m {STAGE_MODULE}`"
        )
    return words[3:]


def join(params_file: str | Path, dvc_file: str | Path) -> None:
    """Run this machine's share of the several-node training that ``params_file`` describes.

    Raises:
        ConfigError: params say one node, or the stage's arguments cannot be read.
        PipelineError: the job failed, or the nodes did not meet (the message says why).
    """
    params = load_params(params_file)
    train = params.train
    if train.nnodes == 1 or train.rdzv_endpoint is None:
        raise ConfigError(
            f"{params_file}: train.nnodes is {train.nnodes} and train.rdzv_endpoint is "
            f"{train.rdzv_endpoint or 'unset'}: the train stage runs on one machine, there is "
            "no job to join. For several machines set train.nnodes (the number of machines) and "
            "train.rdzv_endpoint (host:port of the machine that runs the train stage) in "
            "params.yaml on every machine"
        )
    if train.model == "gbdt":  # validation already refuses it with nnodes > 1
        raise ConfigError(f"{params_file}: train.model gbdt trains in one process")
    argv = [*stage_argv(dvc_file), "--params", str(params_file)]
    args = build_train_parser().parse_args(argv)
    rdzv = rendezvous_for(params, args.features, main=False)
    nproc = distributed.resolve_nproc(train.nproc, params.base.device)
    logger.info(
        "joining job %s at %s (%d nodes in all), %d process(es) here",
        rdzv.job_id,
        rdzv.endpoint,
        train.nnodes,
        nproc,
    )
    distributed.launch_torchrun(nproc, STAGE_MODULE, argv, rdzv)
    logger.info(
        "job %s ended; this node wrote nothing (the main node has the outputs)", rdzv.job_id
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stages.train.node [--params F] [--dvc-file F]``; 1 on failure."""
    parser = argparse.ArgumentParser(
        prog="python -m stages.train.node",
        description="Join the several-node training the train stage hosts on the main node.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--params", default="params.yaml", help="pipeline parameters file")
    parser.add_argument(
        "--dvc-file", default="dvc.yaml", help="the pipeline whose train stage's cmd to run"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        join(args.params, args.dvc_file)
    except PipelineError as exc:
        logger.error("train node failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
