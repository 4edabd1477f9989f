"""Validate: the Great Expectations gate between ``data/raw`` and ``data/validated``.

The GX suite is built from a schema YAML kept in the repo (params ``validate.schema_path``;
the format is documented at the top of every ``schemas/*.yaml``; its model and the profiler
live in ``stages.common.schema``), never hand-coded per dataset.
The report (``result.json``, ``summary.json``, Data Docs HTML in ``docs/``) is always written;
a failed validation raises GateError naming each failing column and expectation, logs the
report to MLflow as a FAILED run named ``validation-failed`` and leaves ``data/validated`` as
it was. ``--profile`` writes a schema for a new dataset from a trusted snapshot.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from stages.common import tracking
from stages.common.cli import build_parser, run_main
from stages.common.config import MlflowParams, Params
from stages.common.errors import ConfigError, GateError
from stages.common.io import atomic_path, read_parquet, write_json, write_parquet, write_text
from stages.common.schema import Schema, load_schema, profile_frame, render_schema

if TYPE_CHECKING:
    from great_expectations.core import (
        ExpectationSuiteValidationResult,
        ExpectationValidationResult,
    )
    from great_expectations.expectations import Expectation

logger = logging.getLogger(__name__)

DATA_FILE = "data.parquet"
FAILED_RUN_NAME = "validation-failed"
MAX_LISTED_FAILURES = 10  # in the GateError message; summary.json has all of them

# GX compares a column's dtype against these names. Object columns are checked value by value
# against the Python type names (float, int, str, bool) instead.
_FLOATS = ["float16", "float32", "float64", "Float32Dtype", "Float64Dtype"]
_INTS = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
         "Int8Dtype", "Int16Dtype", "Int32Dtype", "Int64Dtype",
         "UInt8Dtype", "UInt16Dtype", "UInt32Dtype", "UInt64Dtype"]
_BOOLS = ["bool", "BooleanDtype"]
TYPE_LISTS = {
    "float": [*_FLOATS, *_INTS, "float", "int"],  # whole numbers are valid floats
    "int": [*_INTS, "int"],
    "category": ["str", *_INTS, "int", *_BOOLS],
    "bool": _BOOLS,
}


def build_expectations(schema: Schema) -> list[Expectation]:
    """The GX expectations a schema stands for, table-level ones first."""
    import great_expectations.expectations as gxe

    expectations: list[Expectation] = [
        gxe.ExpectTableColumnsToMatchSet(column_set=list(schema.columns), exact_match=True),
        gxe.ExpectTableRowCountToBeBetween(min_value=schema.rows.min, max_value=schema.rows.max),
    ]
    for name, rule in schema.columns.items():
        expectations.append(gxe.ExpectColumnValuesToBeInTypeList(
            column=name, type_list=TYPE_LISTS[rule.type]))
        if not rule.nullable:
            expectations.append(gxe.ExpectColumnValuesToNotBeNull(column=name))
        if rule.min is not None or rule.max is not None:
            expectations.append(gxe.ExpectColumnValuesToBeBetween(
                column=name, min_value=rule.min, max_value=rule.max))
        if rule.values is not None:
            expectations.append(gxe.ExpectColumnValuesToBeInSet(column=name,
                                                                value_set=rule.values))
    expectations.append(gxe.ExpectColumnValuesToBeInSet(column=schema.target.name,
                                                        value_set=schema.target.labels))
    return expectations


def as_gx_view(df: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """The frame as GX should see it, so its type checks name the offending values.

    GX 1.24 cannot match pandas 3's default ``str`` dtype (nor a ``category`` dtype) by name,
    so such columns become ``object``, which GX type-checks value by value. In a numeric
    column held as text or floats, values that parse as numbers (whole numbers, for an int
    column) become Python numbers first: only the genuinely bad values are then reported.
    """
    view = df.copy()
    for name in view.columns:
        column, rule = view[name], schema.columns.get(name)
        if isinstance(column.dtype, (pd.StringDtype, pd.CategoricalDtype)):
            column = column.astype(object)
        if rule is not None and (rule.type == "int" or (rule.type == "float"
                                                        and column.dtype == object)):
            column = _as_python_numbers(column, whole=rule.type == "int")
        view[name] = column
    return view


def _as_python_numbers(column: pd.Series, whole: bool) -> pd.Series:
    if pd.api.types.is_integer_dtype(column) or pd.api.types.is_bool_dtype(column):
        return column
    numbers = pd.to_numeric(column, errors="coerce")
    if whole:  # 3.0 -> 3, but 3.5 stays a float and fails the int type check
        values = [int(n) if pd.notna(n) and float(n).is_integer() else v
                  for n, v in zip(numbers, column, strict=True)]
        return pd.Series(values, index=column.index, dtype=object)
    return numbers.astype(object).where(numbers.notna(), column)


def validate_frame(df: pd.DataFrame, schema: Schema, docs_dir: str | Path | None = None,
                   suite_name: str = "schema") -> ExpectationSuiteValidationResult:
    """Run the schema's GX suite on ``df``; with ``docs_dir``, also write Data Docs there."""
    os.environ["GX_ANALYTICS_ENABLED"] = "false"  # read by GX at import and context creation
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # INFO floods at import
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction

    context = gx.get_context(mode="ephemeral", project_config=_gx_config(docs_dir))
    batch = (context.data_sources.add_pandas("pipeline").add_dataframe_asset("raw")
             .add_batch_definition_whole_dataframe("all_rows"))
    suite = context.suites.add(gx.ExpectationSuite(name=suite_name,
                                                   expectations=build_expectations(schema)))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{suite_name}_gate", data=batch, suite=suite))
    actions = [] if docs_dir is None else [UpdateDataDocsAction(name="data_docs")]
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name="validate", validation_definitions=[definition], actions=actions,
        result_format="SUMMARY"))
    result = checkpoint.run(batch_parameters={"dataframe": as_gx_view(df, schema)})
    return next(iter(result.run_results.values()))


