"""Write rows to one or more Parquet files, in whole row groups, on a background thread.

The data stages (ingest's parts, validate's clean and quarantined rows, features' splits) all
write this way. Each file gets row groups of exactly ``rows_per_group`` rows (the last one
shorter). Encoding and compressing a row group runs on one writer thread while the caller reads
and checks the next batch; at most ``MAX_IN_FLIGHT`` row groups wait for it, so memory stays
bounded. The files are written in place: callers write into a temporary folder that
``io.atomic_path`` renames as a whole.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from stages.common.io import open_parquet_writer

MAX_IN_FLIGHT = 2  # row groups handed to the writer thread and not yet written


class ParquetFiles:
    """``add(name, rows)`` appends rows to ``folder/<name>.parquet``; use as a context manager.

    On leaving the block normally every file is flushed and closed; on an exception the
    files are closed as they are (the caller's temporary folder is then discarded).
    """

    def __init__(self, folder: Path, names: list[str], schema: Any, rows_per_group: int) -> None:
        self.schema, self.rows_per_group = schema, rows_per_group
        self.paths = {name: folder / f"{name}.parquet" for name in names}
        self.writers: dict[str, Any] = {}
        self.pending: dict[str, list[Any]] = {name: [] for name in names}
        self.pending_rows = dict.fromkeys(names, 0)
        self.written = dict.fromkeys(names, 0)
        self.futures: deque[Future] = deque()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet-writer")

    def __enter__(self) -> ParquetFiles:
        self.writers = {
            name: open_parquet_writer(path, self.schema) for name, path in self.paths.items()
        }
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        try:
            if exc_type is None:
                for name in self.paths:
                    self._flush(name, final=True)
            self._wait(0)
        finally:
            self.pool.shutdown(wait=True)
            for writer in self.writers.values():
                writer.close()

    def add(self, name: str, rows: Any) -> None:
        """Queue a RecordBatch (or Table) of rows for ``name``."""
        self.pending[name].append(rows)
        self.pending_rows[name] += rows.num_rows
        if self.pending_rows[name] >= self.rows_per_group:
            self._flush(name, final=False)

    def _flush(self, name: str, final: bool) -> None:
        import pyarrow as pa

        if not self.pending[name]:  # nothing was added: the file keeps just its schema
            return
        table = pa.concat_tables(
            [
                part if isinstance(part, pa.Table) else pa.Table.from_batches([part])
                for part in self.pending[name]
            ]
        )
        size = self.rows_per_group
        n_out = len(table) if final else len(table) // size * size
        if n_out:
            self._wait(MAX_IN_FLIGHT - 1)
            self.futures.append(
                self.pool.submit(
                    self.writers[name].write_table, table.slice(0, n_out), row_group_size=size
                )
            )
        rest = table.slice(n_out)
        self.pending[name], self.pending_rows[name] = [rest], len(rest)
        self.written[name] += n_out

    def _wait(self, keep: int) -> None:
        # block until at most ``keep`` writes are in flight; a failed write raises here
        while len(self.futures) > keep:
            self.futures.popleft().result()


def arrow_mask(mask: np.ndarray) -> Any:
    """numpy bool -> arrow bool array via a packed bitmap (~500x faster than ``pa.array``)."""
    import pyarrow as pa

    bits = pa.py_buffer(np.packbits(mask, bitorder="little"))
    return pa.Array.from_buffers(pa.bool_(), len(mask), [None, bits])
