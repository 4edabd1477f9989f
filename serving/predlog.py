"""The prediction log for monitoring: a sample of requests and their predictions, as Parquet.

A share of requests (``sample_rate``) is buffered in memory and written in batches by a
background thread, never in the request path: every ``flush_rows`` rows or ``flush_interval_s``
seconds, and once more at shutdown. Each flush writes one part file per model version,
``<dir>/part-<UTC time>-v<version>-<id>.parquet``, atomically (a hidden temp file renamed into
place, which Parquet readers skip), so ``pandas.read_parquet(dir)`` always reads whole files.

Columns: ``logged_at`` (UTC), ``request_id`` (also the response's ``X-Request-Id``),
``model_name``, ``model_version``, the input columns as the model received them, then the
model's output columns (``prediction``, ``proba_<label>``; null for a rejected row), then
``row_violations`` (``"column:rule;..."`` of the rows that broke the model's input contract,
else null), ``row_rejected`` (true when ``serve.row_policy: reject`` refused the row) and
``sampled``.

Sampling: the draw is made for every request, marked or not, so the rows with ``sampled`` true
are a uniform sample of the traffic at ``sample_rate`` (shares computed on them are unbiased).
A request with a marked row is logged even when the draw leaves it out, with ``sampled`` false:
those rows are there for the violation listing only, and counting them in a share would
over-represent bad rows (1 % bad requests at a 0.1 rate would read as about 9 %). The monitor
computes its shares on sampled rows; logs written before this column count every row.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.files import atomic_path
from serving.model import LoadedModel

logger = logging.getLogger(__name__)

_ARROW_TYPES = {"float": "float64", "int": "int64", "bool": "bool_", "str": "string"}


@dataclass(frozen=True)
class _Entry:
    model: LoadedModel
    request_id: str
    logged_at: float
    rows: list[list[Any]]
    records: list[dict[str, Any]]  # empty when the request was rejected
    marks: list[str | None] | None = None  # per row: its contract violations
    rejected: bool = False
    sampled: bool = True  # False: logged only because a row was marked


def build_table(entries: list[_Entry]) -> Any:
    """Entries of one model version -> a pyarrow Table (one row per scored row)."""
    import pyarrow as pa

    model = entries[0].model
    rows = [row for e in entries for row in e.rows]
    records = [rec for e in entries for rec in e.records]
    n_per = [len(e.rows) for e in entries]
    stamps = [
        dt.datetime.fromtimestamp(e.logged_at, dt.UTC)
        for e, n in zip(entries, n_per, strict=False)
        for _ in range(n)
    ]
    arrays = {
        "logged_at": pa.array(stamps, pa.timestamp("ms", tz="UTC")),
        "request_id": pa.array(
            [e.request_id for e, n in zip(entries, n_per, strict=False) for _ in range(n)]
        ),
        "model_name": pa.array([model.name] * len(rows), pa.string()),
        "model_version": pa.array([model.version] * len(rows), pa.string()),
    }
    for i, col in enumerate(model.spec.columns):
        # an int column checked by the contract may hold nulls and huge whole floats: as the
        # model got it, float64 (the same type in every part file)
        kind = "float64" if col.kind == "int" and col.null_ok else _ARROW_TYPES.get(col.kind)
        arrays[col.name] = pa.array([row[i] for row in rows], getattr(pa, kind)() if kind else None)
    outputs = list(model.output_columns) or list(records[0] if records else {})
    answers = [rec for e in entries for rec in (e.records or [{}] * len(e.rows))]
    for name in outputs:
        arrays[name] = pa.array([rec.get(name) for rec in answers])
    arrays["row_violations"] = pa.array(
        [mark for e in entries for mark in (e.marks or [None] * len(e.rows))], pa.string()
    )
    arrays["row_rejected"] = pa.array([e.rejected for e in entries for _ in e.rows], pa.bool_())
    arrays["sampled"] = pa.array([e.sampled for e in entries for _ in e.rows], pa.bool_())
    return pa.table(arrays)


class PredictionLog:
    """Samples requests into a buffer and flushes it to Parquet part files.

    Args:
        directory: where part files go (created on the first flush).
        sample_rate: the share of requests logged, 0 (off) to 1 (all).
        flush_rows: flush once this many rows are buffered.
        flush_interval_s: flush at least this often while rows are buffered.
        seed: seeds the sampling (tests); None = random.
    """

    def __init__(
        self,
        directory: str | Path,
        sample_rate: float,
        flush_rows: int = 1000,
        flush_interval_s: float = 30.0,
        seed: int | None = None,
    ) -> None:
        self.directory, self.sample_rate = Path(directory), sample_rate
        self.flush_rows, self.flush_interval_s = flush_rows, flush_interval_s
        self._rng = random.Random(seed)
        self._buffer: list[_Entry] = []
        self._rows = 0
        self._lock = threading.Lock()
        self._due = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def maybe_add(
        self,
        model: LoadedModel,
        request_id: str,
        rows: list[list[Any]],
        records: list[dict[str, Any]],
        logged_at: float,
        marks: list[str | None] | None = None,
        rejected: bool = False,
    ) -> bool:
        """Buffer this request with probability ``sample_rate``, and always when a row is
        marked (``marks`` per row, see ``serving.rowcheck.row_marks``) but then with ``sampled``
        false unless the draw took it too (module doc); True when it was buffered."""
        # drawn for every request, marked or not: the sampled rows stay a uniform sample
        sampled = self.sample_rate > 0 and self._rng.random() < self.sample_rate
        if not sampled and not any(marks or []):
            return False
        with self._lock:
            self._buffer.append(
                _Entry(model, request_id, logged_at, rows, records, marks, rejected, sampled)
            )
            self._rows += len(rows)
            if self._rows >= self.flush_rows:
                self._due.set()
        return True

    def flush(self) -> list[Path]:
        """Write what is buffered now: one part file per model version. Returns the files."""
        import pyarrow.parquet as pq

        with self._lock:
            entries, self._buffer, self._rows = self._buffer, [], 0
        by_model: dict[int, list[_Entry]] = {}
        for entry in entries:
            by_model.setdefault(id(entry.model), []).append(entry)
        written = []
        for group in by_model.values():
            model = group[0].model
            stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
            path = self.directory / f"part-{stamp}-v{model.label}-{uuid.uuid4().hex[:8]}.parquet"
            with atomic_path(path) as tmp:
                pq.write_table(build_table(group), tmp)
            written.append(path)
        if written:
            logger.info(
                "prediction log: %d row(s) in %s",
                sum(len(e.rows) for e in entries),
                ", ".join(p.name for p in written),
            )
        return written

    def start(self) -> None:
        """Flush in a daemon thread (marked rows are logged even when sampling is off)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="prediction-log", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and write what is left."""
        self._stop.set()
        self._due.set()
        if self._thread is not None:
            self._thread.join(60)
        self.flush()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._due.wait(self.flush_interval_s)
            self._due.clear()
            try:
                self.flush()
            except Exception:
                logger.exception("prediction log: flush to %s failed", self.directory)
