"""The page's sections from the run's files: stages, data gate, quarantine, training curves
(the models' and the monitor's sections: ``pages.models``, ``pages.monitor``). Each returns a
``<section>``; a missing file makes it say "not available" and why, never an error."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pages.html import badge, fmt, not_available, section, side_by_side, table
from pages.read import Broken, read_csv_columns, read_json, read_quarantine_sample
from pages.svg import Chart, Series, line_chart

if TYPE_CHECKING:
    from pages.index import PageInputs, RunStatus

STATUS_CLASS = {"ran": "ok", "failed": "fail", "not run": "na", "changed": "warn"}
QUARANTINE_SAMPLE = 10


# --- header and stages ---------------------------------------------------------------------


def headline(inputs: PageInputs) -> str:
    """One line under the title: the registered model and the decision."""
    registration = read_json(inputs.registration)
    if not isinstance(registration, dict):
        return "No model registered by the last run."
    return escape(
        f"{registration.get('model_name')} version {registration.get('version')}: "
        f"{registration.get('decision')}. {registration.get('reason', '')}"
    )


def stages_section(run: RunStatus | None) -> str:
    if run is None:
        return section("stages", '<p class="na">Stage results: not available.</p>')
    rows = [
        [escape(stage), badge(result, STATUS_CLASS.get(result, "na"))]
        for stage, result in run.stages.items()
    ]
    classes = ["fail" if result == "failed" else "" for result in run.stages.values()]
    verdict = {True: badge("failed", "fail"), False: badge("completed", "ok")}.get(run.failed, "")
    error = f"<pre>{escape(run.error.strip())}</pre>" if run.error else ""
    return section(
        "stages",
        f"<p>{verdict} {escape(run.source)}</p>{error}" + table(["Stage", "Result"], rows, classes),
    )


# --- the data gate and the quarantine ------------------------------------------------------


def gate_section(summary_path: Path | None, result_path: Path | None) -> str:
    summary = read_json(summary_path)
    if not isinstance(summary, dict):
        return section("gate", not_available("The validation summary", summary))
    ok = summary.get("success") is True
    gx = summary.get("gx") or {}
    facts = [
        ["rows", fmt(summary.get("rows"))],
        [
            "bad rows",
            f"{fmt(summary.get('bad_rows'))} ({fmt(summary.get('bad_fraction'))} of the rows; "
            f"at most {fmt(summary.get('max_bad_fraction'))})",
        ],
        [
            "duplicates",
            f"{fmt(summary.get('duplicate_fraction'))} (at most "
            f"{fmt(summary.get('max_duplicate_fraction'))})",
        ],
        ["suite", fmt(summary.get("suite"))],
        [
            "GX expectations",
            f"{fmt(gx.get('evaluated_expectations'))} evaluated on {fmt(gx.get('rows'))} rows"
            + (" (a sample)" if gx.get("sampled") else ""),
        ],
    ]
    body = [
        f"<p>{badge('passed', 'ok') if ok else badge('failed', 'fail')}</p>",
        table(["", ""], facts),
    ]
    failed = summary.get("failed") or []
    if failed:
        rows = [[fmt(f.get("column")), fmt(f.get("rule")), fmt(f.get("message"))] for f in failed]
        body.append(
            "<h3>Gate failures</h3>" + table(["Column", "Rule", "Why"], rows, ["fail"] * len(rows))
        )
    body.append(_expectations(read_json(result_path)))
    return section("gate", "".join(body))


def _expectations(result: Any) -> str:
    if not isinstance(result, dict) or not isinstance(result.get("results"), list):
        return not_available("GX results", result)
    rows, classes = [], []
    for item in sorted(result["results"], key=lambda r: bool(r.get("success"))):  # failures first
        config = item.get("expectation_config") or {}
        kwargs = config.get("kwargs") or {}
        outcome = item.get("result") or {}
        passed = item.get("success") is True
        rows.append(
            [
                '<span class="ok">&#10003; pass</span>'
                if passed
                else '<span class="fail">&#10007; fail</span>',
                fmt(config.get("type")),
                fmt(kwargs.get("column") or ", ".join(kwargs.get("column_set") or []) or None),
                fmt(outcome.get("unexpected_count")),
                fmt(outcome.get("partial_unexpected_list", [])[:5] or None),
            ]
        )
        classes.append("" if passed else "fail")
    failures = classes.count("fail")
    listing = table(["", "Expectation", "Column", "Unexpected", "Examples"], rows, classes)
    summary = f"{len(rows)} expectations, {failures} failed"
    if failures:  # the failures are the point: open
        return f"<h3>GX expectations: {summary}</h3>{listing}"
    return f"<details><summary>GX expectations: {summary}</summary>{listing}</details>"


def quarantine_section(summary_path: Path | None, rows_path: Path | None) -> str:
    summary = read_json(summary_path)
    if not isinstance(summary, dict):
        return section("quarantine", not_available("The quarantine summary", summary))
    rules = summary.get("rules") or []
    body = [
        f"<p>{fmt(summary.get('bad_rows'))} of {fmt(summary.get('rows'))} rows quarantined "
        f"({fmt(summary.get('bad_fraction'))}) from {fmt(summary.get('data'))}.</p>"
    ]
    if rules:
        rows = [[fmt(r.get("column")), fmt(r.get("rule")), fmt(r.get("rows"))] for r in rules]
        body.append(table(["Column", "Rule", "Rows"], rows))
        sample = read_quarantine_sample(rows_path, QUARANTINE_SAMPLE)
        if isinstance(sample, list) and sample:
            listed = [[fmt(s["column"]), fmt(s["rule"]), fmt(s["value"])] for s in sample]
            body.append(
                f"<h3>First {len(listed)} quarantined rows</h3>"
                + table(["Column", "Rule", "Value"], listed)
            )
        elif isinstance(sample, Broken):
            body.append(not_available("Quarantined rows", sample))
    else:
        body.append('<p class="ok">No rule quarantined any row.</p>')
    return section("quarantine", "".join(body))


# --- training curves -----------------------------------------------------------------------


def curves_section(inputs: PageInputs) -> str:
    sides = [("this run", inputs.model.history)]
    if inputs.other and inputs.other.files and inputs.other.files.history:
        sides.append((f"{inputs.other.role} v{inputs.other.version}", inputs.other.files.history))
    histories = [(name, read_csv_columns(path)) for name, path in sides]
    readable = [(name, h) for name, h in histories if isinstance(h, dict) and h]
    if not readable:
        return section("curves", not_available("Training history", histories[0][1]))
    losses, others = [], []
    for index, (name, columns) in enumerate(readable):
        steps = columns.get("epoch") or [
            float(i + 1) for i in range(len(next(iter(columns.values()))))
        ]
        for column, values in columns.items():
            if column == "epoch":
                continue
            series = Series(
                f"{column} ({name})",
                [(s, v) for s, v in zip(steps, values, strict=False) if s is not None],
                dashed=index > 0,
            )
            (losses if "loss" in column else others).append(series)
    charts = []
    if losses:
        charts.append(line_chart(Chart("Loss per epoch", "epoch", "loss", losses)))
    if others:
        charts.append(line_chart(Chart("Validation scores per epoch", "epoch", "score", others)))
    return section("curves", side_by_side(charts))