def _gx_config(docs_dir: str | Path | None) -> Any:
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    # Stores in memory (no gx/ folder) and one docs site, ours: get_context's default
    # ephemeral config would also register a docs site in a fresh temporary folder.
    sites = {} if docs_dir is None else {"local": {
        "class_name": "SiteBuilder",
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                          "base_directory": str(Path(docs_dir).resolve())},
    }}
    return DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(),
                             data_docs_sites=sites, analytics_enabled=False,
                             progress_bars=ProgressBarsConfig(globally=False))


def summarize_result(result: ExpectationSuiteValidationResult, rows: int) -> dict[str, Any]:
    """``{success, rows, failed: [{column, expectation, observed / unexpected examples}]}``.

    Table-level failures come first (``column`` None), then columns by name. Follow-on
    errors are left out: checks on a missing column (the column-set entry names it) and checks
    that crashed on a column whose type check failed (e.g. a range check meeting text).
    """
    failed = [_describe(item) for item in result.results if not item.success]
    missing = {name for entry in failed for name in entry.get("missing", [])}
    mistyped = {entry["column"] for entry in failed
                if entry["expectation"] == "expect_column_values_to_be_in_type_list"}
    failed = [entry for entry in failed if entry["column"] not in missing  # None never is
              and not (entry["column"] in mistyped and "error" in entry)]
    failed.sort(key=lambda entry: (entry["column"] is not None, str(entry["column"])))
    return _json_safe({"success": bool(result.success), "rows": rows, "failed": failed})


