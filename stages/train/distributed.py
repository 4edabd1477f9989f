"""Data-parallel training: launch under torchrun, find this process's rank, shard, reduce.

The train stage re-launches itself with ``python -m torch.distributed.run`` when it should use
more than one process; each rank then calls ``current()`` to learn its place. With one process
every helper here is a cheap no-op, so the training loop has a single code path.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.common.errors import ConfigError, PipelineError

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> DistInfo:
    """Read the rank and world size torchrun put in the environment."""
    env = os.environ
    return DistInfo(
        int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
    )


def resolve_nproc(nproc: int | None, device_name: str) -> int:
    """``train.nproc``, or one process per visible GPU when it is unset (1 on CPU).

    Raises:
        ConfigError: more CUDA processes than visible GPUs.
    """
    cuda = device_name != "cpu" and torch.cuda.is_available()
    if nproc is None:
        return torch.cuda.device_count() if cuda else 1
    if cuda and nproc > torch.cuda.device_count():
        raise ConfigError(
            f"train.nproc: {nproc} processes but only {torch.cuda.device_count()} "
            "GPU(s) visible (one process per GPU; set base.device: cpu for CPU DDP)"
        )
    return nproc


def launch_torchrun(nproc: int, module: str, argv: Sequence[str]) -> None:
    """Run ``python -m module argv`` in ``nproc`` processes under torchrun; wait for them.

    SIGTERM/SIGINT are passed on to torchrun, which passes them to every rank (rank 0 then
    checkpoints and ends the MLflow run KILLED).

    Raises:
        PipelineError: a rank failed (its own error is in the log above).
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        module,
        *argv,
    ]
    env = dict(os.environ)
    # The ranks import the stage as a module: make the project importable from any cwd.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    logger.info("launching %d training processes: %s", nproc, " ".join(cmd))
    child = subprocess.Popen(cmd, env=env)
    forward = lambda signum, frame: child.send_signal(signum)  # noqa: E731
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code != 0:
        raise PipelineError(
            f"distributed training failed: torchrun with {nproc} processes "
            f"exited with code {code} (see the rank logs above)"
        )


def setup(info: DistInfo, device: torch.device) -> torch.device:
    """Join the process group (nccl on CUDA, gloo on CPU); return this rank's device."""
    if not info.enabled:
        return device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            device_id=device if device.type == "cuda" else None,
        )
    return device


def teardown(info: DistInfo) -> None:
    """Leave the process group (safe to call twice or without one)."""
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def shard_indices(order: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's share of an epoch's order, padded like DistributedSampler.

    Rank r takes positions r, r+W, r+2W, ... so per-rank batches of ``B/W`` rows together
    hold exactly the rows of the single-process batch of ``B`` rows.
    """
    if not info.enabled:
        return order
    total = math.ceil(len(order) / info.world_size) * info.world_size
    padded = torch.cat([order, order[: total - len(order)]])
    return padded[info.rank :: info.world_size]


def sum_all(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks (``tensor`` itself with one process)."""
    if not info.enabled:
        return tensor
    import torch.distributed as dist

    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor


def gather_all(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """``tensor`` from every rank, stacked as ``(world_size, *shape)``."""
    if not info.enabled:
        return tensor.unsqueeze(0)
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(info.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


def local_batch_size(batch_size: int, info: DistInfo) -> int:
    """Rows per rank and step: ``train.batch_size`` is the global batch.

    Raises:
        ConfigError: the batch does not split evenly over the processes.
    """
    if batch_size % info.world_size:
        raise ConfigError(
            f"train.batch_size {batch_size} does not split over "
            f"{info.world_size} processes (train.nproc): use a multiple of "
            f"{info.world_size}"
        )
    return batch_size // info.world_size
