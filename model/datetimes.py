"""Calendar features for datetime columns, computed inside the fitted preprocessor.

A datetime column becomes the sine and cosine of its month, day of week and day of year (and of
its hour of day when the train times are not all midnight): cyclic, so December sits next to
January. They are computed from raw rows, so serving gets them from a row exactly as it stands
in the source table: datetime values, or text parsed with the column's strftime format (from
the suite, carried in the validated Parquet field metadata ``b"format"``; Arrow's strptime, as
the validate stage parses it), ISO 8601 when there is none or a value does not match it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin

from model.errors import DataError

# part -> (the value, its period): each gives a sin and a cos feature
PARTS = {
    "month": (lambda stamps: stamps.dt.month - 1, 12),
    "weekday": (lambda stamps: stamps.dt.dayofweek, 7),
    "yearday": (lambda stamps: stamps.dt.dayofyear - 1, 366),
    "hour": (lambda stamps: stamps.dt.hour + stamps.dt.minute / 60, 24),
}
DAY_US = 86_400_000_000  # microseconds in a day


def to_datetimes(values: pd.Series, date_format: str | None, column: str) -> pd.Series:
    """``values`` as tz-naive datetime64 (tz-aware ones in UTC); text parsed with
    ``date_format``, then ISO 8601.

    Raises:
        DataError: a value that is neither (rule ``date_format``).
    """
    parsed, bad = parse_dates(values, date_format)
    if bad.any():
        texts = values.astype(object)[bad]
        expected = f"format {date_format} (or ISO 8601)" if date_format else "ISO 8601"
        raise DataError(
            f"value {str(texts.iloc[0])!r} is not a date in {expected}",
            column=column,
            rule="date_format",
        )
    return parsed


def parse_dates(values: pd.Series, date_format: str | None) -> tuple[pd.Series, np.ndarray]:
    """``values`` parsed as ``to_datetimes`` does, without raising: the one date parser of
    the features stage, the preprocessor and serving's row checks (``date_format``).

    Text is parsed with Arrow's strptime and ``date_format`` (as the validate stage does),
    then as ISO 8601; datetime values stay as they are (tz-aware ones in UTC).

    Returns:
        (tz-naive datetime64 values, NaT where missing or unparsed; a boolean mask of the
        present values that parse neither way).
    """
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        stamps = values.dt.tz_convert(None) if values.dt.tz is not None else values
        return stamps, np.zeros(len(values), dtype=bool)
    present = values.notna().to_numpy()
    texts = values.astype(object).map(str, na_action="ignore")
    parsed = pd.Series(pd.NaT, index=values.index, dtype="datetime64[us]")
    if date_format is not None and present.any():
        parsed = _strptime(texts, date_format)
    left = present & parsed.isna().to_numpy()
    if left.any():
        iso = pd.to_datetime(texts[left], format="ISO8601", errors="coerce", utc=True)
        parsed[left] = iso.dt.tz_convert(None).astype("datetime64[us]")
    return parsed, left & parsed.isna().to_numpy()


def _strptime(texts: pd.Series, date_format: str) -> pd.Series:
    import pyarrow as pa
    import pyarrow.compute as pc

    index = texts.index
    texts = pa.array(texts.to_numpy(dtype=object), pa.string(), from_pandas=True)  # NaN: null
    parsed = pc.strptime(texts, format=date_format, unit="us", error_is_null=True)
    return pd.Series(parsed.to_numpy(zero_copy_only=False), index=index, dtype="datetime64[us]")


def times_vary(stamps: pd.Series) -> bool:
    """Whether any value has a time of day other than midnight."""
    ticks = stamps.dropna().astype("datetime64[us]").astype("int64").to_numpy()
    return bool((ticks % DAY_US).any())


class CalendarFeatures(TransformerMixin, BaseEstimator):
    """Datetime columns -> cyclic calendar features; a missing date gives zeros.

    Args:
        formats: column -> strftime format of its text form (None or absent: ISO 8601).
    """

    def __init__(self, formats: dict[str, str | None] | None = None) -> None:
        self.formats = formats

    def fit(self, X: pd.DataFrame, y: Any = None) -> CalendarFeatures:
        """Note the columns and which of them have times of day (they get an hour too)."""
        self.columns_ = [str(col) for col in X.columns]
        self.n_features_in_ = len(self.columns_)
        self.hours_ = {col: times_vary(self._stamps(X, col)) for col in self.columns_}
        return self

    def transform(self, X: pd.DataFrame) -> np.ndarray:
        """Raw dates (datetime values or text) -> float64 ``(n, 2 x parts)``."""
        out = []
        for col in self.columns_:
            stamps = self._stamps(X, col)
            for part in self._parts(col):
                value, period = PARTS[part]
                angle = (
                    2 * np.pi * value(stamps).to_numpy(dtype=np.float64, na_value=np.nan) / period
                )
                out += [np.nan_to_num(np.sin(angle)), np.nan_to_num(np.cos(angle))]
        return np.column_stack(out) if out else np.empty((len(X), 0))

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """``<column>_<part>_sin`` / ``_cos`` for each column and part."""
        return np.array(
            [
                f"{col}_{part}_{wave}"
                for col in self.columns_
                for part in self._parts(col)
                for wave in ("sin", "cos")
            ],
            dtype=object,
        )

    def _parts(self, col: str) -> list[str]:
        return [part for part in PARTS if part != "hour" or self.hours_[col]]

    def _stamps(self, X: pd.DataFrame, col: str) -> pd.Series:
        return to_datetimes(X[col], (self.formats or {}).get(col), col)
