"""Adaptive micro-batching: requests that arrive while the model is busy are scored together.

The model's fixed cost per call (preprocessing a DataFrame, one network forward) is far larger
than its cost per row, so under concurrency one call for 16 single-row requests answers all 16
in about the time of one. Nothing waits for a batch to fill: an idle service scores each
request at once; a busy one scores everything that queued up during the previous call (up to
``max_rows``). Requests are grouped by the model object they picked, so a request that started
on the old version is answered by it even if the swap happened while it queued. The model
runs in a worker thread, off the event loop.

The queue is bounded (``max_queue_rows``): under more load than the model can take, a request
that would push the rows waiting beyond the bound is refused at once with :class:`QueueFull`
(the service answers 503 with ``Retry-After``) instead of queueing without end, which would
grow memory and every request's latency until clients time out anyway.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from serving.model import LoadedModel
from serving.payloads import frame_to_records, rows_to_frame

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds ``max_queue_rows`` rows already: try again after ``retry_after_s``."""

    def __init__(self, queued_rows: int, limit: int, retry_after_s: int) -> None:
        self.queued_rows, self.limit, self.retry_after_s = queued_rows, limit, retry_after_s
        super().__init__(
            f"{queued_rows} rows are waiting for the model (the limit is {limit}, "
            f"serve.max_queue_rows): retry in {retry_after_s} s"
        )


@dataclass
class _Job:
    model: LoadedModel
    rows: list[list[Any]]
    future: asyncio.Future = field(repr=False)


def score_rows(model: LoadedModel, rows: list[list[Any]]) -> list[dict[str, Any]]:
    """Checked rows -> one prediction record per row (the whole request path minus HTTP)."""
    frame = rows_to_frame(rows, model.spec)
    records = frame_to_records(model.predict(frame))
    if len(records) != len(rows):
        raise RuntimeError(f"model v{model.label} returned {len(records)} rows for {len(rows)}")
    return records


class MicroBatcher:
    """Queues scoring jobs and runs them in batches on one worker thread.

    Args:
        max_rows: the most rows one model call gets (a single larger request still goes
            through whole).
        on_batch: called with (model, rows in the batch) after each model call (metrics).
        max_queue_rows: the most rows waiting (not yet in a model call); a request that
            would go over raises QueueFull, unless the queue is empty.
    """

    def __init__(
        self,
        max_rows: int = 256,
        on_batch: Callable[[LoadedModel, int], None] | None = None,
        max_queue_rows: int = 4096,
    ) -> None:
        self.max_rows, self.on_batch = max_rows, on_batch
        self.max_queue_rows = max_queue_rows
        self.queued_rows = 0  # rows in _queue (event-loop thread only)
        self._seconds_per_row = 0.0  # moving average of model time per row: the Retry-After
        self._queue: deque[_Job] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._task = asyncio.create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        """Stop the loop; queued jobs are failed, the worker thread is shut down."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.queued_rows = 0
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the service is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def score(self, model: LoadedModel, rows: list[list[Any]]) -> list[dict[str, Any]]:
        """Score ``rows`` with ``model`` (batched with whatever else is queued)."""
        if self._wake is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        if self._queue and self.queued_rows + len(rows) > self.max_queue_rows:
            raise QueueFull(self.queued_rows, self.max_queue_rows, self.retry_after_s())
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Job(model, rows, future))
        self.queued_rows += len(rows)
        self._wake.set()
        return await future

    def retry_after_s(self) -> int:
        """Whole seconds the queued rows should take to drain (at least 1)."""
        return max(1, math.ceil(self.queued_rows * self._seconds_per_row))

    def _take_batch(self) -> list[_Job]:
        batch = [self._queue.popleft()]
        n = len(batch[0].rows)
        while (
            self._queue
            and self._queue[0].model is batch[0].model
            and n + len(self._queue[0].rows) <= self.max_rows
        ):
            job = self._queue.popleft()
            batch.append(job)
            n += len(job.rows)
        self.queued_rows -= n
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = self._take_batch()
                jobs = [job for job in batch if not job.future.done()]  # skip the cancelled
                if not jobs:
                    continue
                try:
                    started = time.perf_counter()
                    results = await loop.run_in_executor(self._executor, _score_batch, jobs)
                    per_row = (time.perf_counter() - started) / sum(len(j.rows) for j in jobs)
                    self._seconds_per_row = 0.8 * self._seconds_per_row + 0.2 * per_row
                    if self.on_batch:
                        self.on_batch(jobs[0].model, sum(len(job.rows) for job in jobs))
                except Exception as exc:
                    logger.exception("batch of %d request(s) failed", len(jobs))
                    results = [exc] * len(jobs)
                for job, result in zip(jobs, results, strict=False):
                    _settle(job.future, result)


def _score_batch(jobs: list[_Job]) -> list[Any]:
    """Each job's records, or the exception it gets. One call for the batch; if that call
    fails, each job is retried alone so one bad request cannot fail its neighbours."""
    model = jobs[0].model
    rows = [row for job in jobs for row in job.rows]
    try:
        records = score_rows(model, rows)
    except Exception as exc:  # noqa: BLE001 - handed to the requests, never raised here
        if len(jobs) == 1:
            return [exc]
        return [_score_alone(model, job.rows) for job in jobs]
    results, start = [], 0
    for job in jobs:
        results.append(records[start : start + len(job.rows)])
        start += len(job.rows)
    return results


def _score_alone(model: LoadedModel, rows: list[list[Any]]) -> Any:
    try:
        return score_rows(model, rows)
    except Exception as exc:  # noqa: BLE001 - this request's own failure
        return exc


def _settle(future: asyncio.Future, result: Any) -> None:
    if future.done():  # the client went away
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
