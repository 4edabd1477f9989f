"""The splits compress works on, each read once: train fits (fine-tuning, distillation,
calibration), val stops the fitting early, test only measures (the gate's numbers)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from model.files import PREPROCESSOR_FILE
from stages.common.errors import DataError
from stages.common.io import read_parquet

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    """One split's raw rows; the encoded view and the class ids computed once, on demand."""

    name: str
    frame: Any  # pandas.DataFrame: the features' columns and the target
    preprocessor: Any  # model.preprocess.FittedPreprocessor
    path: Path

    def view(self, make: Any) -> Any:
        """``make(frame)`` (a view of the rows); a DataError from it names the split's file."""
        try:
            return make(self.frame)
        except DataError as exc:
            raise DataError(str(exc), file=str(self.path), rule=exc.rule) from exc

    @cached_property
    def X(self) -> np.ndarray:
        """The networks' view (``preprocessor.transform``), float32: what students train on."""
        return np.asarray(self.view(self.preprocessor.transform), dtype=np.float32)

    @cached_property
    def y(self) -> np.ndarray:
        """The class ids."""
        target = self.preprocessor.target
        return self.view(lambda frame: self.preprocessor.encode_labels(frame[target]))

    @property
    def rows(self) -> Any:
        """The feature columns only: what a request sends (the latency's input)."""
        return self.frame[self.preprocessor.feature_columns]


@dataclass
class Data:
    """The fitted preprocessor and the three splits."""

    preprocessor: Any
    train: Split
    val: Split
    test: Split


def load_data(features_dir: str | Path) -> Data:
    """Read the features stage's preprocessor and splits.

    Raises:
        DataError: a split lacks the target column (the message names the file).
    """
    from model.preprocess import load_preprocessor

    features_dir = Path(features_dir)
    preprocessor = load_preprocessor(features_dir / PREPROCESSOR_FILE)
    splits = {}
    for name in SPLITS:
        path = features_dir / f"{name}.parquet"
        frame = read_parquet(path)
        if preprocessor.target not in frame.columns:
            raise DataError(
                "target column not found; re-run the features stage",
                file=str(path),
                column=preprocessor.target,
                rule="column_present",
            )
        splits[name] = Split(name, frame, preprocessor, path)
    return Data(preprocessor, **splits)
