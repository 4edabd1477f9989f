"""Score and time a model on the test split, the parent and each candidate alike.

One path for every model: raw feature rows -> ``Predictor.features`` (the fitted preprocessor,
in the view the model reads) -> ``predict_proba``, on the CPU, as the service runs it. Latency
is the median wall time over repeated calls after a warm-up call: one row (a request) and a
batch of 64 rows. Size is the model file's bytes (what registering and shipping it costs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.artifacts import file_sha256
from model.metrics import compute_metrics
from stages.common.latency import row_and_batch_ms


@dataclass(frozen=True)
class Measurement:
    """One model on the test split: its metrics, file size and latencies."""

    file: str
    sha256: str
    family: str
    metrics: dict[str, float]
    size_bytes: int
    latency_ms_row: float
    latency_ms_batch64: float

    def record(self) -> dict[str, Any]:
        """As the report holds it."""
        return asdict(self)


def measure(
    predictor: Any,
    path: Path,
    test: Any,
    repeats: tuple[int, int],
    shown_as: str | None = None,
) -> Measurement:
    """Score ``predictor`` (loaded from ``path``, on the CPU) on the test split and time it.

    Args:
        test: the test :class:`stages.compress.data.Split`.
        repeats: calls the single-row and the batch-of-64 medians are taken over.
        shown_as: the file name the report shows (default: ``path``).
    """
    preprocessor = test.preprocessor

    def score(frame: Any) -> np.ndarray:
        return predictor.predict_proba(predictor.features(preprocessor, frame))

    proba = test.view(score)
    row_ms, batch_ms = row_and_batch_ms(score, test.rows, repeats)
    return Measurement(
        file=shown_as or str(path),
        sha256=file_sha256(path),
        family=predictor.family,
        metrics=compute_metrics(test.y, proba),
        size_bytes=Path(path).stat().st_size,
        latency_ms_row=row_ms,
        latency_ms_batch64=batch_ms,
    )
