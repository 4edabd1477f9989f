"""The monitor's cost per 100k logged predictions, against reading the log alone with pyarrow.

A prediction log of ``--rows`` rows (100k) is synthesised from a real table (Palmer penguins,
``palmerpenguins``: numbers with gaps, two categorical columns; not the project's default data)
and written by the service's own writer (``serving.predlog.PredictionLog``: part files of
``serve.log_flush_rows`` rows, requests of ``--request-rows`` rows, the service's row marks from
``serving.rowcheck``): rows resampled with replacement, numbers jittered by 2 %, 0.5 % of them
broken (a negative body mass, an unseen island), the predictions and class probabilities of a
small scikit-learn model fitted on the table, ``logged_at`` spread over two UTC days, and a
labels file keyed by request id. The training reference is ``monitor.reference_rows`` rows
resampled the same way (the table has 344 rows; the monitor samples up to that many rows of the
train split, so this is the reference size its default sees), scored by the same model; the
input contract is the table's observed ranges and categories, as a reviewed suite gives them.

Timed, each in the same round as the baseline (rotated order, paired ratios; ``bench.common``):

    pyarrow_read           pyarrow.parquet.read_table(log dir): the baseline
    read                   monitoring.window.read_log + watched_rows (pandas, per part file)
    drift                  monitoring.drift.detect_drift (Evidently's DataDriftPreset)
    drift_html             the Evidently report as self-contained HTML (DriftResult.html)
    psi                    monitoring.psi.proba_psi (the class probabilities)
    quality                monitoring.quality.check_quality (the input contract, row by row)
    performance_labels     monitoring.performance.read_labels + live_performance (per day)
    performance_estimated  monitoring.performance.estimate_performance (CBPE)
    check                  read + monitoring.check.run_checks + the HTML: one check's compute

Not timed: loading the model, scoring the reference, MLflow logging and Prefect (the flow's
fixed costs, independent of the log's size). The results go to ``bench/results/monitor.json``
with the machine's load before and after::

    make bench-monitor
    python -m bench.monitor --rows 100000 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import tempfile
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    CLOCKS,
    RESULTS_DIR,
    describe_machine,
    format_table,
    load_average,
    measure_interleaved,
    ratio_stats,
    summarize,
    write_result,
)
from stages.common.config import MonitorParams, ServeParams

NAME = "monitor"
TARGET = "species"
MODEL_NAME, MODEL_VERSION = "bench-penguins", "1"
BASELINE = "pyarrow_read"
STEPS = (
    BASELINE,
    "read",
    "drift",
    "drift_html",
    "psi",
    "quality",
    "performance_labels",
    "performance_estimated",
    "check",
)
JITTER = 0.02  # relative noise on the resampled numbers
BAD_SHARE = 0.005  # rows broken on purpose: quality has something to find
PER = 100_000  # the unit the costs are reported in


# --- the data: a real table, its contract, a model -------------------------------------------


def load_table() -> Any:
    """Palmer penguins (344 rows; shipped in the ``palmerpenguins`` package, read offline)."""
    from palmerpenguins import load_penguins

    return load_penguins().reset_index(drop=True)


def build_contract(table: Any) -> dict[str, Any]:
    """The input contract a reviewed suite of ``table`` gives: observed ranges and categories,
    nulls allowed where the table has them (``model.contract``'s shape)."""
    columns = []
    for name in table.columns.drop(TARGET):
        values = table[name]
        col: dict[str, Any] = {
            "name": name,
            "nullable": bool(values.isna().any()),
            "min": None,
            "max": None,
            "positive": False,
            "values": None,
            "format": None,
            "used": True,
        }
        if values.dtype.kind in "if":
            col |= {
                "kind": "int" if values.dtype.kind == "i" else "float",
                "min": float(values.min()),
                "max": float(values.max()),
            }
        else:
            col |= {"kind": "category", "values": sorted(values.dropna().astype(str).unique())}
        columns.append(col)
    labels = sorted(table[TARGET].astype(str).unique())
    return {"version": 1, "target": TARGET, "labels": labels, "columns": columns}


def fit_predictor(table: Any, contract: dict[str, Any]) -> Any:
    """A small model on ``table`` (impute, one-hot, logistic regression), as a function from
    raw input rows to ``prediction`` + ``proba_<label>``, as the served pyfunc answers."""
    import pandas as pd
    from sklearn.compose import make_column_transformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    numeric = [c["name"] for c in contract["columns"] if c["kind"] != "category"]
    categorical = [c["name"] for c in contract["columns"] if c["kind"] == "category"]
    model = make_pipeline(
        make_column_transformer(
            (make_pipeline(SimpleImputer(), StandardScaler()), numeric),
            (
                make_pipeline(
                    SimpleImputer(strategy="most_frequent"),
                    OneHotEncoder(handle_unknown="ignore"),
                ),
                categorical,
            ),
        ),
        LogisticRegression(max_iter=1000),
    )
    inputs = numeric + categorical
    model.fit(table[inputs], table[TARGET].astype(str))

    def predict(frame: Any) -> Any:
        proba = model.predict_proba(frame[inputs])
        out = pd.DataFrame(proba, columns=[f"proba_{label}" for label in model.classes_])
        out.insert(0, "prediction", model.classes_[proba.argmax(axis=1)])
        return out

    return predict


def resample(table: Any, rows: int, seed: int, bad_share: float = 0.0) -> Any:
    """``rows`` rows drawn from ``table`` with replacement, numbers jittered; a ``bad_share``
    of them broken (half a negative body mass, half an unseen island)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    frame = table.iloc[rng.integers(0, len(table), rows)].reset_index(drop=True)
    for name in frame.columns:
        if frame[name].dtype.kind == "f":  # kept in the observed range: no accidental breaks
            low, high = table[name].min(), table[name].max()
            frame[name] = (frame[name] * rng.normal(1.0, JITTER, rows)).clip(low, high)
    bad = rng.choice(rows, int(rows * bad_share), replace=False)
    frame.loc[bad[: len(bad) // 2], "body_mass_g"] = -1.0
    frame.loc[bad[len(bad) // 2 :], "island"] = "Atlantis"
    return frame


# --- the log, written by the service's writer --------------------------------------------------


def served_model(contract: dict[str, Any], predict: Any) -> Any:
    """A ``serving.model.LoadedModel`` around ``predict``: what the service's log writer and
    row checks take."""
    from serving.model import LoadedModel
    from serving.payloads import spec_from_contract

    labels = contract["labels"]
    return LoadedModel(
        uri=f"models:/{MODEL_NAME}/{MODEL_VERSION}",
        variant="bench",
        spec=spec_from_contract(contract),
        output_columns=("prediction", *[f"proba_{label}" for label in labels]),
        predictor=predict,
        name=MODEL_NAME,
        version=MODEL_VERSION,
        contract=contract,
    )


def write_log(
    log_dir: Path, model: Any, live: Any, flush_rows: int, request_rows: int, start: dt.datetime
) -> Any:
    """Log ``live`` (raw rows with their ``species``) as the service does, requests of
    ``request_rows`` rows over two days from ``start``; returns the labels (request_id,
    label)."""
    import pandas as pd

    from serving.predlog import PredictionLog
    from serving.rowcheck import find_violations, row_marks

    log = PredictionLog(log_dir, sample_rate=1.0, flush_rows=flush_rows)
    inputs = list(model.spec.names)
    answers = model.predict(live[inputs]).to_dict("records")
    values = live[inputs].astype(object).where(live[inputs].notna(), None).to_numpy().tolist()
    span = dt.timedelta(days=2).total_seconds()
    ids, labels, buffered = [], [], 0
    for first in range(0, len(live), request_rows):
        rows = values[first : first + request_rows]
        request_id = uuid.uuid4().hex
        marks = row_marks(find_violations(model, rows), len(rows))
        at = start.timestamp() + span * first / len(live)
        log.maybe_add(model, request_id, rows, answers[first : first + len(rows)], at, marks)
        ids += [request_id] * len(rows)
        labels += live[TARGET].iloc[first : first + len(rows)].astype(str).tolist()
        buffered += len(rows)
        if buffered >= flush_rows:  # what the writer's thread does when the buffer is full
            log.flush()
            buffered = 0
    log.flush()
    return pd.DataFrame({"request_id": ids, "label": labels})


# --- the timed steps --------------------------------------------------------------------------


def make_variants(work: Path, setup: dict[str, Any], params: MonitorParams) -> dict[str, Any]:
    """The timed calls (each prepared untimed, per round)."""
    import pyarrow.parquet as pq

    from monitoring import window
    from monitoring.check import Baselines, Thresholds, run_checks
    from monitoring.drift import detect_drift
    from monitoring.performance import estimate_performance, live_performance, read_labels
    from monitoring.psi import proba_psi
    from monitoring.quality import check_quality
    from monitoring.reference import as_kinds

    log_dir, labels_path = work / "predictions", work / "labels.parquet"
    reference, proba, kinds = setup["reference"], setup["reference_proba"], setup["kinds"]
    contract, current = setup["contract"], setup["current"]
    scored = current[current["prediction"].notna()]
    thresholds = Thresholds(
        params.drift_share,
        params.psi_threshold,
        params.psi_bins,
        params.max_bad_row_share,
        params.max_accuracy_drop,
    )
    baselines = Baselines(setup["test_accuracy"], setup["estimated_accuracy"])

    def read() -> Any:
        rows = window.read_log(log_dir).rows
        return window.watched_rows(rows, MODEL_NAME, MODEL_VERSION)

    def check() -> Any:
        rows = read()
        result = run_checks(
            rows, reference, proba, kinds, contract, read_labels(labels_path), thresholds, baselines
        )
        return result.drift.html()

    steps = {
        BASELINE: lambda: pq.read_table(log_dir),
        "read": read,
        "drift": lambda: detect_drift(
            as_kinds(reference, kinds), as_kinds(current, kinds), kinds, params.drift_share
        ),
        "drift_html": setup["drift"].html,
        "psi": lambda: proba_psi(proba, scored, params.psi_bins),
        "quality": lambda: check_quality(current, reference, contract, list(kinds)),
        "performance_labels": lambda: live_performance(scored, read_labels(labels_path)),
        "performance_estimated": lambda: estimate_performance(scored),
        "check": check,
    }
    return {name: (lambda call=call: call) for name, call in steps.items()}


def prepare(work: Path, rows: int, reference_rows: int, request_rows: int, seed: int) -> dict:
    """Write the log and the labels under ``work``; everything the steps take."""
    from monitoring import window
    from monitoring.drift import detect_drift
    from monitoring.performance import estimate_performance
    from monitoring.reference import as_kinds, feature_kinds

    table = load_table()
    contract = build_contract(table)
    predict = fit_predictor(table, contract)
    model = served_model(contract, predict)
    inputs = list(model.spec.names)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    live = resample(table, rows, seed, BAD_SHARE)
    flush_rows = ServeParams().log_flush_rows
    labels = write_log(work / "predictions", model, live, flush_rows, request_rows, start)
    labels.to_parquet(work / "labels.parquet")
    reference = resample(table, reference_rows, seed + 1)[inputs]
    reference_proba = predict(reference)
    test = resample(table, reference_rows, seed + 2)
    kinds = feature_kinds(contract, [])
    current = window.watched_rows(
        window.read_log(work / "predictions").rows, MODEL_NAME, MODEL_VERSION
    )
    scored_test = predict(test[inputs])
    drift = detect_drift(as_kinds(reference, kinds), as_kinds(current, kinds), kinds, 0.3)
    return {
        "contract": contract,
        "reference": reference,
        "reference_proba": reference_proba[[c for c in reference_proba if c != "prediction"]],
        "kinds": kinds,
        "current": current,
        "drift": drift,
        "test_accuracy": float((scored_test["prediction"] == test[TARGET]).mean()),
        "estimated_accuracy": estimate_performance(scored_test).accuracy,
        "files": len(list((work / "predictions").glob("part-*.parquet"))),
        "log_bytes": sum(p.stat().st_size for p in (work / "predictions").glob("part-*")),
    }


# --- report -----------------------------------------------------------------------------------


def report(seconds: dict[str, list[float]], rows: int) -> dict[str, Any]:
    """Per step: seconds (median, spread), seconds per 100k rows, paired ratio to the baseline."""
    scale = PER / rows
    return {
        name: {
            "seconds": summarize(times),
            "seconds_per_100k": summarize(times)["median"] * scale,
            "over_pyarrow_read": ratio_stats(times, seconds[BASELINE]),
        }
        for name, times in seconds.items()
    }


def print_report(steps: dict[str, Any], rows: int, files: int) -> None:
    header = ["step", "median s", f"s per {PER // 1000}k rows", "x pyarrow read", "min..max"]
    table = [
        [
            name,
            step["seconds"]["median"],
            step["seconds_per_100k"],
            step["over_pyarrow_read"]["median"],
            f"{step['over_pyarrow_read']['min']:.3g}..{step['over_pyarrow_read']['max']:.3g}",
        ]
        for name, step in steps.items()
    ]
    print(f"\nmonitor cost on {rows} logged rows in {files} part files")
    print(format_table(header, table))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.monitor",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rows", type=lambda text: int(float(text)), default=PER)
    parser.add_argument(
        "--reference-rows",
        type=int,
        default=MonitorParams().reference_rows,
        help="training reference rows (params monitor.reference_rows)",
    )
    parser.add_argument("--request-rows", type=int, default=10, help="rows per logged request")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", default="wall", choices=list(CLOCKS))
    parser.add_argument(
        "--results-dir", type=Path, default=RESULTS_DIR, help="where monitor.json is written"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # scipy's chi-square divides by a zero expected count for the unseen island (Evidently's test
    # on a category the reference lacks): one warning per call, the result is still right
    warnings.filterwarnings("ignore", "divide by zero", RuntimeWarning)
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-monitor-") as scratch:
        work = Path(scratch)
        setup = prepare(work, args.rows, args.reference_rows, args.request_rows, args.seed)
        variants = make_variants(work, setup, MonitorParams())
        seconds = measure_interleaved(variants, args.repeats, args.warmup, clock=args.clock)
    steps = report(seconds, args.rows)
    print_report(steps, args.rows, setup["files"])
    path = write_result(
        NAME,
        {
            "machine": {
                **describe_machine(),
                "load_before": load_before,
                "load_after": load_average(),
            },
            "table": "palmerpenguins (344 rows, resampled with 2% jitter)",
            "rows": args.rows,
            "reference_rows": args.reference_rows,
            "request_rows": args.request_rows,
            "part_files": setup["files"],
            "log_bytes": setup["log_bytes"],
            "bad_share": BAD_SHARE,
            "drift_tests": {c.column: c.test for c in setup["drift"].columns},
            "repeats": args.repeats,
            "warmup": args.warmup,
            "clock": args.clock,
            "steps": steps,
        },
        args.results_dir,
    )
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
