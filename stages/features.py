"""Features: a seeded, stratified train/val/test split and preprocessing fitted on train only.

The splits keep the RAW columns (plus the target); the fitted preprocessor is saved beside them
and travels with the model, so training, evaluation and serving transform rows identically.

    python -m stages.features --validated data/validated --out data/features
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from stages.common.cli import build_parser, run_main
from stages.common.config import FeaturesParams, Params
from stages.common.errors import DataError
from stages.common.io import atomic_path, read_parquet, write_json, write_parquet
from stages.common.preprocess import FittedPreprocessor, fit_preprocessor, save_preprocessor

logger = logging.getLogger(__name__)

DATA_FILE = "data.parquet"  # inside the validated folder
SPLITS = ("train", "val", "test")
MIN_ROWS_PER_CLASS = len(SPLITS)  # a stratified split needs one row of each class per split


@dataclass(frozen=True)
class FeatureSet:
    """The three splits (raw rows + target), the preprocessor fitted on train, and meta.json."""

    splits: dict[str, pd.DataFrame]
    preprocessor: FittedPreprocessor
    meta: dict[str, Any]


def check_target(df: pd.DataFrame, target: str, file: str | None = None) -> None:
    """Fail with a clear DataError unless ``target`` can be split on and learned.

    Raises:
        DataError: no rows, no target column, missing labels, one class only, or a class with
            fewer rows than a stratified three-way split needs.
    """
    if df.empty:
        raise DataError("no rows to split", file=file, rule="not_empty")
    if target not in df.columns:
        raise DataError(f"target column {target!r} not found (columns: {list(df.columns)[:10]})",
                        file=file, column=target, rule="column_present")
    if n_missing := int(df[target].isna().sum()):
        raise DataError(f"{n_missing} row(s) have no label", file=file, column=target,
                        rule="not_null")
    counts = df[target].value_counts()
    if len(counts) < 2:
        raise DataError(f"only one class ({counts.index[0]!r}); need at least 2 to classify",
                        file=file, column=target, rule="min_classes")
    rare = counts[counts < MIN_ROWS_PER_CLASS]
    if not rare.empty:
        raise DataError(f"class(es) {rare.to_dict()} have fewer than {MIN_ROWS_PER_CLASS} rows, "
                        "too few to stratify into train/val/test", file=file, column=target,
                        rule="min_rows_per_class")


def split_data(df: pd.DataFrame, target: str, params: FeaturesParams,
               seed: int) -> dict[str, pd.DataFrame]:
    """Seeded, stratified split into ``train``/``val``/``test`` (fractions of the whole).

    ``val_size`` is a fraction of all rows, taken from what is left after the test split.
    """
    from sklearn.model_selection import train_test_split

    check_target(df, target)
    try:
        rest, test = train_test_split(df, test_size=params.test_size, random_state=seed,
                                      stratify=df[target])
        train, val = train_test_split(rest, test_size=params.val_size / (1 - params.test_size),
                                      random_state=seed, stratify=rest[target])
    except ValueError as exc:  # e.g. fewer test rows than classes
        raise DataError(f"cannot stratify the split: {exc}", column=target,
                        rule="stratified_split") from exc
    return {name: part.reset_index(drop=True)
            for name, part in zip(SPLITS, (train, val, test), strict=True)}


def build_features(df: pd.DataFrame, target: str, params: FeaturesParams,
                   seed: int) -> FeatureSet:
    """Split the validated rows and fit the preprocessor on the train split only."""
    splits = split_data(df, target, params, seed)
    preprocessor = fit_preprocessor(splits["train"], target)
    meta = {
        "target": target,
        "classes": preprocessor.classes,
        "feature_columns": preprocessor.feature_columns,
        "n_features": preprocessor.n_features,
        "n_rows": {name: len(part) for name, part in splits.items()},
        "seed": seed,
    }
    return FeatureSet(splits, preprocessor, meta)


def run(validated_dir: str | Path, out_dir: str | Path, params: Params) -> FeatureSet:
    """Read ``validated_dir/data.parquet``; write the splits, preprocessor and meta.json.

    ``out_dir`` is replaced as a whole, and only after every check passed.
    """
    source = Path(validated_dir) / DATA_FILE
    df = read_parquet(source)
    target = params.ingest.target
    check_target(df, target, file=str(source))
    features = build_features(df, target, params.features, params.base.seed)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name, part in features.splits.items():
            write_parquet(tmp / f"{name}.parquet", part)
        save_preprocessor(features.preprocessor, tmp / "preprocessor.joblib")
        write_json(tmp / "meta.json", features.meta)
    logger.info("wrote %s: %s rows, %d features after preprocessing, classes %s", out_dir,
                features.meta["n_rows"], features.meta["n_features"], features.meta["classes"])
    return features


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stages.features --validated DIR --out DIR``."""
    parser = build_parser("features", "Stratified split + preprocessing fitted on train only.")
    parser.add_argument("--validated", required=True, help="folder holding data.parquet")
    parser.add_argument("--out", required=True, help="features folder to (re)write")

    def body(args: argparse.Namespace, params: Params) -> None:
        run(args.validated, args.out, params)

    return run_main("features", parser, body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
