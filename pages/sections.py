"""The page's sections, each from the files it reads: stages, models, data gate, quarantine,
training curves, drift over time. Each returns a ``<section>``; a missing file makes the
section say "not available" and why, never an error."""

from __future__ import annotations

import os
import re
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pages.read import (
    Broken,
    read_csv_columns,
    read_json,
    read_json_lines,
    read_quarantine_sample,
    to_number,
)
from pages.svg import Chart, Series, confusion_matrix, line_chart

if TYPE_CHECKING:
    from pages.index import ModelFiles, PageInputs, RunStatus

ANCHORS = {
    "stages": "Stages",
    "models": "Champion vs challenger",
    "gate": "Data gate",
    "quarantine": "Quarantine",
    "curves": "Training curves",
    "monitor": "Drift over time",
}
# Lower is better for these metrics; higher for the rest.
LOWER_IS_BETTER = ("log_loss", "loss", "brier")
STATUS_CLASS = {"ran": "ok", "failed": "fail", "not run": "na", "changed": "warn"}
NUMBER = re.compile(r"-?\d+(\.\d+)?(e[-+]?\d+)?%?")  # a cell right-aligned as a number
QUARANTINE_SAMPLE = 10
MONITOR_ROWS = 30  # newest checks listed in the table (the charts show all)


def section(anchor: str, body: str) -> str:
    """A titled ``<section>`` with the anchor the navigation links to."""
    return f'<section id="{anchor}"><h2>{escape(ANCHORS[anchor])}</h2>{body}</section>'


