"""The training data as batches: device tensors when they fit, else streamed from Parquet.

In-memory path (``DeviceBatches``): the transformed split lives on the device and each step
slices it with this rank's share of a seeded permutation; no DataLoader round trips.

Streaming path (``ParquetBatches`` + ``StreamedBatches``), for data larger than the device:
each epoch visits the Parquet row groups in a random order and each group's rows in a random
order (a full shuffle needs random access that Parquet does not give cheaply), cuts batches
across group boundaries and transforms each batch with the fitted preprocessor; a DataLoader
(``batch_size=None``) hands them over in pinned memory for a non-blocking copy.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import IterableDataset

from model.preprocess import FittedPreprocessor
from stages.common.config import TrainParams
from stages.common.io import read_parquet
from stages.train import distributed
from stages.train.distributed import DistInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainData:
    """Transformed features and class ids, already on the training device."""

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor


@dataclass(frozen=True)
class StreamedTrainData:
    """Training rows streamed from Parquet (too big for the device); validation in memory."""

    train_path: Path
    preprocessor: FittedPreprocessor
    X_val: torch.Tensor
    y_val: torch.Tensor


def fits_on_device(n_bytes: int, device: torch.device, fraction: float) -> bool:
    """Whether ``n_bytes`` of training data may live on ``device`` (free memory x fraction)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # not Linux: trust that it fits
            return True
    return n_bytes <= fraction * free


