"""The fitted preprocessing that travels with the model: impute, scale, one-hot encode, and
calendar features of datetime columns (model/datetimes.py).

The same fitted preprocessor gives tree models (gbdt) their own view of the rows,
:meth:`FittedPreprocessor.transform_native`: numbers as they are (missing stays NaN), each
categorical column as its index among the fitted categories (unknown or missing: NaN), the
same calendar features; HistGradientBoosting handles the gaps and categories itself.

Fitted on the train split only (features stage), saved next to the data, loaded by train,
evaluate and the served model, so every one of them applies exactly the same transform.
No torch here: serving and the data stages import this without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from model.errors import DataError
from model.files import atomic_path

if TYPE_CHECKING:
    from sklearn.compose import ColumnTransformer


@dataclass
class FittedPreprocessor:
    """A ColumnTransformer fitted on the train split, plus what it was fitted for.

    Attributes:
        transformer: numeric columns -> median impute + standard scale; categorical
            columns -> most-frequent impute + one-hot (unknown categories become all zeros);
            datetime columns (if any) -> cyclic calendar features.
        feature_columns: the raw input columns, in the order the transformer expects.
        target: the label column name.
        classes: sorted label values (plain Python scalars); class id = index in this list.
    """

    transformer: ColumnTransformer
    feature_columns: list[str]
    target: str
    classes: list[Any]

    @property
    def n_features(self) -> int:
        """Width of the transformed matrix."""
        return len(self.transformer.get_feature_names_out())

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        """Raw rows -> float32 matrix ``(n, n_features)``; extra columns are ignored."""
        self._check_columns(df)
        fast = self._transform_numeric(df)
        if fast is not None:
            return fast
        matrix = self.transformer.transform(df[self.feature_columns])
        with np.errstate(over="ignore"):
            matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        if not np.isfinite(matrix).all():
            # A finite float64 value can still overflow float32 after scaling.
            bad = self.transformer.get_feature_names_out()[~np.isfinite(matrix).all(axis=0)][0]
            raise DataError(
                "value too large for float32 after scaling",
                rule="float32_range",
                column=str(bad).split("__", 1)[-1],
            )
        return matrix

    def _check_columns(self, df: pd.DataFrame) -> None:
        missing = [col for col in self.feature_columns if col not in df.columns]
        if missing:
            raise DataError(
                f"input lacks feature column(s) {missing}", column=missing[0], rule="column_present"
            )

    def _fitted_parts(self) -> list[tuple[str, Any, list[str]]]:
        # (name, fitted step, columns) of the num, cat and date parts that have columns.
        return [
            (name, step, list(cols))
            for name, step, cols in self.transformer.transformers_
            if name != "remainder" and len(cols)
        ]

    def transform_native(self, df: pd.DataFrame) -> np.ndarray:
        """Raw rows -> float64 matrix for tree models, with the fitted preprocessor's columns:
        numeric columns as numbers with NaN kept (no imputation, no scaling), each categorical
        column as its index among the fitted categories (NaN when missing or unseen in train),
        then the calendar features of the datetime columns (as :meth:`transform` gives them).
        """
        self._check_columns(df)
        blocks = []
        for name, step, cols in self._fitted_parts():
            part = df[cols]
            if name == "num":
                blocks.append(_to_float(part).to_numpy(dtype=np.float64))
            elif name == "cat":
                texts = _to_category_strings(part)
                fitted = step.named_steps["onehot"].categories_
                blocks.append(
                    np.column_stack(
                        [
                            texts[col].map({c: i for i, c in enumerate(cats)}).to_numpy(float)
                            for col, cats in zip(cols, fitted, strict=True)
                        ]
                    )
                )
            else:
                blocks.append(np.asarray(step.transform(part), dtype=np.float64))
        if not blocks:
            return np.empty((len(df), 0))
        return np.ascontiguousarray(np.hstack(blocks))

    def native_categorical(self, max_categories: int) -> list[bool]:
        """Which columns of :meth:`transform_native` are categories (a tree model's
        ``categorical_features``); a column with more than ``max_categories`` categories
        (HistGradientBoosting's ``max_bins``) stays an ordered code."""
        mask: list[bool] = []
        for name, step, cols in self._fitted_parts():
            if name == "cat":
                fitted = step.named_steps["onehot"].categories_
                mask += [len(cats) <= max_categories for cats in fitted]
            else:
                mask += [False] * (
                    len(step.get_feature_names_out()) if name == "date" else len(cols)
                )
        return mask

    def _transform_numeric(self, df: pd.DataFrame) -> np.ndarray | None:
        """The fitted arithmetic in plain numpy for all-numeric inputs, else None.

        Same numbers as the sklearn pipeline (median fill, then ``(x - mean_) / scale_`` in
        float64, then float32), without its per-call pandas/sklearn overhead (~2 ms, more than
        the network on a single row). Anything off this path (categorical columns, a
        non-numeric or infinite value, a float32 overflow) returns None: the general path then
        gives its own result or error.
        """
        parts = {name: (step, list(cols)) for name, step, cols in self.transformer.transformers_}
        numeric, columns = parts.get("num", (None, []))
        if parts.get("cat", (None, []))[1] or columns != self.feature_columns:
            return None
        x = (df if df.columns.tolist() == columns else df[columns]).to_numpy()
        if x.dtype.kind not in "iuf" or len(x) == 0:
            return None
        fill = numeric.named_steps["impute"].statistics_
        scaler = numeric.named_steps["scale"]
        x = x.astype(np.float64, copy=False)
        x = (np.where(np.isnan(x), fill, x) - scaler.mean_) / scaler.scale_
        with np.errstate(over="ignore"):
            out = np.ascontiguousarray(x, dtype=np.float32)
        return out if np.isfinite(out).all() else None

    def encode_labels(self, labels: pd.Series) -> np.ndarray:
        """Label values -> int64 class ids (index into ``classes``)."""
        index = {label: i for i, label in enumerate(self.classes)}
        unseen = sorted({str(v) for v in labels.dropna().unique() if v not in index})
        if unseen or labels.isna().any():
            shown = unseen[:5] + (["<missing>"] if labels.isna().any() else [])
            raise DataError(
                f"label(s) {shown} not among the trained classes {self.classes}",
                column=str(labels.name or self.target),
                rule="label_in_classes",
            )
        # A fresh writable array (pandas may hand back a read-only view of its data).
        return np.array(labels.map(index), dtype=np.int64)


def _to_float(frame: pd.DataFrame) -> pd.DataFrame:
    # Nullable ints/floats (pd.NA) -> float64 with NaN, which SimpleImputer understands.
    if (frame.dtypes == np.float64).all():
        # The common case (and serving's hot path): already float64, one vectorised inf check.
        infinite = np.isinf(frame.to_numpy()).any(axis=0)
        if infinite.any():
            raise DataError(
                "infinite value in a numeric column",
                column=str(frame.columns[infinite.argmax()]),
                rule="finite",
            )
        return frame
    out = {}
    for col in frame.columns:
        try:
            out[col] = pd.to_numeric(frame[col], errors="raise").astype("float64")
        except (ValueError, TypeError) as exc:
            raise DataError(
                f"non-numeric value in a numeric column: {exc}", column=str(col), rule="numeric"
            ) from exc
        if np.isinf(out[col]).any():
            raise DataError("infinite value in a numeric column", column=str(col), rule="finite")
    return pd.DataFrame(out, index=frame.index)


def _to_category_strings(frame: pd.DataFrame) -> pd.DataFrame:
    # One comparable type per column (OneHotEncoder sorts categories); missing stays NaN.
    return frame.apply(
        lambda col: col.astype(object).where(col.notna(), np.nan).map(str, na_action="ignore")
    ).astype(object)


def split_columns(
    df: pd.DataFrame, target: str, date_formats: dict[str, str | None] | None = None
) -> tuple[list[str], list[str], list[str]]:
    """Feature columns split into (numeric, categorical, datetime) by dtype; bool counts as
    categorical, a text column named in ``date_formats`` as datetime."""
    numeric, categorical, datetimes = [], [], []
    for col in df.columns:
        if col == target:
            continue
        dtype = df[col].dtype
        if pd.api.types.is_datetime64_any_dtype(dtype) or col in (date_formats or {}):
            datetimes.append(col)
        elif pd.api.types.is_bool_dtype(dtype) or not pd.api.types.is_numeric_dtype(dtype):
            categorical.append(col)
        else:
            numeric.append(col)
    return numeric, categorical, datetimes


def build_transformer(
    numeric: list[str],
    categorical: list[str],
    categories: list[list[str]] | None = None,
    datetimes: list[str] = (),
    date_formats: dict[str, str | None] | None = None,
) -> ColumnTransformer:
    """The unfitted ColumnTransformer for the given numeric, categorical and datetime columns.

    ``categories``: the one-hot categories per categorical column (default: those seen in fit),
    for a fit on a sample whose full-data categories are already counted. ``date_formats``:
    the strftime format of a datetime column's text form (default ISO 8601).
    """
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

    numeric_steps = Pipeline(
        [
            ("to_float", FunctionTransformer(_to_float, feature_names_out="one-to-one")),
            ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
            ("scale", StandardScaler()),
        ]
    )
    categorical_steps = Pipeline(
        [
            ("to_str", FunctionTransformer(_to_category_strings, feature_names_out="one-to-one")),
            ("impute", SimpleImputer(strategy="most_frequent", keep_empty_features=True)),
            (
                "onehot",
                OneHotEncoder(
                    categories=categories or "auto", handle_unknown="ignore", sparse_output=False
                ),
            ),
        ]
    )
    parts = [("num", numeric_steps, numeric), ("cat", categorical_steps, categorical)]
    if datetimes:  # only then: preprocessors without dates keep their exact layout
        from model.datetimes import CalendarFeatures

        formats = {col: (date_formats or {}).get(col) for col in datetimes}
        parts.append(("date", CalendarFeatures(formats), list(datetimes)))
    return ColumnTransformer(parts, remainder="drop", sparse_threshold=0.0)


def fit_preprocessor(
    train_df: pd.DataFrame, target: str, date_formats: dict[str, str | None] | None = None
) -> FittedPreprocessor:
    """Fit the preprocessing on the train split only (no statistics leak from val/test).

    Datetime columns (and text columns named in ``date_formats``, parsed with that format)
    become calendar features.

    Raises:
        DataError: the target is missing or has missing labels, or no feature columns.
    """
    if target not in train_df.columns:
        raise DataError("target column not found", column=target, rule="column_present")
    if train_df[target].isna().any():
        raise DataError(
            f"{int(train_df[target].isna().sum())} row(s) without a label",
            column=target,
            rule="not_null",
        )
    numeric, categorical, datetimes = split_columns(train_df, target, date_formats)
    if not numeric and not categorical and not datetimes:
        raise DataError("no feature columns besides the target", column=target, rule="has_features")
    transformer = build_transformer(
        numeric, categorical, datetimes=datetimes, date_formats=date_formats
    )
    feature_columns = [col for col in train_df.columns if col != target]
    transformer.fit(train_df[feature_columns])
    classes = [_plain(value) for value in sorted(train_df[target].unique())]
    return FittedPreprocessor(transformer, feature_columns, target, classes)


def _plain(value: Any) -> Any:
    # numpy scalars -> int/float/str/bool, so classes serialise to JSON and compare simply.
    return value.item() if hasattr(value, "item") else value


def save_preprocessor(preprocessor: FittedPreprocessor, path: str | Path) -> None:
    """Write the fitted preprocessor with joblib, atomically."""
    import joblib

    with atomic_path(path) as tmp:
        joblib.dump(preprocessor, tmp)


def load_preprocessor(path: str | Path, sha256: str | None = None) -> FittedPreprocessor:
    """Read a preprocessor written by ``save_preprocessor``; a bad file gets a clear error.

    Args:
        sha256: the file's expected hash: checked before the file is unpickled (a joblib file
            runs code when loaded), ArtifactIntegrityError on a difference.
    """
    import joblib

    path = Path(path)
    if not path.is_file():
        raise DataError(
            "preprocessor not found; run the features stage first", file=str(path), rule="exists"
        )
    if sha256 is not None:
        from model.artifacts import ArtifactIntegrityError, file_sha256

        if (actual := file_sha256(path)) != sha256:
            raise ArtifactIntegrityError(
                f"{path}: sha256 {actual} is not the expected {sha256} (damaged or replaced); "
                "not unpickled. Fix: rebuild it (features stage) or re-register the model"
            )
    try:
        preprocessor = joblib.load(path)
    except (ModuleNotFoundError, AttributeError) as exc:  # a class no longer where it was
        raise DataError(
            f"written by an older version of the code ({exc}); re-run the features stage "
            "(`dvc repro features`, or `make run`) to write it again",
            file=str(path),
            rule="code_version",
        ) from exc
    except Exception as exc:  # joblib/pickle raise many types for a damaged file
        raise DataError(
            f"not a readable joblib file: {exc}", file=str(path), rule="joblib"
        ) from exc
    if not isinstance(preprocessor, FittedPreprocessor):
        raise DataError(
            f"holds a {type(preprocessor).__name__}, not a FittedPreprocessor",
            file=str(path),
            rule="preprocessor",
        )
    return preprocessor