def table(headers: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    """An HTML table; cells are markup already (escape text first), ``classes`` per row."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join(
        f'<tr class="{(classes or [""] * len(rows))[i]}">' + "".join(cells) + "</tr>"
        for i, cells in enumerate(
            [[_cell(value) for value in row] for row in rows]  # numbers right-aligned
        )
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: str) -> str:
    numeric = NUMBER.fullmatch(re.sub(r"<[^>]+>", "", value)) is not None
    return f'<td class="num">{value}</td>' if numeric else f"<td>{value}</td>"


def fmt(value: Any, digits: int = 4) -> str:
    """A value for a cell: floats to ``digits`` decimals, None as a dash, text escaped."""
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return escape(str(value))


def badge(text: str, kind: str) -> str:
    return f'<span class="badge {kind}">{escape(text)}</span>'


def not_available(what: str, value: Any) -> str:
    """Why ``what`` is not shown: a missing file, or a broken one (named)."""
    if isinstance(value, Broken):
        return f'<p class="fail">{escape(what)}: {escape(str(value))}</p>'
    return f'<p class="na">{escape(what)}: not available.</p>'


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


# --- models --------------------------------------------------------------------------------


def models_section(inputs: PageInputs) -> str:
    registration = read_json(inputs.registration)
    reg = registration if isinstance(registration, dict) else {}
    metrics = reg.get("metrics") or _own_metrics(read_json(inputs.model.metrics))
    if not metrics:
        return section("models", not_available("Test metrics", registration))
    other = inputs.other
    ours = f"this run: v{reg['version']} ({reg.get('decision')})" if reg else "this run"
    headers = ["Metric", escape(ours)]
    theirs = reg.get("champion_metrics") or {}
    if other:
        headers.append(escape(f"{other.role} v{other.version} (same test data)"))
    baselines = reg.get("baselines") or {}
    headers += [escape(f"baseline: {name}") for name in baselines]
    rows, classes = [], []
    for name, value in metrics.items():
        label = escape(name) + (" (gate)" if name == inputs.compare_metric else "")
        row = [label, _better(value, theirs.get(name), name)]
        if other:
            row.append(_better(theirs.get(name), value, name))
        row += [fmt((scores or {}).get(name)) for scores in baselines.values()]
        rows.append(row)
        classes.append("")
    body = [
        f"<p>{escape(str(reg.get('reason', '')))}</p>" if reg else "",
        table(headers, rows, classes),
    ]
    if other and other.note:
        body.append(f'<p class="na">{escape(other.note)}</p>')
    body.append(_model_plots(inputs))
    return section("models", "".join(body))


def _own_metrics(metrics: Any) -> dict[str, Any]:
    # evaluate's metrics.json holds the baselines' too; the model's own are unprefixed.
    if not isinstance(metrics, dict):
        return {}
    prefixes = ("baseline_", "strong_", "member_")
    return {k: v for k, v in metrics.items() if not k.startswith(prefixes)}


def _better(value: Any, against: Any, name: str) -> str:
    text = fmt(value)
    if not isinstance(value, int | float) or not isinstance(against, int | float):
        return text
    lower = name.endswith(LOWER_IS_BETTER)
    wins = value < against if lower else value > against
    return f"<strong>{text}</strong>" if wins else text


def _model_plots(inputs: PageInputs) -> str:
    other = inputs.other
    sides: list[tuple[str, ModelFiles]] = [("this run", inputs.model)]
    if other and other.files:
        sides.append((f"{other.role} v{other.version} (its own test split)", other.files))
    matrices = []
    for name, files in sides:
        records = read_json(files.confusion)
        if isinstance(records, list):
            pairs = [(r.get("actual"), r.get("predicted")) for r in records if isinstance(r, dict)]
            matrices.append(confusion_matrix(pairs, f"Confusion matrix: {name}"))
        else:
            matrices.append(not_available(f"Confusion matrix: {name}", records))
    curves = [
        _curve(
            sides, "roc", "fpr", "tpr", "ROC curve", "false positive rate", "true positive rate"
        ),
        _curve(sides, "pr", "recall", "precision", "Precision-recall", "recall", "precision"),
    ]
    return (
        "<h3>Confusion matrices (rows: actual, columns: predicted)</h3>"
        + _columns(matrices)
        + "<h3>Curves</h3>"
        + _columns(curves)
    )


def _curve(sides, kind: str, x: str, y: str, title: str, x_label: str, y_label: str) -> str:
    series = []
    for index, (name, files) in enumerate(sides):
        records = read_json(getattr(files, kind))
        if isinstance(records, list):
            points = [
                (to_number(r.get(x)), to_number(r.get(y))) for r in records if isinstance(r, dict)
            ]
            series.append(
                Series(name, [(px, py) for px, py in points if px is not None], dashed=index > 0)
            )
    if not series:
        return not_available(title, None)
    return line_chart(Chart(title, x_label, y_label, series, y_range=(0.0, 1.0)))


def _columns(parts: list[str]) -> str:
    return '<div class="cols">' + "".join(f"<div>{p}</div>" for p in parts) + "</div>"


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
    return section("curves", _columns(charts))


# --- drift over time -----------------------------------------------------------------------


def monitor_section(inputs: PageInputs, out_dir: Path) -> str:
    history = read_json_lines(inputs.monitor_history)
    if not isinstance(history, list) or not history:
        missing = '<p class="na">No monitor checks yet: <code>make monitor</code> records one.</p>'
        return section(
            "monitor",
            missing
            if history is None or history == []
            else not_available("Monitor history", history),
        )
    history = sorted(history, key=lambda row: str(row.get("checked_at", "")))
    ticks = {float(i): _short_time(row.get("checked_at")) for i, row in enumerate(history)}
    limits = inputs.thresholds

    def series(name: str, key: str) -> Series:
        return Series(name, [(float(i), to_number(row.get(key))) for i, row in enumerate(history)])

    shares = Chart(
        "Drifted and bad shares per check",
        "check (UTC)",
        "share",
        [series("drifted feature share", "drift_share"), series("bad row share", "bad_row_share")],
        x_ticks=ticks,
        thresholds={k: v for k, v in limits.items() if k in ("drift_share", "max_bad_row_share")},
        y_range=(0.0, 1.0),
    )
    psi = Chart(
        "PSI of the predicted probabilities per check",
        "check (UTC)",
        "PSI",
        [series("PSI", "psi")],
        x_ticks=ticks,
        thresholds={k: v for k, v in limits.items() if k == "psi_threshold"},
    )
    accuracy = Chart(
        "Accuracy per check (live with labels, else estimated)",
        "check (UTC)",
        "accuracy",
        [series("accuracy", "accuracy")],
        x_ticks=ticks,
        y_range=(0.0, 1.0),
    )
    charts = _columns([line_chart(shares), line_chart(psi), line_chart(accuracy)])
    retrains = sum(1 for row in history if row.get("decision") == "retrain")
    intro = (
        f"<p>{len(history)} checks from {escape(_short_time(history[0].get('checked_at')))} to "
        f"{escape(_short_time(history[-1].get('checked_at')))}; retraining triggered "
        f"{retrains} time(s).</p>"
    )
    return section("monitor", intro + charts + _checks_table(history, inputs.root, out_dir))


def _checks_table(history: list[dict[str, Any]], root: Path, out_dir: Path) -> str:
    rows, classes = [], []
    for row in reversed(history[-MONITOR_ROWS:]):
        decision = str(row.get("decision"))
        kind = {"retrain": "warn", "ok": "ok"}.get(decision, "na")
        drifted = row.get("drifted_columns") or []
        reasons = row.get("reasons") or []
        rows.append(
            [
                fmt(_short_time(row.get("checked_at"))),
                fmt(row.get("rows")),
                fmt(f"v{row.get('model_version')}" if row.get("model_version") else None),
                fmt(to_number(row.get("drift_share"))),
                fmt(", ".join(map(str, drifted)) or None),
                fmt(to_number(row.get("psi"))),
                fmt(to_number(row.get("bad_row_share"))),
                fmt(to_number(row.get("accuracy"))) + _accuracy_kind(row),
                badge(decision, kind) + "".join(f"<br>{escape(str(r))}" for r in reasons),
                _report_link(row.get("report_dir"), root, out_dir),
            ]
        )
        classes.append("retrain" if decision == "retrain" else "")
    headers = ["Checked (UTC)", "Rows", "Model", "Drift share", "Drifted columns", "PSI"]
    headers += ["Bad rows", "Accuracy", "Decision", "Report"]
    return f"<h3>Latest checks, newest first</h3>{table(headers, rows, classes)}"


def _accuracy_kind(row: dict[str, Any]) -> str:
    kind = row.get("accuracy_source") or row.get("accuracy_kind")
    return f" ({escape(str(kind))})" if kind else ""


def _report_link(report_dir: Any, root: Path, out_dir: Path) -> str:
    if not report_dir:
        return fmt(None)
    folder = Path(str(report_dir))
    folder = folder if folder.is_absolute() else root / folder
    links = []
    for name in ("drift.html", "report.json"):
        if (folder / name).is_file():
            href = Path(os.path.relpath(folder / name, out_dir)).as_posix()
            links.append(f'<a href="{escape(href)}">{escape(name)}</a>')
    return " ".join(links) or fmt(None)


def _short_time(value: Any) -> str:
    # 2026-05-01T12:00:00.123456+00:00 -> 2026-05-01 12:00
    text = str(value or "")
    return text[:16].replace("T", " ") if len(text) >= 16 else text