class ParquetBatches(IterableDataset):
    """Shuffled ``(X float32, y int64)`` batches of one rank's share of a Parquet file.

    Sharding and padding follow DistributedSampler: stream position ``p`` goes to rank
    ``p % world_size`` and the first rows are repeated so every rank gets the same count.
    Call ``set_epoch`` before iterating; the order depends only on the epoch seed.
    """

    def __init__(
        self,
        path: str | Path,
        preprocessor: FittedPreprocessor,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        import pyarrow.parquet as pq

        self.path, self.preprocessor, self.batch_size = Path(path), preprocessor, batch_size
        self.rank, self.world_size = rank, world_size
        meta = pq.ParquetFile(self.path).metadata
        self.n_rows, self.n_groups = meta.num_rows, meta.num_row_groups
        self.rows_per_rank = math.ceil(self.n_rows / world_size)
        self.batches_per_epoch = math.ceil(self.rows_per_rank / batch_size)
        self.epoch_seed, self.start_batch = 0, 0

    def set_epoch(self, epoch_seed: int, start_batch: int = 0) -> None:
        """Order the next pass by ``epoch_seed`` and skip its first ``start_batch`` batches."""
        self.epoch_seed, self.start_batch = epoch_seed, start_batch

    def _shuffled_groups(self) -> Iterator[pd.DataFrame]:
        import pyarrow.parquet as pq

        generator = torch.Generator().manual_seed(self.epoch_seed)
        columns = [*self.preprocessor.feature_columns, self.preprocessor.target]
        parquet = pq.ParquetFile(self.path)
        for group in torch.randperm(self.n_groups, generator=generator).tolist():
            df = parquet.read_row_group(group, columns=columns).to_pandas()
            yield df.iloc[torch.randperm(len(df), generator=generator).numpy()]

    def _rank_rows(self) -> Iterator[pd.DataFrame]:
        pad = self.rows_per_rank * self.world_size - self.n_rows
        head: list[pd.DataFrame] = []  # the first `pad` rows, streamed again at the end
        position = 0
        for chunk in self._shuffled_groups():
            if pad and sum(map(len, head)) < pad:
                head.append(chunk.head(pad - sum(map(len, head))))
            yield self._mine(chunk, position)
            position += len(chunk)
        if pad:
            yield self._mine(pd.concat(head), position)

    def _mine(self, chunk: pd.DataFrame, position: int) -> pd.DataFrame:
        if self.world_size == 1:
            return chunk
        return chunk[(position + np.arange(len(chunk))) % self.world_size == self.rank]

    def _to_tensors(self, df: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.preprocessor
        return (torch.from_numpy(p.transform(df)), torch.from_numpy(p.encode_labels(df[p.target])))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pending: list[pd.DataFrame] = []
        have, index = 0, 0
        for chunk in self._rank_rows():
            pending.append(chunk)
            have += len(chunk)
            while have >= self.batch_size:
                rows = pd.concat(pending)
                batch, rest = rows.iloc[: self.batch_size], rows.iloc[self.batch_size :]
                pending, have = [rest], len(rest)
                if index >= self.start_batch:  # skipped batches are never transformed
                    yield self._to_tensors(batch)
                index += 1
        if have and index >= self.start_batch:
            yield self._to_tensors(pd.concat(pending))

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch


class DeviceBatches:
    """In-memory path: slice device tensors by this rank's share of a seeded permutation."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, batch_size: int, dist: DistInfo):
        self.X, self.y, self.dist = X, y, dist
        self.batch_size = distributed.local_batch_size(batch_size, dist)
        self.steps_per_epoch = math.ceil(math.ceil(len(X) / dist.world_size) / self.batch_size)

    def epoch(self, shuffle: torch.Generator, start: int) -> Iterator[tuple[torch.Tensor, ...]]:
        order = torch.randperm(len(self.X), generator=shuffle)  # CPU generator: any device
        order = distributed.shard_indices(order, self.dist).to(self.X.device)
        for first in range(start * self.batch_size, len(order), self.batch_size):
            idx = order[first : first + self.batch_size]
            yield self.X[idx], self.y[idx]


class StreamedBatches:
    """Streaming path: Parquet row groups -> transformed, pinned batches -> the device."""

    def __init__(
        self, data: StreamedTrainData, batch_size: int, device: torch.device, dist: DistInfo
    ):
        self.dataset = ParquetBatches(
            data.train_path,
            data.preprocessor,
            distributed.local_batch_size(batch_size, dist),
            dist.rank,
            dist.world_size,
        )
        self.steps_per_epoch = self.dataset.batches_per_epoch
        self.device = device

    def epoch(self, shuffle: torch.Generator, start: int) -> Iterator[tuple[torch.Tensor, ...]]:
        from torch.utils.data import DataLoader

        self.dataset.set_epoch(int(torch.randint(2**62, (1,), generator=shuffle)), start)
        cuda = self.device.type == "cuda"
        # On CUDA one worker reads and transforms the next batch while the GPU computes; on
        # CPU the CPU is the compute, so a worker would only compete with it.
        loader = DataLoader(self.dataset, batch_size=None, num_workers=int(cuda), pin_memory=cuda)
        for X, y in loader:
            yield X.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def make_batches(
    data: TrainData | StreamedTrainData, batch_size: int, device: torch.device, dist: DistInfo
) -> DeviceBatches | StreamedBatches:
    """The batch source for ``data``; ``batch_size`` is the global batch (split over ranks).

    A batch larger than the training split is allowed (each step then takes the whole split,
    one step per epoch), but warned about: it is usually a default left over from more data.
    """
    if isinstance(data, TrainData):
        batches: DeviceBatches | StreamedBatches = DeviceBatches(
            data.X_train, data.y_train, batch_size, dist
        )
        n_rows = len(data.X_train)
    else:
        batches = StreamedBatches(data, batch_size, device, dist)
        n_rows = batches.dataset.n_rows
    if batch_size > n_rows and dist.rank == 0:
        logger.warning(
            "train.batch_size %d is larger than the %d training rows: every step "
            "takes the whole split (one step per epoch); set train.batch_size to %d "
            "or less",
            batch_size,
            n_rows,
            n_rows,
        )
    return batches


def make_train_data(
    splits: dict[str, pd.DataFrame], preprocessor: FittedPreprocessor, device: torch.device
) -> TrainData:
    """Transform the train/val splits and move them to ``device`` once."""

    def _tensors(df: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        X = torch.from_numpy(preprocessor.transform(df)).to(device)
        y = torch.from_numpy(preprocessor.encode_labels(df[preprocessor.target])).to(device)
        return X, y

    return TrainData(*_tensors(splits["train"]), *_tensors(splits["val"]))


def _read_splits(features_dir: Path, names: Sequence[str]) -> dict[str, pd.DataFrame]:
    return {name: read_parquet(features_dir / f"{name}.parquet") for name in names}


def load_train_data(
    features_dir: Path,
    preprocessor: FittedPreprocessor,
    params: TrainParams,
    device: torch.device,
    *,
    with_test: bool = True,
) -> tuple[TrainData | StreamedTrainData, dict]:
    """The training data, on the device when it fits (or as asked), else streamed.

    Returns the data and the splits read whole (all three in memory; val and test streamed).
    ``with_test=False`` (a tuning trial) never reads the test split.
    """
    import pyarrow.parquet as pq

    test = ("test",) if with_test else ()

    train_path = features_dir / "train.parquet"
    n_rows = pq.ParquetFile(train_path).metadata.num_rows
    n_bytes = n_rows * (preprocessor.n_features * 4 + 8)  # float32 features + int64 label
    on_device = params.data_on_device == "always" or (
        params.data_on_device == "auto"
        and fits_on_device(n_bytes, device, params.device_memory_fraction)
    )
    if on_device:
        splits = _read_splits(features_dir, ("train", "val", *test))
        return make_train_data(splits, preprocessor, device), splits
    logger.info("streaming %d training rows (%.1f MB) from %s", n_rows, n_bytes / 1e6, train_path)
    splits = _read_splits(features_dir, ("val", *test))
    X_val = torch.from_numpy(preprocessor.transform(splits["val"]))
    y_val = torch.from_numpy(preprocessor.encode_labels(splits["val"][preprocessor.target]))
    if device.type == "cuda":  # pinned: scored chunk by chunk with non-blocking copies
        X_val, y_val = X_val.pin_memory(), y_val.pin_memory()
    return StreamedTrainData(train_path, preprocessor, X_val, y_val), splits
