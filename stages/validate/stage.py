"""Validate: the streaming gate between ``data/raw`` and ``data/validated``.

The rules are a Great Expectations suite kept in the repo (params ``validate.suite_path``,
written by ``python -m stages.validate suite`` and reviewed in git), plus params
``validate.rules`` on top. ``gate`` streams ``data/raw`` batch by batch:

- dataset-level failures always stop the run (GateError naming file, column and rule):
  missing/extra/renamed columns, wrong types, mixed date formats, no rows, a repeated header,
  a row count outside the suite's bounds, an all-null target, one class only, too many nulls
  (``mostly``), duplicated rows above ``validate.max_duplicate_fraction``;
- rows that break a row-level rule go to ``data/quarantine/rows.parquet`` with ``_rule`` and
  ``_column``; above ``validate.max_bad_fraction`` of all rows the run stops instead;
- GX then runs the suite on the validated rows (at most ``validate.docs_rows`` of them) and
  writes ``result.json`` and Data Docs; a GX failure stops the run too.

A failed run writes ``reports/validation/summary.json``, logs a FAILED MLflow run named
``validation-failed`` and leaves ``data/validated`` and ``data/quarantine`` exactly as they were.
"""

from __future__ import annotations

import argparse
import logging
from itertools import chain
from pathlib import Path
from typing import Any

from stages.common import tracking
from stages.common.cli import build_parser, run_main
from stages.common.config import MlflowParams, Params
from stages.common.csvfiles import iter_csv_batches
from stages.common.errors import ConfigError, DataError, GateError
from stages.common.io import atomic_path, iter_batches, open_dataset, write_json, write_text
from stages.common.parquet_files import ParquetFiles
from stages.common.suite import Suite, load_suite, profile_snapshot, render_suite
from stages.validate.gx_check import (
    as_gx_frame,
    describe_failures,
    gx_expectations,
    json_safe,
    preload_gx,
    run_gx,
    summarize_result,
)
from stages.validate.rules import build_checks, gate_error
from stages.validate.stream import StreamingGate, check_dataset

logger = logging.getLogger(__name__)

DATA_FILE = "data.parquet"
QUARANTINE_FILE = "rows.parquet"
CLEAN, BAD = Path(DATA_FILE).stem, Path(QUARANTINE_FILE).stem  # ParquetFiles' names
FAILED_RUN_NAME = "validation-failed"


def run(
    raw_dir: str | Path,
    out_dir: str | Path,
    quarantine_dir: str | Path,
    report_dir: str | Path,
    params: Params,
) -> dict[str, Any]:
    """Gate ``raw_dir``; write the report, then the validated and quarantined rows, or fail.

    Raises:
        GateError: the data broke the suite (report written, run logged to MLflow).
        ConfigError: the suite or params rules are invalid (nothing written).
        DataError: ``raw_dir`` is missing or unreadable (nothing written).
    """
    suite_path = params.validate.suite_path
    suite = load_suite(suite_path)
    if suite.target != params.ingest.target:
        raise ConfigError(
            f"{suite_path}: meta.target {suite.target!r} differs from params "
            f"ingest.target {params.ingest.target!r}"
        )
    dataset = open_dataset(raw_dir)  # a missing/corrupt part or differing schemas: DataError
    checks = build_checks(suite, params.validate.rules, dataset.schema, suite_path)
    preload_gx()  # overlaps the streaming pass; GX runs after it
    summary: dict[str, Any] = {
        "success": False,
        "data": str(raw_dir),
        "suite": suite_path,
        "rows": dataset.count_rows(),
        "bad_rows": 0,
    }
    error: GateError | None = None
    with atomic_path(report_dir) as report:  # the report folder is replaced as a whole
        report.mkdir()
        try:
            _gate(
                dataset,
                suite,
                checks,
                Path(raw_dir),
                Path(out_dir),
                Path(quarantine_dir),
                report,
                params,
                summary,
            )
        except GateError as exc:
            error = exc
            summary["failed"] = [
                {
                    "column": getattr(exc, "column", None),
                    "rule": getattr(exc, "rule", None),
                    "message": str(exc),
                }
            ]
        write_json(report / "summary.json", json_safe(summary))
    if error is not None:
        try:
            _log_failure_to_mlflow(Path(report_dir), params.mlflow, str(raw_dir), suite_path)
        except Exception:  # the gate's verdict matters more than its bookkeeping
            logger.exception("could not log the failed validation to MLflow")
        raise error
    return summary


