"""Live performance: accuracy and macro F1 per UTC day from ground truth keyed by request id,
or, without labels, estimated from the model's confidence (CBPE).

Labels: a CSV or Parquet file, a folder of them (either also as a ``file://`` URL), or an
http(s) URL answering CSV, fetched with a timeout (a hung endpoint must not hold the schedule's
one run slot); columns ``request_id`` and ``label``. A request of several rows takes its
labels in order: the n-th label row of a request id goes with the n-th logged row of that
request.

CBPE (confidence-based performance estimation): for calibrated probabilities, a row predicted
as class k is right with probability p_k. So expected accuracy = mean of the top probability;
per class expected TP = sum of p_k over rows predicted k, FP = sum of (1 - p_k) over them, FN =
sum of p_k over rows predicted otherwise, giving an expected F1 per class and its macro mean.
"""

from __future__ import annotations

import io
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

PROBA_PREFIX = "proba_"
LABEL_SUFFIXES = (".csv", ".parquet")
URL_TIMEOUT_S = 30.0  # per connect and per read of a labels URL


class LabelsError(ValueError):
    """The labels cannot be read or lack a column."""


@dataclass(frozen=True)
class Performance:
    """Accuracy and macro F1, overall and per UTC day; ``source`` labels | estimated."""

    source: str
    rows: int  # rows scored (labelled rows for "labels")
    accuracy: float | None
    f1_macro: float | None
    by_day: list[dict[str, Any]] = field(default_factory=list)  # day, rows, accuracy, f1_macro

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def read_labels(source: str | Path, timeout_s: float = URL_TIMEOUT_S) -> pd.DataFrame | None:
    """The ground truth (``request_id``, ``label`` as text), or None when there is none yet
    (no such file or folder; an empty folder).

    Args:
        source: a path, a ``file://`` URL (read as its path) or an http(s) URL.
        timeout_s: the most an http(s) URL may take to connect, and to send each piece.

    Raises:
        LabelsError: a file or answer that is not a labels table, an URL that fails, answers
            an HTTP error or times out, or another scheme (each naming it and the fix).
    """
    text = str(source)
    scheme = urllib.parse.urlsplit(text).scheme if "://" in text else ""
    if scheme not in ("", "file", "http", "https"):
        raise LabelsError(
            f"{text}: cannot read labels from a {scheme}:// URL; give a path, a file:// or an "
            "http(s) URL (params monitor.labels)"
        )
    try:
        if scheme in ("http", "https"):
            frame = pd.read_csv(io.BytesIO(_fetch(text, timeout_s)), dtype=str)
        else:
            path = Path(
                urllib.request.url2pathname(urllib.parse.urlsplit(text).path)
                if scheme == "file"
                else text
            )
            files = (
                sorted(p for p in path.iterdir() if p.suffix in LABEL_SUFFIXES)
                if path.is_dir()
                else [path]
                if path.is_file()
                else []
            )
            if not files:
                return None
            frame = pd.concat([_read_file(p) for p in files], ignore_index=True)
    except LabelsError:
        raise
    except Exception as exc:
        raise LabelsError(
            f"{text}: cannot read the labels ({type(exc).__name__}: {exc}); expected CSV or "
            "Parquet with columns request_id, label (params monitor.labels)"
        ) from exc
    missing = [c for c in ("request_id", "label") if c not in frame.columns]
    if missing:
        raise LabelsError(
            f"{text}: no column(s) {missing}; a labels table has columns request_id, label "
            f"(it has {list(frame.columns)[:10]})"
        )
    return frame[["request_id", "label"]].astype({"request_id": str, "label": str})


def _fetch(url: str, timeout_s: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as answer:  # noqa: S310 - http(s) only
            return answer.read()
    except (OSError, HTTPException) as exc:  # URLError, HTTPError and timeouts are OSErrors
        raise LabelsError(
            f"{url}: cannot fetch the labels ({type(exc).__name__}: {exc}; timeout "
            f"{timeout_s:g} s); check the URL and that it answers CSV with columns request_id, "
            "label (params monitor.labels)"
        ) from exc


def _read_file(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        return pd.read_parquet(path).astype(str)
    return pd.read_csv(path, dtype=str)


def live_performance(current: pd.DataFrame, labels: pd.DataFrame) -> Performance:
    """Accuracy and macro F1 of the logged predictions that have a label, overall and per UTC
    day of ``logged_at``; rows without a label are left out."""
    rows = current[current["prediction"].notna()].copy()
    rows["_n"] = rows.groupby("request_id").cumcount()
    truth = labels.copy()
    truth["_n"] = truth.groupby("request_id").cumcount()
    joined = rows.merge(truth, on=["request_id", "_n"], how="inner")
    if joined.empty:
        return Performance("labels", 0, None, None)
    y_true, y_pred = joined["label"].astype(str), joined["prediction"].astype(str)
    days = pd.to_datetime(joined["logged_at"], utc=True).dt.strftime("%Y-%m-%d")
    by_day = [
        {"day": day, "rows": int(mask.sum()), **_scores(y_true[mask], y_pred[mask])}
        for day, mask in ((d, days == d) for d in sorted(days.unique()))
    ]
    return Performance("labels", len(joined), **_scores(y_true, y_pred), by_day=by_day)


def _scores(y_true: pd.Series, y_pred: pd.Series) -> dict[str, float]:
    labels = sorted(set(y_true) | set(y_pred))
    f1s = []
    for label in labels:
        tp = float(((y_pred == label) & (y_true == label)).sum())
        fp = float(((y_pred == label) & (y_true != label)).sum())
        fn = float(((y_pred != label) & (y_true == label)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": float((y_true == y_pred).mean()), "f1_macro": float(np.mean(f1s))}


def estimate_performance(current: pd.DataFrame) -> Performance:
    """CBPE (module doc) from the ``proba_<label>`` columns of scored rows."""
    columns = [c for c in current.columns if c.startswith(PROBA_PREFIX)]
    proba = current[columns].dropna().to_numpy(float)
    if not len(proba):
        return Performance("estimated", 0, None, None)
    predicted = proba.argmax(axis=1)
    f1s = []
    for k in range(proba.shape[1]):
        mine = predicted == k
        tp, fp = proba[mine, k].sum(), (1 - proba[mine, k]).sum()
        fn = proba[~mine, k].sum()
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return Performance(
        "estimated", len(proba), float(proba.max(axis=1).mean()), float(np.mean(f1s))
    )
