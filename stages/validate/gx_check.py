"""Great Expectations on the validated rows: the suite (plus params rules) as a GX checkpoint.

The streaming gate (``stages.validate.stream``) decides on every row; GX then runs the same suite
on the validated rows (or a deterministic sample of them) and writes ``result.json`` and the
Data Docs, so a reviewer sees GX's own verdict and a disagreement stops the run. Expectations
about the whole data (row count; with a sample, also null shares and distinct counts) are left
out of the GX run: the streaming pass checked them on every row.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.common.config import ColumnRuleParams
from stages.common.errors import ConfigError
from stages.common.suite import NOT_NULL, ROW_COUNT, UNIQUE_COUNT, Suite
from stages.validate.docs_offline import make_docs_offline

if TYPE_CHECKING:
    from great_expectations.core import (
        ExpectationSuiteValidationResult,
        ExpectationValidationResult,
    )

MAX_LISTED_FAILURES = 10  # in the GateError message; summary.json has all of them


def gx_expectations(
    suite: Suite, rules: dict[str, ColumnRuleParams], sampled: bool
) -> tuple[list[dict[str, Any]], list[str]]:
    """(the expectations GX runs, a note for each one left out of the run)."""
    kept, left_out = [], []
    for item in suite.raw["expectations"]:
        kind, kwargs = item["type"], item.get("kwargs", {})
        whole_data = kind == ROW_COUNT or (
            sampled and (kind == UNIQUE_COUNT or (kind == NOT_NULL and kwargs.get("mostly", 1) < 1))
        )
        if whole_data:
            where = f" on {kwargs['column']}" if "column" in kwargs else ""
            left_out.append(f"{kind}{where}: checked on every row by the streaming pass")
        else:
            kept.append({key: item[key] for key in ("type", "kwargs", "meta") if key in item})
    for name, rule in rules.items():
        kept += _params_expectations(name, rule)
    return kept, left_out


def _params_expectations(name: str, rule: ColumnRuleParams) -> list[dict[str, Any]]:
    meta = {"notes": "from params validate.rules"}
    out = []
    if rule.not_null:
        out.append({"type": NOT_NULL, "kwargs": {"column": name}, "meta": meta})
    if rule.min is not None or rule.max is not None:
        out.append(
            {
                "type": "expect_column_values_to_be_between",
                "meta": meta,
                "kwargs": {"column": name, "min_value": rule.min, "max_value": rule.max},
            }
        )
    if rule.positive:
        out.append(
            {
                "type": "expect_column_values_to_be_between",
                "meta": meta,
                "kwargs": {"column": name, "min_value": 0, "strict_min": True},
            }
        )
    if rule.values is not None:
        out.append(
            {
                "type": "expect_column_values_to_be_in_set",
                "meta": meta,
                "kwargs": {"column": name, "value_set": rule.values},
            }
        )
    return out


def as_gx_frame(table: Any) -> Any:
    """The validated rows as the pandas frame GX type-checks (see suite.TYPE_LISTS)."""
    import pandas as pd
    import pyarrow as pa

    df = table.to_pandas(
        types_mapper={pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype()}.get
    )
    for name, arrow_field in zip(table.column_names, table.schema, strict=True):
        if pa.types.is_string(arrow_field.type):
            df[name] = df[name].astype(object)  # GX 1.24 cannot name pandas 3's str dtype
        elif pa.types.is_timestamp(arrow_field.type) and arrow_field.type.tz is not None:
            df[name] = df[name].dt.tz_convert(None)
    return df


def preload_gx() -> None:
    """Import great_expectations on a background thread (3-5 s of imports).

    The streaming pass spends its time in pyarrow and numpy, which release the GIL, so the
    import mostly overlaps it; ``run_gx``'s own import then finds the module loaded (or waits
    for it on Python's import lock).
    """
    import threading

    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    threading.Thread(target=_import_gx, name="import-great-expectations", daemon=True).start()


def _import_gx() -> None:
    try:
        import great_expectations  # noqa: F401
        import great_expectations.checkpoint  # noqa: F401
    except Exception:  # run_gx imports it again and reports any error there
        pass


def run_gx(
    df: Any, suite: Suite, expectations: list[dict[str, Any]], docs_dir: Path, source: str
) -> ExpectationSuiteValidationResult:
    """Run ``expectations`` on ``df`` in an ephemeral GX context; write Data Docs to docs_dir
    (rendering offline: :mod:`stages.validate.docs_offline`)."""
    os.environ["GX_ANALYTICS_ENABLED"] = "false"  # read by GX at import and context creation
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # INFO floods at import
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction

    context = gx.get_context(mode="ephemeral", project_config=_gx_config(docs_dir))
    batch = (
        context.data_sources.add_pandas("pipeline")
        .add_dataframe_asset("validated")
        .add_batch_definition_whole_dataframe("rows")
    )
    try:
        gx_suite = gx.ExpectationSuite(  # copies: GX writes into the mappings it is given
            name=suite.name,
            expectations=copy.deepcopy(expectations),
            meta=copy.deepcopy(suite.raw.get("meta")),
        )
    except Exception as exc:  # GX raises many kinds for a bad expectation
        raise ConfigError(f"{source}: great_expectations cannot load the suite: {exc}") from exc
    gx_suite = context.suites.add(gx_suite)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{suite.name}_gate", data=batch, suite=gx_suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="validate",
            validation_definitions=[definition],
            actions=[UpdateDataDocsAction(name="data_docs")],
            result_format="SUMMARY",
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": df})
    make_docs_offline(docs_dir)  # GX's pages load their CSS/JS from CDNs: vendor them
    return next(iter(result.run_results.values()))


def _gx_config(docs_dir: Path) -> Any:
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    # Stores in memory (no gx/ folder) and one docs site, ours: get_context's default
    # ephemeral config would also register a docs site in a fresh temporary folder.
    sites = {
        "local": {
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(Path(docs_dir).resolve()),
            },
        }
    }
    return DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        data_docs_sites=sites,
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )


def summarize_result(result: ExpectationSuiteValidationResult) -> list[dict[str, Any]]:
    """The failed expectations: ``[{column, expectation, observed / unexpected examples}]``."""
    failed = [_describe(item) for item in result.results if not item.success]
    failed.sort(key=lambda entry: (entry["column"] is not None, str(entry["column"])))
    return json_safe(failed)


def _describe(item: ExpectationValidationResult) -> dict[str, Any]:
    found = item.result or {}
    entry = {
        "column": item.expectation_config.kwargs.get("column"),
        "expectation": item.expectation_config.type,
    }
    if mismatched := (found.get("details") or {}).get("mismatched"):
        entry.update(
            {key: mismatched[key] for key in ("missing", "unexpected") if mismatched.get(key)}
        )
    elif "observed_value" in found:
        entry["observed"] = found["observed_value"]
    if found.get("unexpected_count"):
        entry["unexpected_count"] = found["unexpected_count"]
        entry["unexpected_examples"] = found.get("partial_unexpected_list", [])[:5]
    info = item.exception_info or {}
    infos = [info] if "raised_exception" in info else list(info.values())
    errors = {i.get("exception_message") for i in infos if i and i.get("raised_exception")}
    if errors := "; ".join(sorted(e for e in errors if e)):
        entry["error"] = errors
    return entry


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats as None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def describe_failures(failed: list[dict[str, Any]], data_file: str) -> str:
    """One line per failure: ``<file>: column X failed expect_... (details)``."""
    lines = []
    for entry in failed[:MAX_LISTED_FAILURES]:
        where = f"column {entry['column']}" if entry["column"] is not None else "table"
        details = ", ".join(
            f"{key}={entry[key]}"
            for key in (
                "missing",
                "unexpected",
                "observed",
                "unexpected_count",
                "unexpected_examples",
                "error",
            )
            if key in entry
        )
        lines.append(f"{data_file}: {where} failed {entry['expectation']} ({details})")
    if (more := len(failed) - MAX_LISTED_FAILURES) > 0:
        lines.append(f"... and {more} more")
    return "\n".join(lines)
