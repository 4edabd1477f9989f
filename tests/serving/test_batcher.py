"""Micro-batching on a tiny in-memory model: requests are batched, and isolated when one fails."""

from __future__ import annotations

import asyncio
import threading

import pandas as pd
import pytest

from serving.batcher import MicroBatcher
from serving.model import LoadedModel
from serving.payloads import ColumnSpec, InputSpec

SPEC = InputSpec((ColumnSpec("x", "float"),))


def doubling_model(
    calls: list[int], gate: threading.Event | None = None, version: str = "1"
) -> LoadedModel:
    """``prediction`` = 2x; refuses x < 0; records each call's row count; waits on ``gate``."""

    def predict(frame: pd.DataFrame) -> pd.DataFrame:
        if gate is not None:
            gate.wait(10)
        calls.append(len(frame))
        if (frame["x"] < 0).any():
            raise ValueError("negative x")
        return pd.DataFrame({"prediction": frame["x"] * 2})

    return LoadedModel(
        uri="memory",
        variant="test",
        spec=SPEC,
        output_columns=("prediction",),
        predictor=predict,
        version=version,
    )


async def score_concurrently(batcher: MicroBatcher, jobs: list) -> list:
    await batcher.start()
    try:
        return await asyncio.gather(
            *(batcher.score(model, rows) for model, rows in jobs), return_exceptions=True
        )
    finally:
        await batcher.stop()


def test_queued_requests_share_one_call_and_each_gets_its_own_rows() -> None:
    calls: list[int] = []
    model = doubling_model(calls)
    batcher = MicroBatcher(max_rows=4)
    jobs = [
        (model, [[1.0]]),
        (model, [[2.0], [3.0]]),
        (model, [[4.0]]),
        (model, [[5.0]]),
        (model, [[6.0], [7.0], [8.0]]),
    ]

    results = asyncio.run(score_concurrently(batcher, jobs))

    assert results == [
        [{"prediction": 2.0}],
        [{"prediction": 4.0}, {"prediction": 6.0}],
        [{"prediction": 8.0}],
        [{"prediction": 10.0}],
        [{"prediction": 12.0}, {"prediction": 14.0}, {"prediction": 16.0}],
    ]
    assert calls == [4, 4]  # all five queued: 1+2+1 rows (max_rows 4), then 1+3


def test_a_request_that_queues_while_the_model_is_busy_joins_the_next_call() -> None:
    calls: list[int] = []
    gate = threading.Event()
    model = doubling_model(calls, gate)
    batcher = MicroBatcher(max_rows=100)

    async def run() -> list:
        await batcher.start()
        try:
            first = asyncio.ensure_future(batcher.score(model, [[1.0]]))
            await asyncio.sleep(0.05)  # the first call is running (held at the gate)
            later = [asyncio.ensure_future(batcher.score(model, [[x]])) for x in (2.0, 3.0)]
            await asyncio.sleep(0.05)
            gate.set()
            return await asyncio.gather(first, *later)
        finally:
            await batcher.stop()

    assert asyncio.run(run()) == [
        [{"prediction": 2.0}],
        [{"prediction": 4.0}],
        [{"prediction": 6.0}],
    ]
    assert calls == [1, 2]  # alone at once (no waiting to fill a batch), then together


def test_a_bad_request_fails_alone_and_versions_are_never_mixed() -> None:
    calls: list[int] = []
    old, new = doubling_model(calls, version="1"), doubling_model(calls, version="2")
    batcher = MicroBatcher(max_rows=100)

    results = asyncio.run(
        score_concurrently(
            batcher, [(old, [[1.0]]), (old, [[-1.0]]), (old, [[3.0]]), (new, [[4.0]])]
        )
    )

    assert results[0] == [{"prediction": 2.0}] and results[2] == [{"prediction": 6.0}]
    assert isinstance(results[1], ValueError) and "negative x" in str(results[1])
    assert results[3] == [{"prediction": 8.0}]
    assert calls[-1] == 1  # the new version's request was scored by itself


def test_score_before_start_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="start"):
        asyncio.run(MicroBatcher().score(doubling_model([]), [[1.0]]))
