"""Features: a seeded, stratified train/val/test split and preprocessing fitted on train only.

The splits keep the RAW columns (plus the target); the fitted preprocessor is saved beside them
and travels with the model, so training, evaluation and serving transform rows identically.
The data streams through in record batches (``base.batch_rows``), so memory stays bounded
however many rows there are: a first pass counts the classes (target column only), a second
assigns each row to a split (stages/features/splits.py), writes it, and gathers the train
statistics the preprocessor is fitted from (stages/features/streamfit.py).

Not every column is fed to the model: params ``features.drop_columns``; datetime columns when
``features.datetime`` is ``drop`` (``calendar``, the default, turns them into cyclic calendar
features inside the preprocessor); and text columns whose distinct train values exceed
``features.max_category_fraction`` of the train rows (ids, free text: one-hot encoding them
gives a feature per row), dropped with a warning or, with ``features.high_cardinality: error``,
stopping the run. ``meta.json`` lists each dropped column and why (``dropped``).

    python -m stages.features --validated data/validated --out data/features
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from model.files import PREPROCESSOR_FILE
from model.preprocess import FittedPreprocessor, save_preprocessor
from stages.common.cli import build_parser, run_main
from stages.common.config import FeaturesParams, Params
from stages.common.errors import DataError
from stages.common.io import atomic_path, iter_batches, open_dataset, write_json
from stages.common.parquet_files import ParquetFiles, arrow_mask
from stages.features.splits import SplitPlan, assigner_for
from stages.features.streamfit import TrainStats

logger = logging.getLogger(__name__)

DATA_FILE = "data.parquet"  # inside the validated folder
SPLITS = ("train", "val", "test")  # in the order of the split codes TRAIN, VAL, TEST
MIN_ROWS_PER_CLASS = len(SPLITS)  # a stratified split needs one row of each class per split


@dataclass(frozen=True)
class FeatureSet:
    """The written splits (raw rows + target), the preprocessor fitted on train, meta.json."""

    paths: dict[str, Path]
    preprocessor: FittedPreprocessor
    meta: dict[str, Any]


def check_class_counts(
    counts: dict[Any, int], n_missing: int, target: str, file: str | None = None
) -> None:
    """Fail with a clear DataError unless labels counted as ``counts`` can be split on.

    Raises:
        DataError: no rows, missing labels, one class only, or a class with fewer rows than
            a stratified three-way split needs.
    """
    if not counts and not n_missing:
        raise DataError("no rows to split", file=file, rule="not_empty")
    if n_missing:
        raise DataError(
            f"{n_missing} row(s) have no label", file=file, column=target, rule="not_null"
        )
    if len(counts) < 2:
        raise DataError(
            f"only one class ({next(iter(counts))!r}); need at least 2 to classify",
            file=file,
            column=target,
            rule="min_classes",
        )
    rare = {label: n for label, n in counts.items() if n < MIN_ROWS_PER_CLASS}
    if rare:
        raise DataError(
            f"class(es) {rare} have fewer than {MIN_ROWS_PER_CLASS} rows, "
            "too few to stratify into train/val/test",
            file=file,
            column=target,
            rule="min_rows_per_class",
        )


def check_target(df: pd.DataFrame, target: str, file: str | None = None) -> None:
    """``check_class_counts`` for an in-memory frame; also fails when ``target`` is absent."""
    if target not in df.columns and not df.empty:
        raise DataError(
            f"target column {target!r} not found (columns: {list(df.columns)[:10]})",
            file=file,
            column=target,
            rule="column_present",
        )
    labels = df[target] if target in df.columns else pd.Series([], dtype=object)
    counts = {_plain(k): int(v) for k, v in labels.value_counts().items()}
    check_class_counts(counts, int(labels.isna().sum()), target, file)


def select_features(
    schema: Any, target: str, drop_columns: Sequence[str], file: str | None = None
) -> tuple[list[str], list[str], list[str]]:
    """(numeric, categorical, datetime) columns of a pyarrow schema, without the target and
    ``drop_columns``.

    Raises:
        DataError: no target column, a ``drop_columns`` entry that is no column (or is the
            target), a column of an unsupported type, or no column left at all.
    """
    import pyarrow.types as pt

    if target not in schema.names:
        raise DataError(
            f"target column {target!r} not found (columns: {schema.names[:10]})",
            file=file,
            column=target,
            rule="column_present",
        )
    for name in drop_columns:
        if name not in schema.names or name == target:
            raise DataError(
                f"features.drop_columns names {name!r}, which is "
                + ("the target" if name == target else "not a column"),
                file=file,
                column=name,
                rule="drop_columns",
            )
    numeric, categorical, datetimes = [], [], []
    for field in schema:
        kind = field.type
        if field.name == target or field.name in drop_columns:
            continue
        if pt.is_temporal(kind):
            datetimes.append(field.name)
        elif pt.is_integer(kind) or pt.is_floating(kind):
            numeric.append(field.name)
        elif (
            pt.is_string(kind)
            or pt.is_large_string(kind)
            or pt.is_boolean(kind)
            or (pt.is_dictionary(kind))
        ):
            categorical.append(field.name)
        else:
            raise DataError(
                f"unsupported type {kind}",
                file=file,
                column=field.name,
                rule="numeric_or_categorical",
            )
    if not numeric and not categorical and not datetimes:
        raise DataError(
            "no feature columns besides the target", file=file, column=target, rule="has_features"
        )
    return numeric, categorical, datetimes


def date_formats(schema: Any, names: Sequence[str]) -> dict[str, str | None]:
    """Each datetime column's text format, from its field metadata (``b"format"``, written by
    validate for dates held as text); None: ISO 8601."""
    formats = {}
    for name in names:
        metadata = schema.field(name).metadata or {}
        formats[name] = metadata[b"format"].decode() if b"format" in metadata else None
    return formats


def datetime_policy(datetimes: list[str], policy: str) -> tuple[list[str], list[dict]]:
    """(datetime columns fed to the model as calendar features, the ones dropped and why)."""
    if not datetimes:
        return [], []
    if policy == "calendar":
        logger.info(
            "datetime column(s) %s become calendar features (month, day of week, day "
            "of year, hour when times vary; sin/cos)",
            datetimes,
        )
        return list(datetimes), []
    logger.info(
        "datetime column(s) %s are kept in the splits but not used as features "
        "(features.datetime: drop)",
        datetimes,
    )
    return [], [
        {
            "column": name,
            "rule": "datetime",
            "reason": "a datetime column and features.datetime is drop",
        }
        for name in datetimes
    ]


def drop_high_cardinality(
    stats: TrainStats, params: FeaturesParams, file: str | None = None
) -> list[dict]:
    """Leave out of ``stats`` the text columns with more distinct train values than
    ``params.max_category_fraction`` of the train rows; return them and why.

    Raises:
        DataError: such a column when ``params.high_cardinality`` is ``error``.
    """
    limit, dropped = params.max_category_fraction * stats.rows, []
    for name, counts in list(zip(stats.categorical, stats.categories, strict=True)):
        if len(counts) <= limit:
            continue
        what = (
            f"column {name!r} has {len(counts)} distinct values in {stats.rows} train rows, "
            f"over features.max_category_fraction {params.max_category_fraction:g} of them "
            "(an id or free text?): one-hot encoding it would give about a feature per row"
        )
        if params.high_cardinality == "error":
            raise DataError(
                f"{what}; list it in features.drop_columns, raise "
                "features.max_category_fraction, or set features.high_cardinality: "
                "drop",
                file=file,
                column=name,
                rule="high_cardinality",
            )
        logger.warning(
            "%s; dropped it (list it in features.drop_columns to say so, raise "
            "features.max_category_fraction to keep it; features.high_cardinality: "
            "error stops instead)",
            what,
        )
        stats.drop_categorical(name)
        dropped.append(
            {
                "column": name,
                "rule": "high_cardinality",
                "reason": what,
                "distinct": len(counts),
                "train_rows": stats.rows,
            }
        )
    return dropped


def count_classes(source: Path, target: str, batch_rows: int) -> dict[Any, int]:
    """Rows per label (sorted by label), reading the target column only.

    Raises:
        DataError: as ``check_class_counts``, naming ``source``.
    """
    import pyarrow.compute as pc
    import pyarrow.types as pt

    counts: dict[Any, int] = {}
    n_missing = 0
    for batch in iter_batches(source, batch_rows, columns=[target]):
        labels = batch.column(0)
        n_missing += labels.null_count
        if pt.is_floating(labels.type):
            n_missing += int(pc.sum(pc.is_nan(labels)).as_py() or 0)
            labels = pc.drop_null(pc.if_else(pc.is_nan(labels), None, labels))
        for item in pc.value_counts(labels).to_pylist():
            if item["values"] is not None:
                counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    check_class_counts(counts, n_missing, target, str(source))
    return dict(sorted(counts.items()))


def split_data(
    df: pd.DataFrame, target: str, params: FeaturesParams, seed: int
) -> dict[str, pd.DataFrame]:
    """The stage's split of an in-memory frame: the same rows land in the same split."""
    check_target(df, target)
    counts = {_plain(k): int(v) for k, v in df[target].value_counts().sort_index().items()}
    plan = _plan(params, seed, counts)
    codes = assigner_for(plan).assign(
        df[target].map({label: i for i, label in enumerate(counts)}).to_numpy()
    )
    return {name: df[codes == code].reset_index(drop=True) for code, name in enumerate(SPLITS)}


