"""Crash safety for training: resume checkpoints keyed by params + data, and a graceful stop.

A resume checkpoint holds everything the loop needs to continue bit-exactly: weights,
optimizer, scheduler and grad-scaler state, every RNG state, the epoch, the batch inside it,
the best weights so far, the early-stopping counters and the history. It lives in its own
folder (``.resume/train/<key>/checkpoint.pt`` by default), outside the DVC outputs: DVC never
deletes it, it is never part of the final model, and ``<key>`` is a hash of the params and the
data, so a run with other params or data never picks up a stale one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import shutil
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from model.files import PREPROCESSOR_FILE
from stages.common.config import Params
from stages.common.errors import PipelineError
from stages.common.io import atomic_path
from stages.train import distributed
from stages.train.distributed import DistInfo
from stages.train.training import LoopParts

logger = logging.getLogger(__name__)

RESUME_FILE = "checkpoint.pt"
KEY_LENGTH = 16
_KEY_PATTERN = re.compile(rf"[0-9a-f]{{{KEY_LENGTH}}}")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_SYNC_STEPS = 16  # DDP: ranks agree on a pending SIGTERM every this many steps


class TrainingInterrupted(PipelineError):
    """SIGTERM/SIGINT stopped training; a checkpoint was written when the loop was running."""


def hash_files(paths: Sequence[Path], chunk: int = 1 << 20) -> str:
    """sha256 over the names and bytes of ``paths`` (the data a run trains on)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode())
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def resume_key(config: dict[str, Any], data_hash: str) -> str:
    """A short hash of the resolved config and the data: equal only for the same training."""
    text = json.dumps(config, sort_keys=True, default=str) + data_hash
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


