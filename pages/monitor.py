"""Drift over time: the monitor's checks (``reports/monitor/history.jsonl``, one JSON object per
line, fields as ``flows/monitor.py`` documents them) as charts against the thresholds and a
table of the latest checks, each linking its drift report."""

from __future__ import annotations

import os
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pages.html import badge, fmt, not_available, section, side_by_side, table
from pages.read import read_json_lines, to_number
from pages.svg import Chart, Series, line_chart

if TYPE_CHECKING:
    from pages.index import PageInputs

MONITOR_ROWS = 30  # newest checks listed in the table (the charts show all)


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
    charts = side_by_side([line_chart(shares), line_chart(psi), line_chart(accuracy)])
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
                _service(row.get("service")),
                badge(decision, kind) + "".join(f"<br>{escape(str(r))}" for r in reasons),
                _report_link(row.get("report_dir"), root, out_dir),
            ]
        )
        classes.append("retrain" if decision == "retrain" else "")
    headers = ["Checked (UTC)", "Rows", "Model", "Drift share", "Drifted columns", "PSI"]
    headers += ["Bad rows", "Accuracy", "Service", "Decision", "Report"]
    return f"<h3>Latest checks, newest first</h3>{table(headers, rows, classes)}"


def _service(figures: Any) -> str:
    # the service's /metrics at the check: requests, server errors, p95 latency
    if not isinstance(figures, dict):
        return fmt(None)
    if not figures.get("available"):
        return '<span class="na">unavailable</span>'
    parts = [f"{fmt(to_number(figures.get('requests')), 0)} requests"]
    if (share := to_number(figures.get("error_share"))) is not None:
        parts.append(f"{share:.2%} errors")
    if (p95 := to_number(figures.get("latency_p95_s"))) is not None:
        parts.append(f"p95 {p95 * 1000:.0f} ms")
    return "<br>".join(parts)


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