def write_splits(
    source: Path,
    out: Path,
    plan: SplitPlan,
    target: str,
    classes: list[Any],
    stats: TrainStats,
    batch_rows: int,
) -> dict[str, int]:
    """Stream ``source`` into ``out/{train,val,test}.parquet``, feeding train rows to ``stats``.

    ``classes``: the labels in the order of the plan's class counts.

    Returns the rows written per split.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    schema = open_dataset(source).schema
    labels = pa.array(classes, type=schema.field(target).type)
    assigner = assigner_for(plan)
    with ParquetFiles(out, list(SPLITS), schema, batch_rows) as files:
        first_row = 0
        for batch in iter_batches(source, batch_rows):
            class_ids = pc.index_in(batch.column(target), value_set=labels).to_numpy()
            codes = assigner.assign(class_ids)
            for code, name in enumerate(SPLITS):
                mask = codes == code
                rows = batch.filter(arrow_mask(mask))
                files.add(name, rows)
                if name == "train":
                    stats.update(rows, first_row + np.flatnonzero(mask))
            first_row += batch.num_rows
    return files.written


def run(validated_dir: str | Path, out_dir: str | Path, params: Params) -> FeatureSet:
    """Read ``validated_dir/data.parquet``; write the splits, preprocessor and meta.json.

    ``out_dir`` is replaced as a whole, and only after every check passed.
    """
    source, out_dir = Path(validated_dir) / DATA_FILE, Path(out_dir)
    target, settings, seed = params.ingest.target, params.features, params.base.seed
    batch_rows, schema = params.base.batch_rows, open_dataset(source).schema
    numeric, categorical, datetimes = select_features(
        schema, target, settings.drop_columns, file=str(source)
    )
    calendar, dropped = datetime_policy(datetimes, settings.datetime)
    dropped = [
        {"column": name, "rule": "drop_columns", "reason": "listed in params features.drop_columns"}
        for name in settings.drop_columns
    ] + dropped
    counts = count_classes(source, target, batch_rows)
    plan = _plan(settings, seed, counts)
    try:
        assigner_for(plan)  # the ordered split's sizes are checked before anything is written
    except ValueError as exc:
        raise DataError(str(exc), file=str(source), rule="split_sizes") from exc
    formats = date_formats(schema, calendar)
    stats = TrainStats(
        numeric, categorical, seed, file=str(source), datetimes=calendar, date_formats=formats
    )
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        n_rows = write_splits(source, tmp, plan, target, list(counts), stats, batch_rows)
        dropped += drop_high_cardinality(stats, settings, str(source))
        used = set(numeric) | set(stats.categorical) | set(calendar)
        feature_columns = [name for name in schema.names if name in used]
        if not feature_columns:
            raise DataError(
                "no feature columns left besides the target (see the dropped columns above)",
                file=str(source),
                column=target,
                rule="has_features",
            )
        preprocessor = stats.fit(target, feature_columns, list(counts))
        save_preprocessor(preprocessor, tmp / PREPROCESSOR_FILE)
        meta = {
            "target": target,
            "classes": preprocessor.classes,
            "feature_columns": preprocessor.feature_columns,
            "n_features": preprocessor.n_features,
            "n_rows": n_rows,
            "seed": seed,
            "drop_columns": list(settings.drop_columns),
            "datetime_columns": datetimes,
            "datetime": settings.datetime,
            "date_formats": formats,
            "dropped": dropped,  # every column not fed to the model: column, rule, reason
            "split": settings.split,
            "split_block_rows": plan.block,
        }
        write_json(tmp / "meta.json", meta)
    logger.info(
        "wrote %s: %s rows, %d features after preprocessing, classes %s",
        out_dir,
        n_rows,
        meta["n_features"],
        meta["classes"],
    )
    return FeatureSet({name: out_dir / f"{name}.parquet" for name in SPLITS}, preprocessor, meta)


def _plan(settings: FeaturesParams, seed: int, counts: dict[Any, int]) -> SplitPlan:
    return SplitPlan(
        seed,
        settings.test_size,
        settings.val_size,
        np.array(list(counts.values()), dtype=np.int64),
        ordered=settings.split == "ordered",
        gap_rows=settings.gap_rows,
    )


def _plain(value: Any) -> Any:
    # numpy scalars -> int/float/str/bool, so classes serialise to JSON and compare simply
    return value.item() if hasattr(value, "item") else value


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stages.features --validated DIR --out DIR``."""
    parser = build_parser("features", "Stratified split + preprocessing fitted on train only.")
    parser.add_argument("--validated", required=True, help="folder holding data.parquet")
    parser.add_argument("--out", required=True, help="features folder to (re)write")

    def body(args: argparse.Namespace, params: Params) -> None:
        run(args.validated, args.out, params)

    return run_main("features", parser, body, argv)
