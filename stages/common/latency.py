"""Latency helpers shared by export (its ONNX variants) and compress (the parent and its
candidates): both time a model the same way, so their numbers can be set side by side.

A latency is the median wall time of repeated calls after one warm-up call (the first call
pays for lazy initialisation: memory pools, onnxruntime's kernel choice); the median, not the
mean, because one descheduled call on a busy machine would move a mean by a lot.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

BATCH_SIZE = 64  # rows in the timed batch (the metrics' names say it: latency_ms_batch64)


def median_latency_ms(call: Callable[[Any], Any], arg: Any, repeats: int) -> float:
    """Median wall time of ``call(arg)`` in milliseconds, after one warm-up call."""
    call(arg)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(arg)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def take_rows(rows: Any, size: int) -> Any:
    """``size`` rows of a DataFrame or array, cycling through it when it is shorter."""
    index = np.tile(np.arange(len(rows)), math.ceil(size / len(rows)))[:size]
    return rows.iloc[index].reset_index(drop=True) if hasattr(rows, "iloc") else rows[index]


def row_and_batch_ms(
    call: Callable[[Any], Any], rows: Any, repeats: tuple[int, int]
) -> tuple[float, float]:
    """Median ms of ``call`` on the first row and on a batch of :data:`BATCH_SIZE` rows.

    Args:
        rows: a DataFrame or array; its first row is the single-row request.
        repeats: calls the single-row and the batch medians are taken over.
    """
    one = rows.iloc[:1] if hasattr(rows, "iloc") else rows[:1]
    return (
        median_latency_ms(call, one, repeats[0]),
        median_latency_ms(call, take_rows(rows, BATCH_SIZE), repeats[1]),
    )
