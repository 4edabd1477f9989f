"""The preprocessor fitted batch by batch (stages/features/streamfit.py) equals a plain fit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from model.preprocess import fit_preprocessor, load_preprocessor, save_preprocessor
from stages.common.errors import DataError
from stages.features.streamfit import TrainStats

NUMERIC, CATEGORICAL = ["x", "n", "empty"], ["color", "flag", "blank"]
FEATURES = ["x", "color", "n", "flag", "empty", "blank"]


def train_frame(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """Floats with gaps, ints, an all-missing column, text with gaps, bools, a label."""
    rng = np.random.default_rng(seed)
    x = rng.normal(50, 10, n)
    x[rng.random(n) < 0.1] = np.nan
    color = rng.choice(["red", "green", "blue", "teal"], n).astype(object)
    color[rng.random(n) < 0.1] = None
    return pd.DataFrame(
        {
            "x": x,
            "color": pd.array(color, dtype="string"),
            "n": rng.integers(0, 9, n),
            "flag": rng.random(n) < 0.3,
            "empty": np.full(n, np.nan),
            "blank": pd.array([None] * n, dtype="string"),
            "y": rng.integers(0, 2, n),
        }
    )


def stream_fit(df: pd.DataFrame, batch: int, sample_rows: int = 100_000):
    table = pa.Table.from_pandas(df, preserve_index=False)
    stats = TrainStats(NUMERIC, CATEGORICAL, seed=5, sample_rows=sample_rows)
    for start, part in zip(
        range(0, len(df), batch), table.to_batches(max_chunksize=batch), strict=False
    ):
        stats.update(part, np.arange(start, start + part.num_rows))
    return stats.fit("y", FEATURES, [0, 1])


def steps(prep, part: str, step: str):
    return prep.transformer.named_transformers_[part].named_steps[step]


@pytest.mark.parametrize("batch", [1, 17, 300])
def test_streaming_fit_equals_a_plain_sklearn_fit(batch: int) -> None:
    df = train_frame()
    plain = fit_preprocessor(df[FEATURES + ["y"]], "y")

    streamed = stream_fit(df, batch)

    assert streamed.feature_columns == plain.feature_columns == FEATURES
    assert list(streamed.transformer.get_feature_names_out()) == list(
        plain.transformer.get_feature_names_out()
    )
    for step in ("impute",):
        np.testing.assert_array_equal(
            steps(streamed, "num", step).statistics_, steps(plain, "num", step).statistics_
        )
        assert list(steps(streamed, "cat", step).statistics_) == list(
            steps(plain, "cat", step).statistics_
        )
    ours, theirs = steps(streamed, "num", "scale"), steps(plain, "num", "scale")
    for attr in ("mean_", "var_", "scale_"):
        np.testing.assert_allclose(getattr(ours, attr), getattr(theirs, attr), rtol=1e-12)
    assert ours.n_samples_seen_ == theirs.n_samples_seen_ == len(df)
    for a, b in zip(
        steps(streamed, "cat", "onehot").categories_,
        steps(plain, "cat", "onehot").categories_,
        strict=True,
    ):
        assert list(a) == list(b)
    rows = train_frame(seed=1)
    np.testing.assert_allclose(streamed.transform(rows), plain.transform(rows), atol=1e-6)


def test_scaler_stays_exact_when_only_a_sample_is_kept() -> None:
    df = train_frame(n=2000).drop(columns="empty").assign(empty=1.0)
    plain = fit_preprocessor(df[FEATURES + ["y"]], "y")

    streamed = stream_fit(df, batch=128, sample_rows=50)

    # the scaler sees every train row (its median fill comes from the 50-row sample)
    fill = steps(streamed, "num", "impute").statistics_
    x = df["x"].fillna(fill[0])
    scaler = steps(streamed, "num", "scale")
    np.testing.assert_allclose(scaler.mean_[0], x.mean(), rtol=1e-12)
    np.testing.assert_allclose(scaler.var_[0], x.var(ddof=0), rtol=1e-12)
    assert abs(fill[0] - np.nanmedian(df["x"])) < 3  # a sample median, near the true one
    assert scaler.scale_[2] == 1.0  # a constant column is not divided by zero
    assert list(steps(streamed, "cat", "onehot").categories_[0]) == list(
        steps(plain, "cat", "onehot").categories_[0]
    )


def test_sample_does_not_depend_on_the_batch_size() -> None:
    df = train_frame(n=1000)

    small, large = stream_fit(df, batch=7, sample_rows=64), stream_fit(df, 500, sample_rows=64)

    np.testing.assert_array_equal(
        steps(small, "num", "impute").statistics_, steps(large, "num", "impute").statistics_
    )


def test_streamed_preprocessor_keeps_the_numeric_fast_path_and_roundtrips(tmp_path) -> None:
    df = train_frame()[["x", "n", "y"]]
    stats = TrainStats(["x", "n"], [], seed=0)
    stats.update(pa.RecordBatch.from_pandas(df, preserve_index=False), np.arange(len(df)))
    prep = stats.fit("y", ["x", "n"], [0, 1])
    save_preprocessor(prep, tmp_path / "prep.joblib")

    loaded = load_preprocessor(tmp_path / "prep.joblib")

    rows = df.drop(columns="y")
    assert loaded._transform_numeric(rows) is not None
    general = np.ascontiguousarray(loaded.transformer.transform(rows), dtype=np.float32)
    np.testing.assert_array_equal(loaded.transform(rows), general)


def test_infinite_train_value_names_file_column_and_rule() -> None:
    stats = TrainStats(["x"], [], seed=0, file="data.parquet")
    batch = pa.RecordBatch.from_pydict({"x": [1.0, float("inf")]})

    with pytest.raises(DataError, match="file=data.parquet, column=x, rule=finite"):
        stats.update(batch, np.arange(2))
