"""Champion vs challenger: the metrics side by side (on the same test data), the confusion
matrices, ROC and precision-recall curves of both models."""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING, Any

from pages.html import fmt, not_available, section, side_by_side, table
from pages.read import read_json, to_number
from pages.svg import Chart, Series, confusion_matrix, line_chart

if TYPE_CHECKING:
    from pages.index import ModelFiles, PageInputs

LOWER_IS_BETTER = ("log_loss", "loss", "brier")  # higher is better for the other metrics


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
        + side_by_side(matrices)
        + "<h3>Curves</h3>"
        + side_by_side(curves)
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