def _gate(
    dataset: Any,
    suite: Suite,
    checks: dict,
    raw_dir: Path,
    out_dir: Path,
    quarantine_dir: Path,
    report: Path,
    params: Params,
    summary: dict[str, Any],
) -> None:
    files = [Path(file) for file in dataset.files]  # open_dataset listed and checked them
    batch_rows, source = params.base.batch_rows, str(raw_dir)
    check_dataset(files, dataset.schema, summary["rows"], suite, source, batch_rows)
    gate = StreamingGate(suite, checks, dataset.schema, summary["rows"], params.validate, source)
    with atomic_path(out_dir) as out, atomic_path(quarantine_dir) as quarantine:
        out.mkdir()
        quarantine.mkdir()
        try:
            with (
                ParquetFiles(out, [CLEAN], gate.out_schema, batch_rows) as clean_rows,
                ParquetFiles(quarantine, [BAD], gate.bad_schema, batch_rows) as bad_rows,
            ):
                for file in files:
                    for batch in iter_batches(file, batch_rows):
                        clean, bad = gate.feed(batch, str(file))
                        clean_rows.add(CLEAN, clean)
                        if bad is not None:
                            bad_rows.add(BAD, bad)
            gate.finish()
        finally:
            summary.update(
                gate.summary(),
                max_bad_fraction=params.validate.max_bad_fraction,
                max_duplicate_fraction=params.validate.max_duplicate_fraction,
            )
        _log_bad_fraction(summary, source)
        summary["gx"] = _run_gx(gate, suite, params, report, source)
        write_json(
            quarantine / "summary.json",
            {key: summary[key] for key in ("data", "rows", "bad_rows", "bad_fraction", "rules")},
        )
        summary["success"] = True


def _run_gx(
    gate: StreamingGate, suite: Suite, params: Params, report: Path, source: str
) -> dict[str, Any]:
    import pyarrow as pa

    sample = pa.Table.from_batches(gate.sample, schema=gate.out_schema)
    sampled = gate.sample_every > 1
    expectations, left_out = gx_expectations(suite, params.validate.rules, sampled)
    result = run_gx(
        as_gx_frame(sample), suite, expectations, report / "docs", params.validate.suite_path
    )
    write_json(report / "result.json", json_safe(result.to_json_dict()))
    failed = summarize_result(result)
    if failed:
        raise gate_error(
            "Great Expectations failed on the validated rows:\n"
            + describe_failures(failed, source),
            file=source,
            column=failed[0]["column"],
            rule=failed[0]["expectation"],
        )
    logger.info(
        "GX passed %d expectations on %d validated rows",
        result.statistics["evaluated_expectations"],
        sample.num_rows,
    )
    return {
        "success": True,
        "rows": sample.num_rows,
        "sampled": sampled,
        "sample_every": gate.sample_every,
        "evaluated_expectations": result.statistics["evaluated_expectations"],
        "left_out": left_out,
    }


def _log_bad_fraction(summary: dict[str, Any], source: str) -> None:
    log = logger.warning if summary["bad_rows"] else logger.info
    log(
        "%s: quarantined %d of %d rows (%.4f%%, limit %.4f%%)%s",
        source,
        summary["bad_rows"],
        summary["rows"],
        100 * summary["bad_fraction"],
        100 * summary["max_bad_fraction"],
        "".join(f"; {r['column']}/{r['rule']}: {r['rows']}" for r in summary["rules"][:5]),
    )


def _log_failure_to_mlflow(
    report_dir: Path, params: MlflowParams, data: str, suite_path: str
) -> None:
    from mlflow import MlflowClient

    experiment_id = tracking.configure_mlflow(params)
    client = MlflowClient()
    tags = {
        **tracking.lineage_tags(),
        "stage": "validate",
        "validation.data": data,
        "validation.suite": suite_path,
    }
    run_id = client.create_run(experiment_id, run_name=FAILED_RUN_NAME, tags=tags).info.run_id
    try:
        client.log_artifacts(run_id, str(report_dir), artifact_path="validation")
    finally:
        client.set_terminated(run_id, status="FAILED")
    logger.info("logged the failed validation to MLflow run %s", run_id)


