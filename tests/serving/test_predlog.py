"""The prediction log's sampling: the draw is made for every request, and a request logged only
because a row broke the contract says so (``sampled`` false). No server: the log alone."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from serving.model import LoadedModel
from serving.payloads import ColumnSpec, InputSpec
from serving.predlog import PredictionLog

MODEL = LoadedModel(
    uri="models:/clf/1",
    variant="pyfunc",
    spec=InputSpec((ColumnSpec("x", "float"),)),
    output_columns=("prediction", "proba_a", "proba_b"),
    predictor=lambda frame: frame,
    name="clf",
    version="1",
)


def log_requests(log: PredictionLog, bad: set[int], n: int) -> pd.DataFrame:
    """``n`` one-row requests (``x`` = i), those in ``bad`` marked; flushed and read back."""
    for i in range(n):
        log.maybe_add(
            MODEL,
            f"r{i}",
            [[float(i)]],
            [{"prediction": "a", "proba_a": 0.9, "proba_b": 0.1}],
            1.7e9 + i,
            ["x:between"] if i in bad else None,
        )
    log.flush()
    return pd.read_parquet(log.directory)


def test_marked_requests_are_kept_but_only_the_draw_makes_them_sampled(tmp_path: Path) -> None:
    bad = set(range(0, 2000, 50))  # 2 % of the requests
    logged = log_requests(PredictionLog(tmp_path, 0.1, seed=7), bad, 2000)

    assert logged["sampled"].dtype == bool
    marked = logged["row_violations"].notna()
    assert marked.sum() == len(bad)  # every marked request is logged, sampled or not
    assert not (~logged["sampled"] & ~marked).any()  # an unsampled row is there for its mark
    sampled = logged[logged["sampled"]]
    assert 150 < len(sampled) < 250  # about 0.1 of 2000
    # the sampled rows are a uniform sample: their bad share stays near 2 %, all rows' is not
    assert sampled["row_violations"].notna().mean() < 0.06
    assert marked.mean() > 0.12


def test_sampling_off_logs_the_marked_rows_alone_none_of_them_sampled(tmp_path: Path) -> None:
    logged = log_requests(PredictionLog(tmp_path, 0.0), {3, 5}, 10)
    assert logged["request_id"].tolist() == ["r3", "r5"] and not logged["sampled"].any()
    everything = log_requests(PredictionLog(tmp_path / "all", 1.0), {3}, 4)
    assert everything["sampled"].all() and len(everything) == 4
