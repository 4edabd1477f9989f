"""Fit the preprocessor on a train split that streams past in record batches.

Exact statistics are gathered over every train row (running mean/variance merged with Chan's
formula in float64, category counts); the median imputer comes from a seeded bottom-k sample
of at most ``sample_rows`` train rows (all of them, so the exact median, when the split is
smaller). The result is a genuinely fitted sklearn ColumnTransformer (``FittedPreprocessor``),
the same object ``fit_preprocessor`` returns for an in-memory frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from model.datetimes import DAY_US
from model.preprocess import FittedPreprocessor, build_transformer
from stages.common.errors import DataError
from stages.features.splits import hash_keys

SAMPLE_ROWS = 100_000  # train rows kept for the median imputer


class TrainStats:
    """Running statistics of the train rows, batch by batch; ``fit`` builds the preprocessor."""

    def __init__(
        self,
        numeric: list[str],
        categorical: list[str],
        seed: int,
        sample_rows: int = SAMPLE_ROWS,
        file: str | None = None,
        datetimes: list[str] = (),
        date_formats: dict[str, str | None] | None = None,
    ) -> None:
        self.numeric, self.categorical, self.file = numeric, categorical, file
        self.datetimes, self.date_formats = list(datetimes), date_formats or {}
        self.times_vary = dict.fromkeys(self.datetimes, False)  # calendar: add the hour?
        self.seed, self.sample_rows = seed, sample_rows
        width = len(numeric)
        self.count = np.zeros(width, dtype=np.int64)  # non-missing values per column
        self.rows = 0
        self.mean = np.zeros(width)
        self.m2 = np.zeros(width)  # sum of squared deviations from the mean
        self.categories: list[dict[str, int]] = [{} for _ in categorical]
        # sample candidates: (numeric values (columns, rows) in float64, their keys)
        self.pending: list[tuple[np.ndarray, np.ndarray]] = [
            (np.empty((width, 0)), np.empty(0, dtype=np.int64))
        ]
        self.pending_rows = 0
        self.cutoff: int | None = None  # rows with a key at or above this cannot be sampled

    def update(self, batch: Any, row_ids: np.ndarray) -> None:
        """Add train rows (a pyarrow RecordBatch) whose row numbers in the data are ``row_ids``."""
        self.rows += batch.num_rows
        columns = [_to_float64(batch.column(name)) for name in self.numeric]
        for j, (name, values) in enumerate(zip(self.numeric, columns, strict=True)):
            self._add_moments(j, name, values)
        for j, name in enumerate(self.categorical):
            self._add_counts(j, batch.column(name))
        for name in self.datetimes:
            self.times_vary[name] = self.times_vary[name] or _times_vary(batch.column(name))
        self._add_sample(columns, row_ids)

    def drop_categorical(self, name: str) -> None:
        """Leave the categorical column ``name`` out of the fit (e.g. too many distinct values)."""
        j = self.categorical.index(name)
        self.categorical = self.categorical[:j] + self.categorical[j + 1 :]
        self.categories = self.categories[:j] + self.categories[j + 1 :]

    def _add_moments(self, j: int, name: str, values: np.ndarray) -> None:
        missing = np.isnan(values)
        present = values[~missing] if missing.any() else values
        if len(present) == 0:
            return
        mean = present.mean()
        if not np.isfinite(mean) and np.isinf(present).any():
            raise DataError(
                "infinite value in a numeric column", file=self.file, column=name, rule="finite"
            )
        deviation = present - mean
        m2 = float(np.square(deviation, out=deviation).sum())
        merged = _merge_moments((self.count[j], self.mean[j], self.m2[j]), (len(present), mean, m2))
        self.count[j], self.mean[j], self.m2[j] = merged

    def _add_counts(self, j: int, column: Any) -> None:
        import pyarrow.compute as pc

        counts = self.categories[j]
        for item in pc.value_counts(column).to_pylist():  # one item per distinct value
            if item["values"] is not None:
                key = str(item["values"])  # as _to_category_strings writes it (True -> "True")
                counts[key] = counts.get(key, 0) + item["counts"]

    def _add_sample(self, columns: list[np.ndarray], row_ids: np.ndarray) -> None:
        # bottom-k sampling of the numeric values (all the median imputer needs): keep the rows
        # with the smallest seeded hash of their row number, a uniform sample that does not
        # depend on how the rows were batched. Candidates pile up until there are twice the
        # sample's rows, then the smallest keys are kept.
        keys = (hash_keys(self.seed, row_ids) >> np.uint64(1)).view(np.int64)
        keep = slice(None) if self.cutoff is None else np.flatnonzero(keys < self.cutoff)
        keys = keys[keep]
        values = np.empty((len(columns), len(keys)))  # one row per column: contiguous copies
        for j, column in enumerate(columns):
            values[j] = column[keep]
        self.pending.append((values, keys))
        self.pending_rows += len(keys)
        if self.pending_rows >= 2 * self.sample_rows:
            self._compact()

    def _compact(self) -> None:
        values = np.concatenate([rows for rows, _ in self.pending], axis=1)
        keys = np.concatenate([keys for _, keys in self.pending])
        if len(keys) > self.sample_rows:
            kept = np.sort(np.argpartition(keys, self.sample_rows - 1)[: self.sample_rows])
            values, keys = values[:, kept], keys[kept]
            self.cutoff = keys.max()
        self.pending, self.pending_rows = [(values, keys)], len(keys)

    def _sample_frame(self, feature_columns: list[str]) -> Any:
        # the numeric sample, plus each categorical column at its most frequent value (their
        # fitted categories and fill values come from the full counts; all-missing stays None)
        import pandas as pd

        self._compact()
        values, keys = self.pending[0]
        frame = {name: values[j] for j, name in enumerate(self.numeric)}
        for name, counts in zip(self.categorical, self.categories, strict=True):
            frame[name] = pd.Series([_most_frequent(counts)] * len(keys), dtype=object)
        for name in self.datetimes:  # calendar features have no statistics: hours are set after
            frame[name] = pd.Series(pd.NaT, index=range(len(keys)), dtype="datetime64[us]")
        return pd.DataFrame(frame)[feature_columns]

    def fit(
        self, target: str, feature_columns: list[str], classes: list[Any]
    ) -> FittedPreprocessor:
        """The preprocessor: fitted on the sample, then given the full train statistics."""
        if self.rows == 0:
            raise DataError(
                "no train rows to fit the preprocessing on",
                file=self.file,
                column=target,
                rule="not_empty",
            )
        sample = self._sample_frame(feature_columns)
        categories = {
            name: sorted(counts)
            for name, counts in zip(self.categorical, self.categories, strict=True)
        }
        if not all(categories.values()):  # an all-missing column: its imputed value, as sklearn
            auto = build_transformer(self.numeric, self.categorical).fit(
                sample[self.numeric + self.categorical]
            )
            fitted = auto.named_transformers_["cat"].named_steps["onehot"].categories_
            categories = {
                name: cats or list(fitted[i]) for i, (name, cats) in enumerate(categories.items())
            }
        transformer = build_transformer(
            self.numeric,
            self.categorical,
            [categories[name] for name in self.categorical],
            self.datetimes,
            self.date_formats,
        )
        transformer.fit(sample)
        if self.numeric:
            self._set_scaler(transformer.named_transformers_["num"])
        if self.categorical:
            self._set_most_frequent(transformer.named_transformers_["cat"])
        if self.datetimes:
            transformer.named_transformers_["date"].hours_ = dict(self.times_vary)
        return FittedPreprocessor(transformer, feature_columns, target, classes)

    def _set_scaler(self, numeric_steps: Any) -> None:
        # the scaler sees imputed values: merge each column's missing ones in as the fill value
        fill = numeric_steps.named_steps["impute"].statistics_
        _, mean, m2 = _merge_moments(
            (self.count, self.mean, self.m2), (self.rows - self.count, fill, 0.0)
        )
        scaler = numeric_steps.named_steps["scale"]
        n, var = self.rows, m2 / self.rows
        # near-constant features get scale 1, as StandardScaler decides it
        eps = np.finfo(np.float64).eps
        constant = var <= n * eps * var + (n * mean * eps) ** 2
        scaler.mean_, scaler.var_, scaler.n_samples_seen_ = mean, var, n
        scaler.scale_ = np.where(constant, 1.0, np.sqrt(var))

    def _set_most_frequent(self, categorical_steps: Any) -> None:
        imputer = categorical_steps.named_steps["impute"]
        statistics = imputer.statistics_.copy()
        for j, counts in enumerate(self.categories):
            if counts:
                statistics[j] = _most_frequent(counts)
        imputer.statistics_ = statistics


def _most_frequent(counts: dict[str, int]) -> str | None:
    # ties go to the smallest value, as SimpleImputer breaks them; None when nothing was seen
    if not counts:
        return None
    top = max(counts.values())
    return min(key for key, count in counts.items() if count == top)


def _merge_moments(a: tuple, b: tuple) -> tuple:
    """(count, mean, sum of squared deviations) of two groups merged (Chan et al.), float64;
    works element-wise on arrays of columns."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    total = np.asarray(n_a + n_b)
    share = np.divide(n_b, total, out=np.zeros(total.shape), where=total > 0)
    delta = np.asarray(mean_b, dtype=np.float64) - mean_a
    return total, mean_a + delta * share, m2_a + m2_b + delta * delta * n_a * share


def _times_vary(column: Any) -> bool:
    # a pyarrow timestamp/date column: any time of day other than midnight?
    import pyarrow as pa
    import pyarrow.compute as pc

    ticks = column.cast(pa.timestamp("us")).cast(pa.int64())
    return bool(pc.any(pc.not_equal(pc.divide(ticks, DAY_US) * DAY_US, ticks)).as_py())


def _to_float64(column: Any) -> np.ndarray:
    # a pyarrow numeric column -> float64 numpy with NaN for nulls
    values = column.to_numpy(zero_copy_only=False)
    return values.astype(np.float64, copy=False)
