"""Synthetic tables of any size: numeric, categorical and missing values, and a learnable target.

Written in chunks, so a 10M-row file needs no more memory than a 1M-row one; the same seed and
size always give the same rows (chunk ``i`` has its own seed), whatever the chunk size::

    python -m bench.synth --rows 1000000 --out data/source/synth.csv
    python -m bench.synth --rows 10000000 --out /tmp/synth.parquet

Columns: ``id`` (increasing), ``event_time`` (increasing: a watermark), eight floats ``x0``..``x7``
(``x3`` and ``x6`` have about 2% missing), ``count`` (int), ``region`` (5 values) and ``device``
(12 values, about 1% missing), and ``target`` (0/1): a noisy logistic function of some floats,
``count`` and ``region``, so a model can learn it (about 0.85 accuracy) but not memorise it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

CHUNK_ROWS = 1_000_000  # rows per generated block (the unit of the per-chunk seed)
N_FLOATS = 8
MISSING_FLOATS = {3: 0.02, 6: 0.02}  # column index -> share of missing values
REGIONS = ["north", "south", "east", "west", "central"]
DEVICES = [f"device_{i:02d}" for i in range(12)]
START = np.datetime64("2024-01-01T00:00:00", "s")


def make_chunk(index: int, rows: int, seed: int = 0):  # -> pyarrow.Table
    """Rows ``index * CHUNK_ROWS`` .. ``+ rows`` of the table for ``seed``, as an Arrow table."""
    import pyarrow as pa

    rng = np.random.default_rng([seed, index])
    first = index * CHUNK_ROWS
    ids = np.arange(first, first + rows, dtype=np.int64)
    floats = rng.normal(size=(rows, N_FLOATS))
    floats[:, 1] = rng.uniform(0, 100, size=rows)
    count = rng.poisson(3, size=rows).astype(np.int64)
    region = rng.integers(0, len(REGIONS), size=rows)
    device = rng.integers(0, len(DEVICES), size=rows)
    logit = (
        1.5 * floats[:, 0]
        - floats[:, 2]
        + 0.03 * (floats[:, 1] - 50)
        + 0.4 * count
        - 1.2
        + np.array([0.8, -0.8, 0.4, -0.4, 0.0])[region]
        + rng.logistic(scale=0.6, size=rows)
    )
    columns = {"id": pa.array(ids), "event_time": pa.array(START + ids, pa.timestamp("s"))}
    for j in range(N_FLOATS):
        mask = rng.random(rows) < MISSING_FLOATS[j] if j in MISSING_FLOATS else None
        columns[f"x{j}"] = pa.array(np.round(floats[:, j], 6), mask=mask)
    columns["count"] = pa.array(count)
    columns["region"] = pa.DictionaryArray.from_arrays(
        pa.array(region.astype(np.int32)), pa.array(REGIONS)
    ).cast(pa.string())
    columns["device"] = pa.DictionaryArray.from_arrays(
        pa.array(device.astype(np.int32), mask=rng.random(rows) < 0.01), pa.array(DEVICES)
    ).cast(pa.string())
    columns["target"] = pa.array((logit > 0).astype(np.int64))
    return pa.table(columns)


def make_chunks(rows: int, seed: int = 0) -> Iterator:
    """The table of ``rows`` rows, one Arrow table of at most ``CHUNK_ROWS`` rows at a time."""
    for index, start in enumerate(range(0, rows, CHUNK_ROWS)):
        yield make_chunk(index, min(CHUNK_ROWS, rows - start), seed)


def write_table(rows: int, out: str | Path, seed: int = 0) -> Path:
    """Write the table to ``out`` (``.csv`` or ``.parquet``), chunk by chunk, atomically."""
    import pyarrow.csv as csv
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from stages.common.io import atomic_path

    out = Path(out)
    if out.suffix not in (".csv", ".parquet"):
        raise SystemExit(f"{out}: the file name must end in .csv or .parquet")
    with (
        atomic_path(out) as tmp,
        tqdm(total=rows, unit="row", unit_scale=True, desc=out.name, disable=None) as progress,
    ):
        writer = None
        try:
            for chunk in make_chunks(rows, seed):
                if writer is None:
                    writer = (
                        csv.CSVWriter(tmp, chunk.schema)
                        if out.suffix == ".csv"
                        else pq.ParquetWriter(tmp, chunk.schema)
                    )
                writer.write_table(chunk)
                progress.update(chunk.num_rows)
        finally:
            if writer is not None:
                writer.close()
    logger.info("wrote %s rows to %s (%.1f MB)", f"{rows:,}", out, out.stat().st_size / 1e6)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.synth",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="example: python -m bench.synth --rows 1e6 --out data/source/synth.csv",
    )
    parser.add_argument(
        "--rows",
        type=lambda text: int(float(text)),
        required=True,
        help="number of rows (1e6 and 1_000_000 both work)",
    )
    parser.add_argument("--out", type=Path, required=True, help="a .csv or .parquet file")
    parser.add_argument("--seed", type=int, default=0, help="same seed + rows = same table")
    args = parser.parse_args(argv)
    if args.rows <= 0:
        parser.error("--rows must be positive")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_table(args.rows, args.out, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