def _describe(item: ExpectationValidationResult) -> dict[str, Any]:
    found = item.result or {}
    entry = {"column": item.expectation_config.kwargs.get("column"),
             "expectation": item.expectation_config.type}
    if mismatched := (found.get("details") or {}).get("mismatched"):
        entry.update({key: mismatched[key] for key in ("missing", "unexpected")
                      if mismatched.get(key)})
    elif "observed_value" in found:
        entry["observed"] = found["observed_value"]
    if found.get("unexpected_count"):
        entry["unexpected_count"] = found["unexpected_count"]
        entry["unexpected_examples"] = found.get("partial_unexpected_list", [])[:5]
    if error := _error_message(item.exception_info):
        entry["error"] = error
    return entry


def _error_message(info: dict | None) -> str | None:
    # GX puts either one {raised_exception, exception_message} or one per failing metric.
    infos = [info] if info and "raised_exception" in info else list((info or {}).values())
    messages = {i.get("exception_message") for i in infos if i and i.get("raised_exception")}
    return "; ".join(sorted(m for m in messages if m)) or None


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN is not JSON
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def describe_failures(summary: dict[str, Any], data_file: str) -> str:
    """One line per failure: ``<file>: column X failed expect_... (details)``."""
    lines = []
    for entry in summary["failed"][:MAX_LISTED_FAILURES]:
        where = f"column {entry['column']}" if entry["column"] is not None else "table"
        details = ", ".join(f"{key}={entry[key]}" for key in (
            "missing", "unexpected", "observed", "unexpected_count", "unexpected_examples",
            "error") if key in entry)
        lines.append(f"{data_file}: {where} failed {entry['expectation']} ({details})")
    if (more := len(summary["failed"]) - MAX_LISTED_FAILURES) > 0:
        lines.append(f"... and {more} more")
    return "\n".join(lines)


