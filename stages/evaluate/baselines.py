"""The rows evaluate scores, and the baselines it scores beside the model on the same test split.

``majority`` (the most frequent train class, with the train class shares as probabilities) and
``logistic`` (LogisticRegression on the fitted preprocessor's features) are the register gate's
baselines. The strong baseline, HistGradientBoosting with scikit-learn's defaults on the
preprocessor's tree view of the same train rows (NaN kept, categories native, like the gbdt
family), is a reference only (``strong_gbdt_<metric>`` in metrics.json, not gated).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from model.files import PREPROCESSOR_FILE
from model.metrics import STRONG_BASELINE, compute_metrics
from stages.common.config import Params
from stages.common.errors import DataError
from stages.common.io import iter_batches, read_parquet


@dataclass
class Rows:
    """One split's raw rows and the fitted preprocessor; each view computed once, on demand.

    A bad value raises DataError naming the split's file.
    """

    preprocessor: Any  # model.preprocess.FittedPreprocessor
    frame: Any  # pandas.DataFrame
    path: Path

    def view(self, make: Any) -> np.ndarray:
        """``make(frame)`` (a view of the rows), its DataError naming the file."""
        try:
            return make(self.frame)
        except DataError as exc:
            raise _with_file(exc, self.path) from exc

    @cached_property
    def encoded(self) -> np.ndarray:
        """The networks' (and the simple baselines') view: ``preprocessor.transform``."""
        return self.view(self.preprocessor.transform)

    @cached_property
    def native(self) -> np.ndarray:
        """The trees' view: ``preprocessor.transform_native`` (NaN kept, category codes)."""
        return self.view(self.preprocessor.transform_native)

    @cached_property
    def y(self) -> np.ndarray:
        """The class ids."""
        target = self.preprocessor.target
        return self.view(lambda frame: self.preprocessor.encode_labels(frame[target]))


def load_rows(features_dir: Path, split: str, max_rows: int | None = None) -> Rows:
    """A split's rows with the fitted preprocessor; at most ``max_rows`` rows, sampled."""
    from model.preprocess import load_preprocessor

    path = features_dir / f"{split}.parquet"
    preprocessor = load_preprocessor(features_dir / PREPROCESSOR_FILE)
    frame = read_parquet(path) if max_rows is None else _sample_rows(path, max_rows)
    if preprocessor.target not in frame.columns:
        raise DataError(
            "target column not found",
            file=str(path),
            column=preprocessor.target,
            rule="column_present",
        )
    return Rows(preprocessor, frame, path)


def load_split(
    features_dir: Path, split: str, max_rows: int | None = None
) -> tuple[Any, np.ndarray, np.ndarray]:
    """(preprocessor, features, class ids) of a split; at most ``max_rows`` rows, sampled."""
    rows = load_rows(features_dir, split, max_rows)
    return rows.preprocessor, rows.encoded, rows.y


def _sample_rows(path: Path, max_rows: int) -> Any:
    # Streams the file; keeps every row when it has few enough, else a seeded uniform sample.
    import pyarrow as pa
    import pyarrow.parquet as pq

    total = pq.ParquetFile(path).metadata.num_rows
    if total <= max_rows:
        return read_parquet(path)
    rng = np.random.default_rng(0)
    kept = [
        batch.filter(pa.array(rng.random(batch.num_rows) < max_rows / total))
        for batch in iter_batches(path, 65536)
    ]
    return pa.Table.from_batches(kept).to_pandas()


def _with_file(exc: DataError, path: Path) -> DataError:
    # The same error, now naming the file (DataError appends "[file=.., column=.., rule=..]").
    where = ", ".join(
        f"{key}={value}"
        for key, value in (("file", exc.file), ("column", exc.column), ("rule", exc.rule))
        if value is not None
    )
    message = str(exc).removesuffix(f" [{where}]") if where else str(exc)
    return DataError(message, file=str(path), column=exc.column, rule=exc.rule)


def baseline_probas(
    X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, n_classes: int, seed: int
) -> dict[str, np.ndarray]:
    """Class probabilities of the baselines on ``X_test``, fitted on ``(X_train, y_train)``.

    ``majority``: the most frequent train class, the train class shares as probabilities.
    ``logistic``: LogisticRegression (L2, lbfgs) on the preprocessed features.

    Returns:
        ``{name: proba (n_test, n_classes)}`` for each name in ``BASELINES``.
    """
    import warnings

    from sklearn.dummy import DummyClassifier
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    models = {
        "majority": DummyClassifier(strategy="prior"),
        "logistic": LogisticRegression(max_iter=1000, random_state=seed),
    }
    out = {}
    for name, model in models.items():
        with warnings.catch_warnings():  # a not-quite-converged baseline is still a baseline
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(X_train, y_train)
        proba = np.zeros((len(X_test), n_classes))
        proba[:, model.classes_] = model.predict_proba(X_test)  # a class absent from train: 0
        out[name] = proba
    return out


def strong_baseline_proba(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    n_classes: int,
    seed: int,
    categorical: list[bool] | None = None,
) -> np.ndarray:
    """Class probabilities on ``X_test`` of HistGradientBoosting with scikit-learn's defaults
    (100 rounds at most; on more than 10,000 rows its own early stopping on a 10% hold-out),
    ``categorical`` marking the columns it splits as categories."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    from model.gbdt import gbdt_proba

    mask = np.array(categorical, dtype=bool) if any(categorical or ()) else None
    model = HistGradientBoostingClassifier(random_state=seed, categorical_features=mask)
    return gbdt_proba(model.fit(X_train, y_train), X_test, n_classes)  # absent class: 0


def score_baselines(
    features_dir: Path,
    X_test: np.ndarray,
    y_test: np.ndarray,
    params: Params,
    *,
    strong_test: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """Fit the baselines on (a sample of) the train split; their metrics on the test split.

    ``strong_test``: the test split's tree view (``Rows.native``); then also the strong
    baseline, under :data:`model.metrics.STRONG_BASELINE`, fitted on the same train rows.
    """
    train = load_rows(features_dir, "train", params.evaluate.baseline_max_rows)
    n_classes, seed = len(train.preprocessor.classes), params.base.seed
    probas = baseline_probas(train.encoded, train.y, X_test, n_classes, seed)
    if strong_test is not None:
        from sklearn.ensemble import HistGradientBoostingClassifier

        categorical = train.preprocessor.native_categorical(
            HistGradientBoostingClassifier().max_bins
        )
        probas[STRONG_BASELINE] = strong_baseline_proba(
            train.native, train.y, strong_test, n_classes, seed, categorical
        )
    return {name: compute_metrics(y_test, proba) for name, proba in probas.items()}