def write_suite(
    snapshot: str | Path,
    out: str | Path,
    target: str,
    margin: float,
    batch_rows: int,
    watermark: str | None = None,
    delimiter: str = ",",
) -> dict[str, Any]:
    """Profile the trusted ``snapshot`` (Parquet file/folder or CSV) into a suite at ``out``.

    ``watermark`` (params ``ingest.watermark``) only grows: it and the row count get no upper
    bound. ``delimiter`` (params ``ingest.delimiter``) separates a CSV snapshot's fields.
    """
    schema, batches = _snapshot_batches(Path(snapshot), batch_rows, delimiter)
    raw = profile_snapshot(batches, schema, target, margin, source=str(snapshot), growing=watermark)
    raw["name"] = Path(out).stem
    raw["meta"]["profiled_from"]["command"] = (
        f"python -m stages.validate suite --snapshot {snapshot} --out {out} --target {target} "
        f"--margin {margin}"
    )
    write_text(out, render_suite(raw))
    logger.info(
        "wrote a suite of %d expectations for %d columns to %s",
        len(raw["expectations"]),
        len(schema),
        out,
    )
    return raw


def _snapshot_batches(path: Path, batch_rows: int, delimiter: str) -> tuple[Any, Any]:
    if path.suffix.lower() == ".csv":  # ingest's CSV reader, with its clear errors
        if not path.is_file():
            raise DataError("file not found", file=str(path), rule="exists")
        batches = iter_csv_batches(lambda: str(path), str(path), delimiter)
        first = next(batches)
        return first.schema, chain([first], batches)
    return open_dataset(path).schema, iter_batches(path, batch_rows)


EXAMPLES = """examples:
  # the pipeline stage (dvc.yaml): gate data/raw with the suite in params validate.suite_path
  python -m stages.validate gate --raw data/raw --out data/validated \\
      --quarantine data/quarantine --report reports/validation

  # write a suite for your own data from a trusted snapshot, review it, then point
  # params validate.suite_path at it
  python -m stages.validate suite --snapshot data/raw --out suites/mine.json
  python -m stages.validate suite --snapshot data/source/wine.csv --out suites/wine.json \\
      --target cultivar --margin 0.2
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, examples kept on their own lines."""


def main(argv: list[str] | None = None) -> int:
    """``python -m stages.validate gate ...`` or ``python -m stages.validate suite ...``."""
    parser = build_parser(
        "validate",
        "Gate data/raw with a Great Expectations suite kept in "
        "the repo (gate), or write\nsuch a suite from a trusted snapshot "
        "(suite).",
    )
    parser.formatter_class, parser.epilog = _HelpFormatter, EXAMPLES
    commands = parser.add_subparsers(dest="command", required=True, metavar="{gate,suite}")
    gate = commands.add_parser(
        "gate",
        formatter_class=_HelpFormatter,
        epilog=EXAMPLES,
        help="validate data/raw (the pipeline stage)",
    )
    gate.add_argument("--raw", required=True, help="ingested Parquet part files")
    gate.add_argument("--out", required=True, help="folder for the validated data.parquet")
    gate.add_argument(
        "--quarantine",
        required=True,
        help="folder for rows.parquet (the bad rows) and summary.json",
    )
    gate.add_argument(
        "--report",
        required=True,
        help="folder for summary.json, result.json and docs/ (GX Data Docs)",
    )
    suite = commands.add_parser(
        "suite",
        formatter_class=_HelpFormatter,
        epilog=EXAMPLES,
        help="write a suite from a trusted snapshot",
    )
    suite.add_argument(
        "--snapshot", required=True, help="Parquet file or folder (e.g. data/raw), or a CSV file"
    )
    suite.add_argument("--out", required=True, help="suite JSON to write, e.g. suites/mine.json")
    suite.add_argument(
        "--target", default=argparse.SUPPRESS, help="label column (default: params ingest.target)"
    )
    suite.add_argument(
        "--margin",
        type=float,
        default=0.1,
        help="widen each numeric range by this fraction of its span",
    )
    for sub in (gate, suite):
        sub.add_argument(
            "--params",
            default=argparse.SUPPRESS,
            help="pipeline parameters file (default: params.yaml)",
        )

    def body(args: argparse.Namespace, params: Params) -> None:
        if args.command == "suite":
            write_suite(
                args.snapshot,
                args.out,
                getattr(args, "target", params.ingest.target),
                args.margin,
                params.base.batch_rows,
                params.ingest.watermark,
                params.ingest.delimiter,
            )
        else:
            run(args.raw, args.out, args.quarantine, args.report, params)

    return run_main("validate", parser, body, argv)