def cast_to_schema(df: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """``df`` with each column cast to its schema type (nullable dtypes where values miss)."""
    out = df.copy()
    for name, rule in schema.columns.items():
        column = out[name]
        missing = bool(column.isna().any())
        if rule.type == "float":
            out[name] = pd.to_numeric(column).astype("float64")
        elif rule.type == "int":
            out[name] = pd.to_numeric(column).astype("Int64" if missing else "int64")
        elif rule.type == "bool":
            out[name] = column.astype("boolean" if missing else "bool")
        else:
            # Plain strings, not pandas' category dtype: that is what a request's JSON holds,
            # and MLflow's signature checks cannot convert category to string.
            out[name] = column.astype("str")
    return out



def run(raw_dir: str | Path, out_dir: str | Path, report_dir: str | Path,
        schema_path: str | Path, target: str, mlflow_params: MlflowParams) -> dict[str, Any]:
    """Validate ``raw_dir/data.parquet``; write the report, then the validated data or fail.

    Args:
        target: params ``ingest.target``; the schema's ``target.name`` must be the same.

    Raises:
        GateError: the data broke the schema (report written, run logged to MLflow).
    """
    schema = load_schema(schema_path)
    if schema.target.name != target:
        raise ConfigError(f"{schema_path}: target.name {schema.target.name!r} differs from "
                          f"params ingest.target {target!r}")
    data_file = str(Path(raw_dir) / DATA_FILE)
    df = read_parquet(data_file)
    with atomic_path(report_dir) as tmp:  # the report folder is replaced as a whole
        tmp.mkdir()
        result = validate_frame(df, schema, tmp / "docs", suite_name=Path(schema_path).stem)
        summary = summarize_result(result, len(df))
        write_json(tmp / "result.json", _json_safe(result.to_json_dict()))
        write_json(tmp / "summary.json", summary)
    if not summary["success"]:
        try:
            _log_failure_to_mlflow(Path(report_dir), mlflow_params, data_file, str(schema_path))
        except Exception:  # the gate's verdict matters more than its bookkeeping
            logger.exception("could not log the failed validation to MLflow")
        raise GateError(f"{data_file}: validation against {schema_path} failed "
                        f"(report: {report_dir})\n" + describe_failures(summary, data_file))
    write_parquet(Path(out_dir) / DATA_FILE, cast_to_schema(df, schema))
    logger.info("%s passed %d expectations (%s)", data_file,
                result.statistics["evaluated_expectations"], schema_path)
    return summary


def _log_failure_to_mlflow(report_dir: Path, params: MlflowParams, data_file: str,
                           schema_path: str) -> None:
    from mlflow import MlflowClient

    experiment_id = tracking.configure_mlflow(params)
    client = MlflowClient()
    tags = {**tracking.lineage_tags(), "stage": "validate", "validation.data": data_file,
            "validation.schema": schema_path}
    run_id = client.create_run(experiment_id, run_name=FAILED_RUN_NAME, tags=tags).info.run_id
    try:
        client.log_artifacts(run_id, str(report_dir), artifact_path="validation")
    finally:
        client.set_terminated(run_id, status="FAILED")
    logger.info("logged the failed validation to MLflow run %s", run_id)


def profile(parquet: str | Path, schema_out: str | Path, target: str, margin: float) -> None:
    """Write a schema YAML for the trusted snapshot ``parquet`` to ``schema_out``."""
    df = read_parquet(parquet)
    raw = profile_frame(df, target, margin)
    origin = (f"Written by `python -m stages.validate --profile {parquet} --write-schema "
              f"{schema_out}`\n# from a snapshot of {len(df)} rows; review it, then edit freely.")
    write_text(schema_out, render_schema(raw, origin))
    logger.info("wrote schema for %d columns to %s", len(raw["columns"]), schema_out)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, examples kept on their own lines."""


def main(argv: list[str] | None = None) -> int:
    """``python -m stages.validate --raw DIR --out DIR --report DIR`` (or ``--profile``)."""
    parser = build_parser("validate", "Validate RAW/data.parquet with the GX suite built from "
                          "the schema YAML named\nin params validate.schema_path. Or, with "
                          "--profile and --write-schema, write such\na schema from a trusted "
                          "Parquet snapshot of your own data.")
    parser.formatter_class = _HelpFormatter
    parser.epilog = ("examples:\n  python -m stages.validate --raw data/raw --out data/validated "
                     "--report reports/validation\n  python -m stages.validate --profile "
                     "data/raw/data.parquet --write-schema schemas/mine.yaml")
    hidden = argparse.SUPPRESS  # no "(default: None)" in --help
    gate = parser.add_argument_group("validation (the pipeline stage)")
    gate.add_argument("--raw", default=hidden, help="folder holding the ingested data.parquet")
    gate.add_argument("--out", default=hidden, help="folder for the validated data.parquet")
    gate.add_argument("--report", default=hidden,
                      help="folder for result.json, summary.json and docs/ (Data Docs)")
    prof = parser.add_argument_group("profiling (write a schema for your own data)")
    prof.add_argument("--profile", metavar="PARQUET", default=hidden,
                      help="trusted snapshot to profile, e.g. data/raw/data.parquet")
    prof.add_argument("--write-schema", metavar="PATH", default=hidden,
                      help="schema YAML to write; then point validate.schema_path at it")
    prof.add_argument("--target", default=hidden,
                      help="label column (default: params ingest.target)")
    prof.add_argument("--margin", type=float, default=0.1,
                      help="widen each numeric range by this fraction of its span")

    def body(args: argparse.Namespace, params: Params) -> None:
        given = vars(args)
        if "profile" in given or "write_schema" in given:
            if not ("profile" in given and "write_schema" in given):
                parser.error("--profile and --write-schema go together")
            profile(args.profile, args.write_schema, given.get("target", params.ingest.target),
                    args.margin)
        elif not all(name in given for name in ("raw", "out", "report")):
            parser.error("give --raw, --out and --report (or --profile and --write-schema)")
        else:
            run(args.raw, args.out, args.report, params.validate.schema_path,
                params.ingest.target, params.mlflow)

    return run_main("validate", parser, body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