@dataclass(frozen=True)
class ResumeStore:
    """The resume folder of one training: ``root/<key>/checkpoint.pt``."""

    root: Path
    key: str

    @property
    def path(self) -> Path:
        return self.root / self.key / RESUME_FILE

    def load(self) -> dict[str, Any] | None:
        """The last checkpoint, or None when this training has none (a fresh start)."""
        if not self.path.is_file():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged file (it is written atomically, so: by hand)
            raise PipelineError(
                f"{self.path}: unreadable resume checkpoint ({exc}); delete it "
                "or run with --no-resume"
            ) from exc

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` atomically: a kill mid-write leaves the previous checkpoint."""
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)

    def clear(self) -> None:
        """Forget this training's resume state (it finished, or --no-resume)."""
        shutil.rmtree(self.root / self.key, ignore_errors=True)

    def clear_others(self) -> None:
        """Drop resume state of other params/data: a new training makes it stale."""
        if not self.root.is_dir():
            return
        for folder in self.root.iterdir():
            if (
                folder.name != self.key
                and _KEY_PATTERN.fullmatch(folder.name)
                and (folder / RESUME_FILE).is_file()
            ):
                logger.info("removing stale resume state %s", folder)
                shutil.rmtree(folder, ignore_errors=True)


def open_resume(
    resume_dir: str | Path,
    params: Params,
    features_dir: Path,
    device: torch.device,
    streamed: bool,
    dist: DistInfo,
    resume: bool = True,
) -> tuple[ResumeStore, dict[str, Any] | None]:
    """This training's resume store and its last checkpoint (None: start fresh).

    The key hashes what makes two trainings the same (the ``train`` params, seed, device,
    world size, streamed or not) and the data files. ``resume=False`` discards the
    checkpoint; a fresh start removes other trainings' stale ones (rank 0 does both).
    """
    config = {
        "train": params.train.model_dump(mode="json"),
        "seed": params.base.seed,
        "device": device.type,
        "world_size": dist.world_size,
        "streamed": streamed,
    }
    data_hash = hash_files(
        [features_dir / name for name in ("train.parquet", "val.parquet", PREPROCESSOR_FILE)]
    )
    store = ResumeStore(Path(resume_dir), resume_key(config, data_hash))
    if not resume and dist.is_main:
        store.clear()
    ckpt = store.load() if resume else None
    if ckpt is None and dist.is_main:
        store.clear_others()
    return store, ckpt


@dataclass
class LoopState:
    """Where the loop is; a resume checkpoint is this plus weights, optimizer and RNG state."""

    epoch: int = 1
    batch: int = 0  # batches done in ``epoch``
    step: int = 0  # optimizer steps done in total
    history: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch: int = 0
    best_val: float = math.inf
    since_best: int = 0
    done: bool = False
    loss_sum: float | torch.Tensor = 0.0  # this epoch's summed train loss, on the device
    rows: int = 0  # rows behind ``loss_sum``


def save_checkpoint(
    store: ResumeStore,
    state: LoopState,
    parts: LoopParts,
    shuffle_state: torch.Tensor,
    device: torch.device,
    dist: DistInfo,
    extra: dict[str, Any],
) -> None:
    """Write the loop's full state to ``store`` (rank 0; a collective, so every rank calls it).

    ``shuffle_state`` is the batch-order generator as it was at the start of the epoch in
    progress: a resume redraws that epoch's order and skips the batches already done.
    """
    # Each rank's partial loss sum (a collective: every rank calls this at the same step).
    loss_sums = distributed.gather_all(torch.as_tensor(state.loss_sum, device=device), dist)
    if not dist.is_main:
        return
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    store.save(
        {
            **fields,
            **extra,
            "format": 1,
            "loss_sum": loss_sums.cpu(),
            "model": parts.network.state_dict(),
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict() if parts.scheduler is not None else None,
            "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
            "shuffle": shuffle_state,
            "rng": capture_rng(device, parts.augment_generator),
        }
    )


def restore_checkpoint(
    ckpt: dict[str, Any], parts: LoopParts, device: torch.device, dist: DistInfo
) -> LoopState:
    """Load ``ckpt`` into the freshly built parts; return where the loop continues."""
    parts.network.load_state_dict(ckpt["model"])
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    if parts.scheduler is not None:
        parts.scheduler.load_state_dict(ckpt["scheduler"])
    if parts.scaler is not None:
        parts.scaler.load_state_dict(ckpt["scaler"])
    parts.shuffle.set_state(ckpt["shuffle"])
    restore_rng(ckpt["rng"], device, parts.augment_generator)
    state = LoopState(**{f.name: ckpt[f.name] for f in dataclasses.fields(LoopState)})
    state.loss_sum = ckpt["loss_sum"][dist.rank].to(device)
    if dist.is_main:
        logger.info(
            "resuming at epoch %d, batch %d (step %d)", state.epoch, state.batch, state.step
        )
    return state


def capture_rng(device: torch.device, augment: torch.Generator | None) -> dict[str, Any]:
    """Every RNG state the loop draws from (dropout, CUDA kernels, augmentation)."""
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    if augment is not None:
        states["augment"] = augment.get_state()
    return states


def restore_rng(
    states: dict[str, Any], device: torch.device, augment: torch.Generator | None
) -> None:
    """Put back what ``capture_rng`` saved."""
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
    if augment is not None and "augment" in states:
        augment.set_state(states["augment"])


@dataclass
class GracefulStop:
    """Turns SIGTERM/SIGINT into a checkpoint-then-stop instead of a hard kill.

    Inside ``deferred()`` (the training loop) a signal only sets ``signal_name``; the loop
    checks it at the next step boundary, writes a checkpoint and raises TrainingInterrupted.
    Anywhere else the signal raises TrainingInterrupted at once. Use as a context manager.
    """

    signal_name: str | None = None
    _defer: bool = False
    _previous: dict[int, Any] = field(default_factory=dict)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        if not self._defer:
            raise TrainingInterrupted(f"training stopped by {self.signal_name}")

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # signals need the main thread
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Within this block a signal waits for the loop to reach a safe point."""
        self._defer = True
        try:
            yield
        finally:
            self._defer = False


def stop_requested(
    stop: GracefulStop | None, step: int, dist: DistInfo, device: torch.device
) -> bool:
    """Whether the loop should checkpoint and stop now (in DDP: all ranks agree, same step)."""
    if stop is None:
        return False
    if not dist.enabled:
        return stop.requested
    if step % STOP_SYNC_STEPS:
        return False
    # Every rank must stop at the same step (they checkpoint together): agree on the flag.
    flag = torch.tensor([float(stop.requested)], device=device)
    return distributed.sum_all(flag, dist).item() > 0
